//! Data-parallel training: the collective operations the loop needs, and the gradient
//! averaging built on them.
//!
//! Every rank runs the same loop on its own part of each global batch; after the micro-steps
//! of an optimiser step the gradients are summed over the ranks ([`average_grads`], a few
//! all-reduce calls on buffers of [`BUCKET_ELEMS`] values, not one call per tensor) and divided
//! by the number of ranks, so that every rank applies the same AdamW update and the parameters
//! stay identical without ever being sent. [`Single`] is the one-process case; with the cargo
//! feature `mpi`, `MpiCollective` runs over MPI (`mpirun -n N tokenar train ...`); with the
//! feature `nccl`, `NcclCollective` (in `train::nccl`) over NCCL, one process per GPU, summing
//! the gradient buckets in device memory ([`super::world::for_device`] picks the collective and the device).
//!
//! A collective that waits longer than its timeout (a rank died or hangs) does not return: it
//! prints which rank waited for what and stops the whole job (`MPI_Abort`), so a job never
//! hangs; `--resume` then continues from the last checkpoint, with any number of ranks.

use crate::error::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

/// The collective operations of data-parallel training. Every rank must call the same
/// operations in the same order with buffers of the same lengths.
pub trait Collective {
    /// This process's rank, `0..world()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// Replace `buf` on every rank by the element-wise sum of all ranks' `buf`.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// As [`Collective::all_reduce_sum`] for f64 values (the loop's figures).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// The element-wise sum over the ranks of the f32 tensor `t` (same shape on every rank),
    /// on `t`'s device. The default goes through [`Collective::all_reduce_sum`] on the host;
    /// NCCL sums device buffers in place of that.
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let mut buf = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        self.all_reduce_sum(&mut buf)?;
        Ok(Tensor::from_vec(buf, t.shape(), t.device())?)
    }
    /// Values per gradient bucket of [`average_grads`] (one all-reduce each).
    fn bucket_elems(&self) -> usize {
        BUCKET_ELEMS
    }
    /// Return once every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Replace `buf` on every rank by rank `root`'s `buf`.
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()>;
    /// Rank 0 writes the run's files (checkpoints, metrics, plots, probe).
    fn is_root(&self) -> bool {
        self.rank() == 0
    }
    /// Stop this process and, with MPI, every rank of the job, with exit status `code`
    /// (for an error on one rank, which the others would otherwise wait for).
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// One process: every operation is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _buf: &mut [u8], root: usize) -> Result<()> {
        if root != 0 {
            return Err(Error::invalid("broadcast root", format!("rank {root} of a single process")));
        }
        Ok(())
    }
}

/// Values per all-reduce buffer: 1 Mi f32 = 4 MiB (a tensor larger than that is sent alone).
pub const BUCKET_ELEMS: usize = 1 << 20;

/// Sum the gradients of `vars` over the ranks and divide them by the number of ranks, in
/// buckets of about `bucket_elems` values (see [`buckets`]), each summed by one
/// [`Collective::all_reduce_sum_tensor`] on the gradients' device. A variable without a
/// gradient on a rank counts as zero there; it gets the average where any rank has a gradient
/// for it, and stays without one (so AdamW skips it, as in one process) where none has. Does
/// nothing for one rank.
pub fn average_grads(comm: &dyn Collective, grads: &mut GradStore, vars: &[(String, Var)], bucket_elems: usize) -> Result<()> {
    let world = comm.world();
    if world == 1 {
        return Ok(());
    }
    let inv = 1.0 / world as f64;
    // The presence flags of every variable travel in the first all-reduce.
    let mut present: Vec<f32> = vars.iter().map(|(_, v)| if grads.get(v.as_tensor()).is_some() { 1.0 } else { 0.0 }).collect();
    comm.all_reduce_sum(&mut present)?;
    let todo: Vec<usize> = (0..vars.len()).filter(|&i| present[i] > 0.0).collect();
    let sizes: Vec<usize> = todo.iter().map(|&i| vars[i].1.elem_count()).collect();
    for range in buckets(&sizes, bucket_elems) {
        let idx = &todo[range];
        let mut parts = Vec::with_capacity(idx.len());
        for &i in idx {
            let var = &vars[i].1;
            parts.push(match grads.get(var.as_tensor()) {
                Some(g) => g.to_dtype(DType::F32)?.flatten_all()?,
                None => Tensor::zeros(var.elem_count(), DType::F32, var.device())?,
            });
        }
        let flat = Tensor::cat(&parts, 0)?;
        let avg = (comm.all_reduce_sum_tensor(&flat)? * inv)?;
        let mut off = 0;
        for &i in idx {
            let var = &vars[i].1;
            let n = var.elem_count();
            let g = avg.narrow(0, off, n)?.reshape(var.shape())?.to_dtype(var.dtype())?;
            grads.insert(var.as_tensor(), g);
            off += n;
        }
    }
    Ok(())
}

