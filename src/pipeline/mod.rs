//! The jobs that tie the modules together: a model bundle (tokenizer + text encoder + GPT),
//! the TokenAR training job, and generation.

pub mod attention;
pub mod binding;
pub mod bundle;
pub mod generate;
pub mod probe;
pub mod run_guard;
pub mod train_config;
pub mod train_job;

pub use bundle::{Bundle, TextModel};
pub use generate::{generate, GenerateRequest, GenerateResult};
pub use run_guard::RunStart;
pub use train_config::{Autocast, TrainJobConfig};
pub use train_job::TrainJob;
