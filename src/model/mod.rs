//! The TokenAR transformer: the LlamaGen GPT ([`gpt`], [`rope`]) with TokenAR's additions, each
//! in one named place: [`index_embedding`], [`instruct_tokens`], and ITD in the
//! [`layout`](crate::layout); and this project's optional [`cell_embedding`]. The decoding
//! session in [`session`], the configuration and presets in [`config`], checkpoint IO in
//! [`load`](mod@load).

pub mod alignment;
pub mod cell_embedding;
pub mod condition;
pub mod config;
pub mod gpt;
pub mod index_embedding;
pub mod instruct_tokens;
pub mod load;
pub mod loss;
pub mod session;

/// 2D RoPE lives with the kernels in [`crate::nn::rope`]; re-exported under its former path.
pub use crate::nn::rope;

pub use config::{Dropouts, Family, GptConfig, Overrides, ADDITIONS, PRESETS};
pub use condition::Condition;
pub use gpt::{TokenAr, TrainOutput, BUFFERS};
pub use session::Session;
pub use load::{build, config_from_metadata, config_from_tensors, init_weights, load, load_with_config, load_with_hints, save, CONFIG_KEY};

#[cfg(test)]
mod tests;