/// Split tensors of `sizes` values, in order, into buckets of at most `bucket_elems` values
/// (a larger tensor alone): the index ranges of the buckets.
pub fn buckets(sizes: &[usize], bucket_elems: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < sizes.len() {
        let (mut end, mut len) = (start, 0);
        while end < sizes.len() && (end == start || len + sizes[end] <= bucket_elems) {
            len += sizes[end];
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// The collective of the process: MPI when the `mpi` feature is built and the process was
/// started by `mpirun` with more than one rank, else [`Single`]. `timeout_s`: how long a
/// collective may wait for the other ranks before the job is stopped.
pub fn from_environment(timeout_s: f64) -> Result<Box<dyn Collective>> {
    let launched = launcher_world_size();
    #[cfg(feature = "mpi")]
    if launched.is_some_and(|n| n > 1) {
        return Ok(Box::new(mpi_backend::MpiCollective::init(timeout_s)?));
    }
    #[cfg(not(feature = "mpi"))]
    if let Some(n) = launched.filter(|&n| n > 1) {
        let _ = timeout_s;
        return Err(Error::invalid(
            "launch",
            format!("started as one of {n} MPI ranks, but this tokenar was built without the `mpi` feature (cargo build --release --features mpi)"),
        ));
    }
    Ok(Box::new(Single))
}

/// The number of ranks an MPI launcher (Open MPI's `mpirun`, MPICH's Hydra) says this process is
/// one of, if any.
pub fn launcher_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok().and_then(|v| v.trim().parse::<usize>().ok()))
}

#[cfg(feature = "mpi")]
pub use mpi_backend::MpiCollective;

#[cfg(feature = "mpi")]
mod mpi_backend {
    use super::Collective;
    use crate::error::{Error, Result};
    use mpi::collective::SystemOperation;
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;
    use std::time::{Duration, Instant};

    /// MPI's world communicator. Made by [`MpiCollective::init`] on the thread that then runs
    /// training (MPI is initialised with `MPI_THREAD_FUNNELED`: only that thread calls MPI).
    /// Dropping it finalises MPI.
    pub struct MpiCollective {
        world: SimpleCommunicator,
        timeout: Duration,
        // Declared last: finalises MPI after the communicator is gone.
        _universe: Universe,
    }

    impl MpiCollective {
        pub fn init(timeout_s: f64) -> Result<Self> {
            if !(timeout_s > 0.0 && timeout_s.is_finite()) {
                return Err(Error::invalid("collective timeout", format!("{timeout_s} s (must be positive)")));
            }
            let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
                .ok_or_else(|| Error::invalid("MPI", "already initialised in this process"))?;
            let world = universe.world();
            Ok(Self { world, timeout: Duration::from_secs_f64(timeout_s), _universe: universe })
        }

        /// Poll `test` until it reports completion; past the timeout, stop the job.
        fn wait<R>(&self, what: &str, mut req: R, test: impl Fn(R) -> std::result::Result<(), R>) {
            let start = Instant::now();
            let mut nap = Duration::from_micros(5);
            loop {
                match test(req) {
                    Ok(()) => return,
                    Err(r) => req = r,
                }
                if start.elapsed() > self.timeout {
                    eprintln!(
                        "error: rank {} of {}: {what} waited more than {:.0} s for the other ranks (a rank died or hangs); stopping the job. Continue from the last checkpoint with --resume (any number of ranks).",
                        self.rank(),
                        self.world(),
                        self.timeout.as_secs_f64()
                    );
                    // A pending request cannot be dropped: the whole job stops here.
                    self.world.abort(2);
                }
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(2));
            }
        }
    }

    impl Collective for MpiCollective {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }

        fn world(&self) -> usize {
            self.world.size() as usize
        }

        fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
            let send = buf.to_vec();
            mpi::request::scope(|scope| {
                let req = self.world.immediate_all_reduce_into(scope, &send[..], &mut buf[..], SystemOperation::sum());
                self.wait("all-reduce", req, |r| r.test().map(|_| ()));
            });
            Ok(())
        }

        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            let send = buf.to_vec();
            mpi::request::scope(|scope| {
                let req = self.world.immediate_all_reduce_into(scope, &send[..], &mut buf[..], SystemOperation::sum());
                self.wait("all-reduce", req, |r| r.test().map(|_| ()));
            });
            Ok(())
        }

        fn barrier(&self) -> Result<()> {
            let req = self.world.immediate_barrier();
            self.wait("barrier", req, |r| r.test().map(|_| ()));
            Ok(())
        }

        fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
            if root >= self.world() {
                return Err(Error::invalid("broadcast root", format!("rank {root} of {}", self.world())));
            }
            let root = self.world.process_at_rank(root as i32);
            mpi::request::scope(|scope| {
                let req = root.immediate_broadcast_into(scope, &mut buf[..]);
                self.wait("broadcast", req, |r| r.test().map(|_| ()));
            });
            Ok(())
        }

        fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `world` ranks simulated in one process: the all-reduce sums what each simulated rank
    /// contributed in the same call order.
    struct Sim {
        rank: usize,
        world: usize,
        /// Per call: the buffer each rank passed (filled by the test in advance).
        calls: std::cell::RefCell<std::collections::VecDeque<Vec<f32>>>,
        lens: std::cell::RefCell<Vec<usize>>,
    }

    impl Collective for Sim {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world(&self) -> usize {
            self.world
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
            self.lens.borrow_mut().push(buf.len());
            let other = self.calls.borrow_mut().pop_front().expect("a call the test prepared");
            assert_eq!(other.len(), buf.len());
            buf.iter_mut().zip(other).for_each(|(a, b)| *a += b);
            Ok(())
        }
        fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
            unreachable!()
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
        fn broadcast(&self, _buf: &mut [u8], _root: usize) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn buckets_keep_order_and_size() {
        assert_eq!(buckets(&[], 5), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(buckets(&[4, 2, 2, 9, 1, 5], 5), vec![0..1, 1..3, 3..4, 4..5, 5..6]);
        assert_eq!(buckets(&[1, 1, 1], 3), vec![0..3]);
        assert_eq!(buckets(&[3, 3], 0), vec![0..1, 1..2]);
    }

    #[test]
    fn gradients_are_averaged_in_buckets_and_missing_ones_count_as_zero() {
        let dev = Device::Cpu;
        let a = Var::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap();
        let b = Var::new(&[1f32, 1., 1.], &dev).unwrap();
        let c = Var::new(&[5f32], &dev).unwrap();
        let d = Var::new(&[7f32], &dev).unwrap();
        let vars: Vec<(String, Var)> = [("a", &a), ("b", &b), ("c", &c), ("d", &d)].iter().map(|(n, v)| (n.to_string(), (*v).clone())).collect();
        // This rank: gradients for a and b; the other rank: for a and c; nobody for d.
        let mut g = GradStore::default();
        g.insert(a.as_tensor(), Tensor::new(&[[1f32, 1.], [1., 1.]], &dev).unwrap());
        g.insert(b.as_tensor(), Tensor::new(&[2f32, 4., 6.], &dev).unwrap());
        // Buckets of at most 5 values: [a] (4 values), then [b, c] (4 values).
        let calls = vec![vec![1f32, 0., 1., 0.], vec![3f32, 3., 3., 3.], vec![0f32, 0., 0., 8.]];
        let sim = Sim { rank: 0, world: 2, calls: std::cell::RefCell::new(calls.into()), lens: Default::default() };
        average_grads(&sim, &mut g, &vars, 5).unwrap();
        assert_eq!(*sim.lens.borrow(), vec![4, 4, 4]);
        assert_eq!(g.get(a.as_tensor()).unwrap().to_vec2::<f32>().unwrap(), vec![vec![2f32, 2.], vec![2., 2.]]);
        assert_eq!(g.get(b.as_tensor()).unwrap().to_vec1::<f32>().unwrap(), vec![1f32, 2., 3.]);
        assert_eq!(g.get(c.as_tensor()).unwrap().to_vec1::<f32>().unwrap(), vec![4f32]);
        assert!(g.get(d.as_tensor()).is_none());
        // One process: nothing is sent and nothing changes.
        let before = g.get(b.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        average_grads(&Single, &mut g, &vars, 5).unwrap();
        assert_eq!(g.get(b.as_tensor()).unwrap().to_vec1::<f32>().unwrap(), before);
    }
}
