//! Training machinery shared by every trainable model: AdamW with the reference recipe,
//! gradient clipping, the learning-rate schedule, checkpoints with exact resume, metrics and a
//! loss-curve plot, the generic loop, and `--set` config overrides.
//!
//! Wiring a model into the loop (sketch):
//!
//! ```ignore
//! let vm = VarMap::new();
//! let model = Gpt::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?; // build first
//! let mut state = TrainState::new_with_frozen(
//!     vec![("model".into(), vm)], AdamWParams::default(), seed, &["model/cls_embedding.uncond_embedding".into()])?;
//! let ckpt = Checkpointer::new(&run_dir, 3)?;
//! if resume { state.resume_latest(&ckpt)?; }
//! let mut lc = LoopConfig::new(steps, LrSchedule::constant(1e-4));
//! lc.run_dir = Some(run_dir); lc.ckpt_every = 500; lc.progress = true;
//! lc.metadata.insert("config".into(), serde_json::to_string(&cfg)?);
//! run_loop(&lc, &mut state, |step, rng| {
//!     let batch = loader.sample(rng)?;            // every random draw from `rng`
//!     let loss = model.loss(&batch)?;
//!     Ok(StepOutput::new(loss, batch.tokens))
//! }, &mut my_hooks)?;                             // Hooks::on_checkpoint writes sample grids
//! ```

pub mod checkpoint;
pub mod config;
pub mod dist;
pub mod launch;
pub mod distill;
pub mod metrics;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod optim;
pub mod run;
pub mod shard;
pub mod world;

pub use checkpoint::{Checkpointer, Restored, RngState};
pub use config::{apply_overrides, apply_overrides_to};
pub use metrics::{plot_losses, MetricsLog, MetricsRecord, PlotOptions};
pub use optim::{clip_coef, clip_grad_norm, grad_norm, AdamW, AdamWParams, Decay, LrSchedule};
pub use run::{run_loop, run_loop_on, Hooks, LoopConfig, LoopSummary, NoHooks, StepOutput, TrainState};

#[cfg(test)]
mod tests;
