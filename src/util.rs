//! Small shared helpers: atomic file writes, seeded RNGs, device selection, the thread pool.

use crate::error::{Error, IoContext, Result};
use rand::SeedableRng;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The RNG used everywhere a random draw is made. Always built from an explicit seed.
pub type Rng = rand_chacha::ChaCha8Rng;

/// Settings for mimalloc, the allocator of this project's binaries (`src/main.rs`,
/// `benches/`): freed memory stays mapped for reuse instead of being returned to the system
/// 10 ms later. candle allocates a fresh buffer for every op and every accumulated gradient;
/// returned pages come back zero-filled through page faults (a fifth of a training step's
/// profile). Training step of the 256-dim anchor 1,328-1,416 -> 1,137-1,192 ms, peak memory
/// +8%. Harmless where another allocator is in use (it only sets an option).
pub fn tune_allocator() {
    extern "C" {
        fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    }
    // `mi_option_purge_delay` in mimalloc's `mi_option_t` (numbers are kept stable across
    // versions: retired options stay in the enum as `deprecated_*`); -1 = never purge.
    const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;
    // SAFETY: mimalloc is linked (a dependency of this crate); setting an option is allowed at
    // any time and only changes when freed memory is returned to the system.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

/// Run `f` on a worker thread of rayon's global pool, the pool candle's CPU kernels run on.
/// Called from outside the pool, every parallel kernel hands its work over and sleeps until
/// it is done: a wake-up round trip per op, which costs a small model's decoding step about
/// a fifth of its time. From inside, the calling worker does the work itself (and shares it
/// when the pool has more threads). The pool is built here, if nothing built it yet, with
/// the thread count of `RAYON_NUM_THREADS` and 32 MiB stacks (candle's backward pass walks
/// the graph recursively).
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // Err only when the pool already exists; it is then used as it is.
    let _ = rayon::ThreadPoolBuilder::new().stack_size(32 << 20).build_global();
    rayon::scope(|_| f())
}

/// One SplitMix64 step: `z` advanced by the golden-ratio increment, then finalised. Adjacent
/// inputs give decorrelated outputs, so `splitmix64(seed + i * 0x9E37_79B9_7F4A_7C15)` for
/// i = 0, 1, ... is the SplitMix64 stream started at `seed`.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub fn rng(seed: u64) -> Rng {
    Rng::seed_from_u64(seed)
}

