//! Which collective and device a training process uses, from how it was launched: one process,
//! `mpirun` ranks (MPI, feature `mpi`) or torchrun-style GPU ranks (NCCL, feature `nccl`). Above
//! both implementations, so neither imports the other.

use super::dist::{self, Collective};
use crate::error::{Error, Result};

/// The collective and the device of a training process. With `gpu` and a launcher (torchrun's
/// `WORLD_SIZE`, or `mpirun` with several ranks): NCCL on CUDA device `LOCAL_RANK` (feature
/// `nccl`); otherwise [`dist::from_environment`] on `crate::util::device(gpu)`. A torchrun-style
/// launch of several ranks without `--gpu`, or without the `nccl` feature, is refused with the
/// reason.
pub fn for_device(gpu: bool, timeout_s: f64) -> Result<(Box<dyn Collective>, candle_core::Device)> {
    let env = super::launch::LaunchEnv::from_env()?;
    let env_world = env.as_ref().map_or(1, |e| e.world);
    #[cfg(feature = "nccl")]
    if gpu && (env.is_some() || dist::launcher_world_size().is_some_and(|n| n > 1)) {
        if let Some(c) = super::nccl::NcclCollective::from_environment(timeout_s)? {
            let dev = c.device().clone();
            return Ok((Box::new(c), dev));
        }
    }
    if env_world > 1 && dist::launcher_world_size().is_none() {
        return Err(Error::invalid(
            "WORLD_SIZE",
            if !gpu {
                format!("{env_world} ranks from a torchrun-style launcher need --gpu (NCCL); CPU ranks run under mpirun (feature `mpi`)")
            } else {
                format!("{env_world} ranks from a torchrun-style launcher, but this tokenar was built without the `nccl` feature (cargo build --release --features nccl)")
            },
        ));
    }
    Ok((dist::from_environment(timeout_s)?, crate::util::device(gpu)?))
}

