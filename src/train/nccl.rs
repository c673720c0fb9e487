//! Data parallel on GPUs (cargo feature `nccl`): [`NcclCollective`] implements [`Collective`]
//! over NCCL through candle's CUDA backend (cudarc's NCCL bindings), one process per GPU.
//!
//! Rank and world come from MPI when this build has the `mpi` feature and the process was
//! started by `mpirun` with several ranks (the NCCL id then travels by `MPI_Bcast`), else from
//! the environment of a torchrun-style launcher ([`super::launch::LaunchEnv`]; the id travels
//! over a small TCP rendezvous or a file). The GPU is `LOCAL_RANK`.
//!
//! Gradients are summed on the GPU: [`super::dist::average_grads`] packs each bucket into one
//! device buffer and [`Collective::all_reduce_sum_tensor`] hands it to `ncclAllReduce` on the
//! stream candle computes on, so no gradient goes through the host. The few host values (the
//! presence flags, the step's loss and token count) are copied to the device and back.
//!
//! NCCL calls cannot be interrupted: a [`Watchdog`] watches every wait for the other ranks and,
//! past the timeout, prints which rank waited for what and stops the process (exit status 2);
//! the launcher then stops the others.

use super::dist::Collective;
use super::launch::{share_id, LaunchEnv, Watchdog, ID_BYTES};
use crate::error::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaStream, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, Storage, Tensor};
use std::sync::Arc;
use std::time::Duration;

/// Gradient values per NCCL all-reduce (64 MiB of f32): each call waits for its result (the
/// timeout check), so buckets are larger than on the host path.
pub const NCCL_BUCKET_ELEMS: usize = 1 << 24;

pub struct NcclCollective {
    comm: Comm,
    device: Device,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    dog: Watchdog,
    /// The MPI job this process belongs to, when MPI gave the ranks (finalised on drop).
    #[cfg(feature = "mpi")]
    _mpi: Option<super::dist::MpiCollective>,
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::invalid("NCCL", format!("{what}: {e:?}"))
}

/// The rank on this machine according to an MPI launcher (Open MPI, MPICH, Slurm).
#[cfg(feature = "mpi")]
fn mpi_local_rank() -> Option<usize> {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"]
        .iter()
        .find_map(|k| std::env::var(k).ok().and_then(|v| v.trim().parse::<usize>().ok()))
}

impl NcclCollective {
    /// Join the job the launcher started (see the module documentation); `Ok(None)` when no
    /// launcher started this process. `timeout_s`: how long any wait for the other ranks may
    /// take (the id rendezvous, NCCL's set-up, each collective).
    pub fn from_environment(timeout_s: f64) -> Result<Option<Self>> {
        if !(timeout_s > 0.0 && timeout_s.is_finite()) {
            return Err(Error::invalid("collective timeout", format!("{timeout_s} s (must be positive)")));
        }
        let timeout = Duration::from_secs_f64(timeout_s);
        #[cfg(feature = "mpi")]
        if super::dist::launcher_world_size().is_some_and(|n| n > 1) {
            let mpi = super::dist::MpiCollective::init(timeout_s)?;
            let (rank, world) = (mpi.rank(), mpi.world());
            let local = mpi_local_rank().unwrap_or(rank);
            let device = cuda_device(local, rank)?;
            let mut id = if rank == 0 { new_id()? } else { [0u8; ID_BYTES] };
            mpi.broadcast(&mut id, 0)?;
            return Self::join(device, rank, world, id, timeout, Some(mpi)).map(Some);
        }
        let Some(env) = LaunchEnv::from_env()? else {
            return Ok(None);
        };
        let device = cuda_device(env.local_rank, env.rank)?;
        let id = match &env.rendezvous {
            None => new_id()?,
            Some(rv) => {
                let mine = if env.rank == 0 { Some(new_id()?) } else { None };
                share_id(rv, env.rank, env.world, mine, timeout)?
            }
        };
        #[cfg(feature = "mpi")]
        let joined = Self::join(device, env.rank, env.world, id, timeout, None);
        #[cfg(not(feature = "mpi"))]
        let joined = Self::join(device, env.rank, env.world, id, timeout);
        joined.map(Some)
    }