/// The temporary path used while writing `path` (same folder, so the rename is atomic).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".to_string());
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Write a file atomically: the content goes to a temporary file in the same folder, which is
/// flushed and then renamed over `path`. A crash never leaves a half-written `path`.
pub fn atomic_write_with<F>(path: impl AsRef<Path>, write: F) -> Result<()>
where
    F: FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>,
{
    let path = path.as_ref();
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).with_path(parent)?;
        }
    }
    let tmp = temp_path(path);
    let result = (|| {
        let file = std::fs::File::create(&tmp).with_path(&tmp)?;
        let mut w = std::io::BufWriter::new(file);
        write(&mut w)?;
        w.flush().with_path(&tmp)?;
        let file = w
            .into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?;
        file.sync_all().with_path(&tmp)?;
        std::fs::rename(&tmp, path).with_path(path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

pub fn atomic_write(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let p = path.as_ref().to_path_buf();
    atomic_write_with(path, |w| w.write_all(bytes).with_path(&p))
}

/// The device of a command: CUDA device 0 with `gpu` (`--gpu`), else the CPU. Asking for a GPU
/// from a build without CUDA, or where no CUDA device answers, is an error that says so.
pub fn device(gpu: bool) -> Result<candle_core::Device> {
    if !gpu {
        return Ok(candle_core::Device::Cpu);
    }
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::invalid(
            "--gpu",
            "this binary was built without CUDA support (build with `cargo build --release --features cuda`)",
        ));
    }
    candle_core::Device::new_cuda(0).map_err(|e| {
        // candle attaches a backtrace when RUST_BACKTRACE is set; the message is the cause.
        let e = match e {
            candle_core::Error::WithBacktrace { inner, .. } => *inner,
            e => e,
        };
        Error::invalid("--gpu", format!("CUDA device 0 is not usable: {e}"))
    })
}

/// CUDA device 0 when this build has CUDA and a device answers, else the CPU: for jobs that
/// only run faster on a GPU (encoding a dataset, scoring a model).
pub fn best_device() -> candle_core::Device {
    device(true).unwrap_or(candle_core::Device::Cpu)
}

/// Largest `--size` (pixels a side) of commands that only read, resize or draw images
/// (`data synth`, sheets): a 4096 x 4096 RGB image is 48 MiB.
pub const MAX_IMAGE_SIZE: u32 = 4096;
/// Largest `--size` of commands that run images through a tokenizer or a model (`data
/// encode`, `eval`, `tokenizer roundtrip`): the tokenizer's activations grow with the square
/// of the side (hundreds of MiB per image at 1024 px on a CPU).
pub const MAX_CODED_IMAGE_SIZE: u32 = 1024;
/// Largest batch of samples run through a model at once (`data encode --batch`, a training
/// batch, `bench --train-batch`).
pub const MAX_BATCH: usize = 256;
/// Most images one generation makes (`generate --num-samples`: one batch, whose cache grows
/// with it).
pub const MAX_SAMPLES: usize = 64;

/// `value` of `flag` must lie in `min..=max`; the error names the flag, the value and the
/// range.
pub fn check_range<T: PartialOrd + std::fmt::Display>(flag: &str, value: T, min: T, max: T) -> Result<()> {
    if value < min || value > max {
        return Err(Error::invalid(flag, format!("{value} is out of range (allowed: {min} to {max})")));
    }
    Ok(())
}

/// An image side for commands that only handle pixels: 1 to [`MAX_IMAGE_SIZE`].
pub fn check_image_size(flag: &str, value: u32) -> Result<()> {
    check_range(flag, value, 1, MAX_IMAGE_SIZE)
}

/// An image side for commands that run a tokenizer or a model: 8 to [`MAX_CODED_IMAGE_SIZE`].
pub fn check_coded_image_size(flag: &str, value: u32) -> Result<()> {
    check_range(flag, value, 8, MAX_CODED_IMAGE_SIZE)
}

/// A batch size: 1 to [`MAX_BATCH`].
pub fn check_batch(flag: &str, value: usize) -> Result<()> {
    check_range(flag, value, 1, MAX_BATCH)
}

/// A number of images to generate: 1 to [`MAX_SAMPLES`].
pub fn check_samples(flag: &str, value: usize) -> Result<()> {
    check_range(flag, value, 1, MAX_SAMPLES)
}

/// Memory the system can give without swapping (`MemAvailable` of `/proc/meminfo`), in bytes;
/// `None` where that is unknown (not Linux).
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Bytes as "1.5 GiB" / "12.0 MiB".
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

/// The memory budget check made before a large allocation: `bytes` (what `what` needs, an
/// estimate) must fit in the memory available now (see [`available_memory`]); where that is
/// unknown, in 1 TiB (no machine this runs on holds more, and beyond it sizes are corrupt).
/// The error says how much is needed and how much is there, so a smaller setting can be
/// chosen, instead of an abort or a kill by the system.
pub fn check_memory(what: &str, bytes: u64) -> Result<()> {
    check_memory_within(what, bytes, available_memory().unwrap_or(1 << 40))
}

fn check_memory_within(what: &str, bytes: u64, available: u64) -> Result<()> {
    if bytes > available {
        return Err(Error::invalid(
            what,
            format!("needs about {} of memory but {} is available", human_bytes(bytes), human_bytes(available)),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_request_on_a_cpu_build_is_an_error() {
        assert!(device(false).unwrap().is_cpu());
        if !candle_core::utils::cuda_is_available() {
            let e = device(true).unwrap_err().to_string();
            assert!(e.contains("--gpu") && e.contains("--features cuda"), "{e}");
            assert!(best_device().is_cpu());
        }
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("tokenar-util-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.txt");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // A failing writer leaves the old content in place.
        let r = atomic_write_with(&p, |_| Err(Error::invalid("x", "y")));
        assert!(r.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn limits_name_the_flag_and_the_range() {
        let e = check_image_size("--size", 100_000).unwrap_err().to_string();
        assert!(e.contains("--size") && e.contains("100000") && e.contains("4096"), "{e}");
        assert!(check_image_size("--size", 0).is_err());
        check_image_size("--size", 64).unwrap();
        let e = check_coded_image_size("--size", 2048).unwrap_err().to_string();
        assert!(e.contains("1024"), "{e}");
        let e = check_samples("--num-samples", 100_000).unwrap_err().to_string();
        assert!(e.contains("--num-samples") && e.contains("1 to 64"), "{e}");
        assert!(check_samples("--num-samples", usize::MAX).is_err());
        check_samples("--num-samples", 1).unwrap();
        let e = check_batch("batch", 100_000).unwrap_err().to_string();
        assert!(e.contains("batch") && e.contains("1 to 256"), "{e}");
        assert!(check_batch("batch", 0).is_err());
    }

    #[test]
    fn memory_budget() {
        assert_eq!(parse_mem_available("MemTotal: 10 kB\nMemAvailable:    2048 kB\n"), Some(2 << 20));
        assert_eq!(parse_mem_available("MemTotal: 10 kB\n"), None);
        let e = check_memory_within("model", 3 << 30, 1 << 30).unwrap_err().to_string();
        assert!(e.contains("model") && e.contains("3.0 GiB") && e.contains("1.0 GiB"), "{e}");
        check_memory_within("model", 1 << 20, 1 << 30).unwrap();
        // 4 TB is more than any machine this runs on has.
        assert!(check_memory("tensor", 4 << 40).is_err());
    }
}
