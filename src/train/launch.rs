//! What a GPU data-parallel job needs before its first collective, independent of CUDA (so it
//! is built and tested everywhere): the rank layout that a torchrun-style launcher puts in the
//! environment ([`LaunchEnv`]), the exchange of NCCL's 128-byte unique id from rank 0 to the
//! other ranks ([`share_id`]: a small TCP rendezvous at `MASTER_ADDR`, or a file), and a
//! [`Watchdog`] that stops the process when a blocking call outlives its timeout.
//!
//! torchrun: `torchrun --nproc-per-node 8 --no-python tokenar train --gpu --config F`.
//! Environment read:
//!
//! | variable | meaning |
//! |---|---|
//! | `RANK`, `WORLD_SIZE` | this process's rank and the number of ranks (required together) |
//! | `LOCAL_RANK` | the rank on this machine = the CUDA device used (default: `RANK`) |
//! | `MASTER_ADDR`, `MASTER_PORT` | host of rank 0 and the launcher's port |
//! | `TOKENAR_NCCL_PORT` | port of the id rendezvous (default `MASTER_PORT + 1`: the launcher itself listens on `MASTER_PORT`) |
//! | `TOKENAR_NCCL_ID_FILE` | share the id through this file (on a shared file system) instead of TCP |

use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Bytes of an NCCL unique id (`ncclUniqueId`).
pub const ID_BYTES: usize = 128;

/// How rank 0 hands the NCCL id to the other ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rendezvous {
    /// Rank 0 listens at this address; the others connect to it.
    Tcp(String, u16),
    /// Rank 0 writes the id to this file (atomically); the others wait for it.
    File(PathBuf),
}

/// The rank layout of a process started by a torchrun-style launcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchEnv {
    pub rank: usize,
    pub world: usize,
    /// The rank on this machine: the CUDA device ordinal of this process.
    pub local_rank: usize,
    /// `None` for one rank (nothing to exchange).
    pub rendezvous: Option<Rendezvous>,
}

impl LaunchEnv {
    /// Read the layout from the process environment; `Ok(None)` when no launcher set `WORLD_SIZE`.
    pub fn from_env() -> Result<Option<Self>> {
        Self::parse(|k| std::env::var(k).ok())
    }

    /// As [`LaunchEnv::from_env`] with `get` as the environment.
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(world) = get("WORLD_SIZE") else {
            return Ok(None);
        };
        let num = |key: &str, value: &str| -> Result<usize> {
            value.trim().parse::<usize>().map_err(|_| Error::invalid(key, format!("{value:?} is not a non-negative integer")))
        };
        let world = num("WORLD_SIZE", &world)?;
        if world == 0 {
            return Err(Error::invalid("WORLD_SIZE", "0 (must be at least 1)"));
        }
        let rank = match get("RANK") {
            Some(v) => num("RANK", &v)?,
            None if world == 1 => 0,
            None => return Err(Error::invalid("RANK", format!("not set, but WORLD_SIZE is {world}"))),
        };
        if rank >= world {
            return Err(Error::invalid("RANK", format!("{rank} is not below WORLD_SIZE {world}")));
        }
        let local_rank = match get("LOCAL_RANK") {
            Some(v) => num("LOCAL_RANK", &v)?,
            None => rank,
        };
        let rendezvous = if world == 1 {
            None
        } else if let Some(f) = get("TOKENAR_NCCL_ID_FILE").filter(|f| !f.is_empty()) {
            Some(Rendezvous::File(PathBuf::from(f)))
        } else {
            let addr = get("MASTER_ADDR").filter(|a| !a.trim().is_empty()).ok_or_else(|| {
                Error::invalid("MASTER_ADDR", format!("not set, but WORLD_SIZE is {world} (or set TOKENAR_NCCL_ID_FILE)"))
            })?;
            let port = match get("TOKENAR_NCCL_PORT") {
                Some(p) => parse_port("TOKENAR_NCCL_PORT", &p)?,
                None => {
                    let p = get("MASTER_PORT").ok_or_else(|| {
                        Error::invalid("MASTER_PORT", format!("not set, but WORLD_SIZE is {world} (or set TOKENAR_NCCL_PORT)"))
                    })?;
                    let p = parse_port("MASTER_PORT", &p)?;
                    p.checked_add(1).ok_or_else(|| Error::invalid("MASTER_PORT", "65535 leaves no port above it; set TOKENAR_NCCL_PORT"))?
                }
            };
            Some(Rendezvous::Tcp(addr.trim().to_string(), port))
        };
        Ok(Some(Self { rank, world, local_rank, rendezvous }))
    }
}