    fn join(
        device: Device,
        rank: usize,
        world: usize,
        id: [u8; ID_BYTES],
        timeout: Duration,
        #[cfg(feature = "mpi")] mpi: Option<super::dist::MpiCollective>,
    ) -> Result<Self> {
        let stream = device.as_cuda_device()?.cuda_stream();
        let secs = timeout.as_secs_f64();
        let dog = Watchdog::new(timeout, move |what, waited| {
            eprintln!(
                "error: rank {rank} of {world}: {what} waited {:.0} s (timeout {secs:.0} s) for the other ranks (a rank died or hangs); stopping. Continue from the last checkpoint with --resume (any number of ranks).",
                waited.as_secs_f64()
            );
            std::process::exit(2);
        });
        let internal: [std::ffi::c_char; ID_BYTES] = std::array::from_fn(|i| id[i] as std::ffi::c_char);
        let comm = {
            let _w = dog.arm("NCCL initialisation");
            Comm::from_rank(stream.clone(), rank, world, Id::uninit(internal)).map_err(|e| nccl_err("ncclCommInitRank", e))?
        };
        Ok(Self {
            comm,
            device,
            stream,
            rank,
            world,
            dog,
            #[cfg(feature = "mpi")]
            _mpi: mpi,
        })
    }

    /// The GPU of this rank (CUDA device `LOCAL_RANK`).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Sum a host buffer over the ranks through the device.
    fn all_reduce_host<T: DeviceRepr + ValidAsZeroBits + NcclType + Copy>(&self, buf: &mut [T]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut dev = self.stream.clone_htod(&*buf).map_err(|e| nccl_err("copy to the GPU", e))?;
        let _w = self.dog.arm("all-reduce");
        self.comm.all_reduce_in_place(&mut dev, &ReduceOp::Sum).map_err(|e| nccl_err("ncclAllReduce", e))?;
        self.stream.memcpy_dtoh(&dev, buf).map_err(|e| nccl_err("copy from the GPU", e))?;
        self.stream.synchronize().map_err(|e| nccl_err("all-reduce", e))?;
        Ok(())
    }
}

/// A fresh NCCL unique id (rank 0).
fn new_id() -> Result<[u8; ID_BYTES]> {
    let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId (is libnccl.so.2 on the library path?)", e))?;
    Ok(std::array::from_fn(|i| id.internal()[i] as u8))
}

fn cuda_device(ordinal: usize, rank: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| {
        let e = match e {
            candle_core::Error::WithBacktrace { inner, .. } => *inner,
            e => e,
        };
        Error::invalid("LOCAL_RANK", format!("rank {rank}: CUDA device {ordinal} is not usable: {e}"))
    })
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_host(buf)
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce_host(buf)
    }

    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        if !t.device().same_device(&self.device) {
            return Err(Error::invalid("all-reduce", format!("a tensor on {:?}, but this rank's GPU is {:?}", t.device(), self.device)));
        }
        let t = t.to_dtype(DType::F32)?.contiguous()?;
        let n = t.elem_count();
        let out = {
            let (storage, layout) = t.storage_and_layout();
            let Storage::Cuda(cs) = &*storage else {
                return Err(Error::invalid("all-reduce", "the tensor is not in CUDA memory"));
            };
            let (lo, hi) = layout.contiguous_offsets().ok_or_else(|| Error::invalid("all-reduce", "a non-contiguous tensor"))?;
            let src = cs.as_cuda_slice::<f32>()?.slice(lo..hi);
            // Every element is written by the all-reduce.
            let mut out = unsafe { self.stream.alloc::<f32>(n) }.map_err(|e| nccl_err("allocating the result", e))?;
            let _w = self.dog.arm("all-reduce");
            self.comm.all_reduce(&src, &mut out, &ReduceOp::Sum).map_err(|e| nccl_err("ncclAllReduce", e))?;
            self.stream.synchronize().map_err(|e| nccl_err("all-reduce", e))?;
            out
        };
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, self.device.as_cuda_device()?.clone()));
        Ok(Tensor::from_storage(storage, t.shape().clone(), BackpropOp::none(), false))
    }

    fn bucket_elems(&self) -> usize {
        NCCL_BUCKET_ELEMS
    }

    fn barrier(&self) -> Result<()> {
        let mut one = [1f32];
        self.all_reduce_host(&mut one)
    }

    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        if root >= self.world {
            return Err(Error::invalid("broadcast root", format!("rank {root} of {}", self.world)));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let mut dev = self.stream.clone_htod(&*buf).map_err(|e| nccl_err("copy to the GPU", e))?;
        let _w = self.dog.arm("broadcast");
        self.comm.broadcast_in_place(&mut dev, root as i32).map_err(|e| nccl_err("ncclBroadcast", e))?;
        self.stream.memcpy_dtoh(&dev, buf).map_err(|e| nccl_err("copy from the GPU", e))?;
        self.stream.synchronize().map_err(|e| nccl_err("broadcast", e))?;
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self._mpi {
            mpi.abort(code)
        }
        std::process::exit(code)
    }
}
