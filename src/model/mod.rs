//! The TokenAR transformer: the LlamaGen GPT (`gpt`, `rope`, `kv_cache`) with TokenAR's
//! additions, each in one named place: [`index_embedding`], [`instruct_tokens`], and ITD in the
//! [`layout`](crate::layout); and this project's optional [`cell_embedding`]. Checkpoint IO in
//! [`load`](mod@load).

pub mod alignment;
pub mod cell_embedding;
pub mod condition;
pub mod config;
pub mod gpt;
pub mod index_embedding;
pub mod instruct_tokens;
pub mod kv_cache;
pub mod load;
pub mod loss;
pub mod rope;

pub use config::{Dropouts, Family, GptConfig};
pub use condition::Condition;
pub use gpt::{TokenAr, TrainOutput, BUFFERS};
pub use kv_cache::Session;
pub use load::{build, config_from_metadata, config_from_tensors, init_weights, load, load_with_config, load_with_hints, save, ADDITIONS, CONFIG_KEY};

#[cfg(test)]
mod tests;
