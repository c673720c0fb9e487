//! What made a file set: content fingerprints of a tokenizer file and of a dataset, recorded by
//! a code cache and a training run so that a rerun with another maker is refused instead of
//! silently mixing the two (see `cache::CacheMaker`).
//!
//! The fingerprint is a 128-bit FNV-1a hash (two 64-bit lanes with different offsets, fed
//! 8 bytes at a time): it tells files apart, it is not a cryptographic hash.

use super::format::Dataset;
use crate::error::{IoContext, Result};
use std::io::Read;
use std::path::Path;

const PRIME: u64 = 0x0000_0100_0000_01b3;
const OFFSETS: [u64; 2] = [0xcbf2_9ce4_8422_2325, 0x6c62_272e_07bb_0142];

/// A running 128-bit fingerprint.
#[derive(Clone, Debug)]
pub struct Fingerprint {
    lanes: [u64; 2],
    len: u64,
    tail: Vec<u8>,
}

impl Default for Fingerprint {
    fn default() -> Self {
        Self { lanes: OFFSETS, len: 0, tail: Vec::with_capacity(8) }
    }
}

impl Fingerprint {
    fn word(&mut self, w: u64) {
        self.lanes[0] = (self.lanes[0] ^ w).wrapping_mul(PRIME);
        self.lanes[1] = (self.lanes[1] ^ w.rotate_left(29)).wrapping_mul(PRIME).rotate_left(17);
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        self.len += bytes.len() as u64;
        if !self.tail.is_empty() {
            let take = (8 - self.tail.len()).min(bytes.len());
            self.tail.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.tail.len() == 8 {
                let w = u64::from_le_bytes(self.tail[..8].try_into().unwrap_or([0; 8]));
                self.tail.clear();
                self.word(w);
            }
        }
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.word(u64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
        }
        self.tail.extend_from_slice(chunks.remainder());
    }

    /// A string field: its length first, so that ("ab", "c") and ("a", "bc") differ.
    pub fn field(&mut self, s: &str) {
        self.update(&(s.len() as u64).to_le_bytes());
        self.update(s.as_bytes());
    }

    /// 32 hex digits.
    pub fn hex(mut self) -> String {
        let mut last = [0u8; 8];
        last[..self.tail.len()].copy_from_slice(&self.tail);
        let w = u64::from_le_bytes(last);
        self.word(w);
        self.word(self.len);
        format!("{:016x}{:016x}", self.lanes[0], self.lanes[1])
    }
}

/// The fingerprint of a file's bytes (read in 1 MiB pieces).
pub fn file_fingerprint(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_path(path)?;
    let mut fp = Fingerprint::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_path(path)?;
        if n == 0 {
            break;
        }
        fp.update(&buf[..n]);
    }
    Ok(fp.hex())
}

/// The identity of a dataset's content as opened: every good sample's id and prompt, and each
/// of its files' path relative to the root and size in bytes (files are not read, so this is
/// cheap; an image rewritten with the same size is not noticed). Skipped samples count by id.
pub fn dataset_identity(ds: &Dataset) -> String {
    let mut fp = Fingerprint::default();
    let rel = |p: &Path| p.strip_prefix(&ds.root).unwrap_or(p).to_string_lossy().into_owned();
    for s in &ds.samples {
        fp.field(&s.id);
        fp.field(&s.prompt);
        let files = s.refs.iter().chain([&s.background]).chain(s.target.iter()).chain(s.mask.iter());
        for f in files {
            fp.field(&rel(f));
            let size = std::fs::metadata(f).map(|m| m.len()).unwrap_or(u64::MAX);
            fp.update(&size.to_le_bytes());
        }
    }
    for (id, _) in &ds.skipped {
        fp.field("skipped");
        fp.field(id);
    }
    fp.hex()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_split_independent_and_tells_bytes_apart() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let whole = {
            let mut f = Fingerprint::default();
            f.update(&data);
            f.hex()
        };
        for cut in [0, 1, 7, 8, 9, 500, 999, 1000] {
            let mut f = Fingerprint::default();
            f.update(&data[..cut]);
            f.update(&data[cut..]);
            assert_eq!(f.hex(), whole, "cut at {cut}");
        }
        let mut other = data.clone();
        other[500] ^= 1;
        let mut f = Fingerprint::default();
        f.update(&other);
        assert_ne!(f.hex(), whole);
        // A trailing zero byte changes the length, hence the fingerprint.
        let mut f = Fingerprint::default();
        f.update(&[data.as_slice(), &[0]].concat());
        assert_ne!(f.hex(), whole);
        assert_eq!(whole.len(), 32);
        let (mut a, mut b) = (Fingerprint::default(), Fingerprint::default());
        a.field("ab");
        a.field("c");
        b.field("a");
        b.field("bc");
        assert_ne!(a.hex(), b.hex());
    }
}