fn parse_port(key: &str, value: &str) -> Result<u16> {
    match value.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(Error::invalid(key, format!("{value:?} is not a port (1-65535)"))),
    }
}

/// Hand rank 0's `id` to every rank: rank 0 passes `Some(id)` and gets it back; the others pass
/// `None` and get rank 0's. Waits at most `timeout` for the other side.
pub fn share_id(rv: &Rendezvous, rank: usize, world: usize, id: Option<[u8; ID_BYTES]>, timeout: Duration) -> Result<[u8; ID_BYTES]> {
    match (rank, id) {
        (0, Some(id)) => {
            match rv {
                Rendezvous::Tcp(host, port) => serve_id(host, *port, world - 1, &id, timeout)?,
                Rendezvous::File(path) => write_id(path, &id)?,
            }
            Ok(id)
        }
        (0, None) => Err(Error::invalid("NCCL id", "rank 0 must supply the id")),
        (_, Some(_)) => Err(Error::invalid("NCCL id", format!("rank {rank} must not supply an id"))),
        (_, None) => match rv {
            Rendezvous::Tcp(host, port) => fetch_id(host, *port, timeout),
            Rendezvous::File(path) => wait_id(path, timeout),
        },
    }
}

const MAGIC: &[u8; 8] = b"tokenar1";

