//! Training machinery shared by every trainable model: AdamW with the reference recipe,
//! gradient clipping, the learning-rate schedule, checkpoints with exact resume, metrics and a
//! loss-curve plot, the generic loop, and `--set` config overrides.

pub mod checkpoint;
pub mod config;
pub mod metrics;
pub mod optim;
pub mod run;

pub use checkpoint::{Checkpointer, Restored, RngState};
pub use config::{apply_overrides, apply_overrides_to};
pub use metrics::{plot_losses, MetricsLog, MetricsRecord, PlotOptions};
pub use optim::{clip_grad_norm, grad_norm, AdamW, AdamWParams, Decay, LrSchedule};
pub use run::{run_loop, Hooks, LoopConfig, LoopSummary, NoHooks, StepOutput, TrainState};

#[cfg(test)]
mod tests;