fn serve_id(host: &str, port: u16, peers: usize, id: &[u8; ID_BYTES], timeout: Duration) -> Result<()> {
    // Listen on every interface of the port: MASTER_ADDR names this host as the others see it.
    let _ = host;
    let listener = TcpListener::bind(("0.0.0.0", port))
        .map_err(|e| Error::invalid("NCCL rendezvous", format!("rank 0 cannot listen on port {port}: {e} (set TOKENAR_NCCL_PORT to a free port)")))?;
    listener.set_nonblocking(true).map_err(|e| Error::invalid("NCCL rendezvous", e.to_string()))?;
    let start = Instant::now();
    let mut served = 0;
    while served < peers {
        match listener.accept() {
            Ok((mut s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
                // A stray connection (a port scan) is not a rank: only count successful sends.
                let mut msg = Vec::with_capacity(MAGIC.len() + ID_BYTES);
                msg.extend_from_slice(MAGIC);
                msg.extend_from_slice(id);
                if s.write_all(&msg).and_then(|_| s.flush()).is_ok() {
                    served += 1;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() > timeout {
                    return Err(Error::invalid(
                        "NCCL rendezvous",
                        format!("rank 0 waited {:.0} s on port {port} and only {served} of {peers} other ranks came", timeout.as_secs_f64()),
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(Error::invalid("NCCL rendezvous", format!("accept on port {port}: {e}"))),
        }
    }
    Ok(())
}

fn fetch_id(host: &str, port: u16, timeout: Duration) -> Result<[u8; ID_BYTES]> {
    let start = Instant::now();
    let mut last_err = String::from("no address");
    loop {
        let addrs: Vec<SocketAddr> = match (host, port).to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => {
                last_err = format!("cannot resolve {host}: {e}");
                Vec::new()
            }
        };
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(mut s) => {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut msg = [0u8; MAGIC.len() + ID_BYTES];
                    match s.read_exact(&mut msg) {
                        Ok(()) if &msg[..MAGIC.len()] == MAGIC => {
                            let mut id = [0u8; ID_BYTES];
                            id.copy_from_slice(&msg[MAGIC.len()..]);
                            return Ok(id);
                        }
                        Ok(()) => last_err = format!("{addr} answered, but not with a tokenar NCCL id"),
                        Err(e) => last_err = format!("reading from {addr}: {e}"),
                    }
                }
                Err(e) => last_err = format!("{addr}: {e}"),
            }
        }
        if start.elapsed() > timeout {
            return Err(Error::invalid(
                "NCCL rendezvous",
                format!("no id from rank 0 at {host}:{port} within {:.0} s (last: {last_err})", timeout.as_secs_f64()),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn write_id(path: &Path, id: &[u8; ID_BYTES]) -> Result<()> {
    // Atomic: a reader never sees half an id.
    let mut data = MAGIC.to_vec();
    data.extend_from_slice(id);
    crate::util::atomic_write(path, &data)
}

fn wait_id(path: &Path, timeout: Duration) -> Result<[u8; ID_BYTES]> {
    let start = Instant::now();
    loop {
        match std::fs::read(path) {
            Ok(data) if data.len() == MAGIC.len() + ID_BYTES && &data[..MAGIC.len()] == MAGIC => {
                let mut id = [0u8; ID_BYTES];
                id.copy_from_slice(&data[MAGIC.len()..]);
                return Ok(id);
            }
            Ok(data) => {
                return Err(Error::invalid(
                    "TOKENAR_NCCL_ID_FILE",
                    format!("{} holds {} bytes, not a tokenar NCCL id (a file of an earlier job? delete it)", path.display(), data.len()),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(path, e)),
        }
        if start.elapsed() > timeout {
            return Err(Error::invalid(
                "NCCL rendezvous",
                format!("rank 0 did not write {} within {:.0} s", path.display(), timeout.as_secs_f64()),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A background thread that calls `on_expire(what, waited)` when an armed wait lasts longer than
/// the timeout. Blocking CUDA/NCCL calls cannot be interrupted, so the NCCL collective arms it
/// around each of them and the expiry handler stops the process with a clear message.
pub struct Watchdog {
    shared: Arc<(Mutex<WatchState>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct WatchState {
    armed: Option<(Instant, String)>,
    /// Counts arm calls, so that a wait re-armed just after expiry is not taken for the old one.
    generation: u64,
    quit: bool,
}

/// Disarms its watchdog when dropped.
pub struct Armed<'a>(&'a Watchdog);

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        let (lock, cv) = &*self.0.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).armed = None;
        cv.notify_all();
    }
}

impl Watchdog {
    pub fn new(timeout: Duration, on_expire: impl Fn(&str, Duration) + Send + 'static) -> Self {
        let shared = Arc::new((Mutex::new(WatchState { armed: None, generation: 0, quit: false }), Condvar::new()));
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("collective-watchdog".into())
            .spawn(move || {
                let (lock, cv) = &*s;
                let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if st.quit {
                        return;
                    }
                    match st.armed.clone() {
                        None => st = cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                        Some((since, what)) => {
                            let waited = since.elapsed();
                            if waited >= timeout {
                                let generation = st.generation;
                                drop(st);
                                on_expire(&what, waited);
                                st = lock.lock().unwrap_or_else(|e| e.into_inner());
                                if st.generation == generation {
                                    st.armed = None;
                                }
                            } else {
                                st = cv.wait_timeout(st, timeout - waited).unwrap_or_else(|e| e.into_inner()).0;
                            }
                        }
                    }
                }
            })
            .expect("spawning the watchdog thread");
        Self { shared, thread: Some(thread) }
    }

    /// Start watching a wait called `what`; it ends when the returned guard is dropped.
    pub fn arm(&self, what: impl Into<String>) -> Armed<'_> {
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        st.armed = Some((Instant::now(), what.into()));
        st.generation += 1;
        cv.notify_all();
        Armed(self)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        {
            let (lock, cv) = &*self.shared;
            lock.lock().unwrap_or_else(|e| e.into_inner()).quit = true;
            cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn torchrun_environment_is_parsed() {
        assert_eq!(LaunchEnv::parse(env(&[])).unwrap(), None);
        let e = LaunchEnv::parse(env(&[("WORLD_SIZE", "4"), ("RANK", "2"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "node1"), ("MASTER_PORT", "29500")]))
            .unwrap()
            .unwrap();
        assert_eq!(e, LaunchEnv { rank: 2, world: 4, local_rank: 0, rendezvous: Some(Rendezvous::Tcp("node1".into(), 29501)) });
        // TOKENAR_NCCL_PORT overrides the port; the id file overrides TCP; LOCAL_RANK defaults to RANK.
        let e = LaunchEnv::parse(env(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1"), ("TOKENAR_NCCL_PORT", "7000")]))
            .unwrap()
            .unwrap();
        assert_eq!(e, LaunchEnv { rank: 1, world: 2, local_rank: 1, rendezvous: Some(Rendezvous::Tcp("h".into(), 7000)) });
        let e = LaunchEnv::parse(env(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("TOKENAR_NCCL_ID_FILE", "/shared/id")])).unwrap().unwrap();
        assert_eq!(e.rendezvous, Some(Rendezvous::File("/shared/id".into())));
        // One rank needs no address and no RANK.
        let e = LaunchEnv::parse(env(&[("WORLD_SIZE", "1")])).unwrap().unwrap();
        assert_eq!(e, LaunchEnv { rank: 0, world: 1, local_rank: 0, rendezvous: None });
    }

    #[test]
    fn bad_launch_environment_names_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("WORLD_SIZE", "two")], "WORLD_SIZE"),
            (&[("WORLD_SIZE", "0")], "WORLD_SIZE"),
            (&[("WORLD_SIZE", "2")], "RANK"),
            (&[("WORLD_SIZE", "2"), ("RANK", "2")], "RANK"),
            (&[("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "-1")], "LOCAL_RANK"),
            (&[("WORLD_SIZE", "2"), ("RANK", "0")], "MASTER_ADDR"),
            (&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "h")], "MASTER_PORT"),
            (&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "70000")], "MASTER_PORT"),
            (&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "65535")], "MASTER_PORT"),
            (&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "h"), ("TOKENAR_NCCL_PORT", "0")], "TOKENAR_NCCL_PORT"),
        ];
        for (pairs, key) in cases {
            let msg = LaunchEnv::parse(env(pairs)).unwrap_err().to_string();
            assert!(msg.contains(key), "{pairs:?}: {msg}");
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
    }

    fn id_of(seed: u8) -> [u8; ID_BYTES] {
        std::array::from_fn(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
    }

    #[test]
    fn id_reaches_every_rank_over_tcp() {
        let rv = Rendezvous::Tcp("127.0.0.1".into(), free_port());
        let t = Duration::from_secs(20);
        // The other ranks start first (they retry until rank 0 listens).
        let others: Vec<_> = (1..3)
            .map(|r| {
                let rv = rv.clone();
                std::thread::spawn(move || share_id(&rv, r, 3, None, t).unwrap())
            })
            .collect();
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(share_id(&rv, 0, 3, Some(id_of(3)), t).unwrap(), id_of(3));
        for h in others {
            assert_eq!(h.join().unwrap(), id_of(3));
        }
    }

    #[test]
    fn id_reaches_every_rank_through_a_file() {
        let dir = std::env::temp_dir().join(format!("tokenar-nccl-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rv = Rendezvous::File(dir.join("id"));
        let t = Duration::from_secs(20);
        let rv1 = rv.clone();
        let other = std::thread::spawn(move || share_id(&rv1, 1, 2, None, t).unwrap());
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(share_id(&rv, 0, 2, Some(id_of(9)), t).unwrap(), id_of(9));
        assert_eq!(other.join().unwrap(), id_of(9));
        // A file that is not an id is refused, naming the file.
        std::fs::write(dir.join("id"), b"junk").unwrap();
        let msg = share_id(&rv, 1, 2, None, t).unwrap_err().to_string();
        assert!(msg.contains("TOKENAR_NCCL_ID_FILE") && msg.contains("4 bytes"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_rank_zero_times_out_with_a_clear_error() {
        let port = free_port();
        let msg = share_id(&Rendezvous::Tcp("127.0.0.1".into(), port), 1, 2, None, Duration::from_millis(300)).unwrap_err().to_string();
        assert!(msg.contains(&format!("127.0.0.1:{port}")) && msg.contains("no id from rank 0"), "{msg}");
        // Rank 0 alone: the other rank never comes.
        let msg = share_id(&Rendezvous::Tcp("127.0.0.1".into(), port), 0, 2, Some(id_of(1)), Duration::from_millis(300)).unwrap_err().to_string();
        assert!(msg.contains("only 0 of 1 other ranks"), "{msg}");
        assert!(share_id(&Rendezvous::File("x".into()), 0, 2, None, Duration::ZERO).is_err());
    }

    #[test]
    fn watchdog_fires_only_for_a_wait_past_its_timeout() {
        let fired = Arc::new(Mutex::new(Vec::<String>::new()));
        let f = fired.clone();
        let dog = Watchdog::new(Duration::from_millis(200), move |what, waited| {
            assert!(waited >= Duration::from_millis(200));
            f.lock().unwrap().push(what.to_string());
        });
        {
            let _g = dog.arm("quick all-reduce");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        assert!(fired.lock().unwrap().is_empty());
        {
            let _g = dog.arm("stuck all-reduce");
            std::thread::sleep(Duration::from_millis(500));
        }
        assert_eq!(*fired.lock().unwrap(), vec!["stuck all-reduce".to_string()]);
        drop(dog);
    }
}
