//! Block hashes and volume digests.
//!
//! Why BLAKE3: the hashed data belongs to tenants. A guest that can craft two blocks with
//! the same non-cryptographic hash (xxh3 collisions are cheap to construct) could make a
//! changed block look unchanged, and the replica would silently diverge while the digests,
//! built from the same hashes, still agree. BLAKE3 is cryptographic and still fast: the
//! crate's AVX2/AVX-512 assembly hashes several GB/s on one core, more than this disk
//! reads, so hashing is never the bottleneck of a sync (the benchmark prints both).
//!
//! Definitions (both agents compute the same values, so they never compare raw data):
//! - block hash: `blake3(block bytes)`; blocks are `block_size` bytes, the last may be short.
//! - file digest: `blake3("drplane.file.v1\0" ‖ le64 size ‖ le32 block_size ‖ h0 ‖ h1 ‖ …)`.
//!   One hash per block is computed on each side anyway, so the digest costs no second pass.
//! - disk and database volumes: the digest of their one file.
//! - share: `blake3("drplane.share.v1\0" ‖ for each entry in path order: le32 len ‖ path ‖
//!   kind ‖ le32 mode ‖ le64 size ‖ le32 len ‖ link target ‖ file digest or 32 zero bytes)`.
//!
//! A digest depends on the block size; everything uses 1 MiB unless a sync asks otherwise.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use crate::driver::{Digest, VolumeKind};
use crate::manifest::{Entry, EntryKind};

pub type Hash = [u8; 32];

pub fn block_hash(data: &[u8]) -> Hash {
    *blake3::hash(data).as_bytes()
}

/// The hash of `len` zero bytes (cached: sparse images are mostly zero blocks).
pub fn zero_hash(len: usize) -> Hash {
    static CACHE: OnceLock<Mutex<HashMap<usize, Hash>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Ok(map) = cache.lock() {
        if let Some(h) = map.get(&len) {
            return *h;
        }
    }
    let h = block_hash(&vec![0u8; len]);
    if let Ok(mut map) = cache.lock() {
        if map.len() < 64 {
            map.insert(len, h);
        }
    }
    h
}

pub fn block_count(size: u64, block_size: u32) -> u64 {
    size.div_ceil(block_size as u64)
}

/// Length of block `index` of a file of `size` bytes.
pub fn block_len(size: u64, block_size: u32, index: u64) -> usize {
    let start = index * block_size as u64;
    (size.saturating_sub(start)).min(block_size as u64) as usize
}

pub struct FileDigester {
    hasher: blake3::Hasher,
}

impl FileDigester {
    pub fn new(size: u64, block_size: u32) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"drplane.file.v1\0");
        hasher.update(&size.to_le_bytes());
        hasher.update(&block_size.to_le_bytes());
        FileDigester { hasher }
    }

    pub fn push(&mut self, block: &Hash) {
        self.hasher.update(block);
    }

    pub fn finish(&self) -> Digest {
        Digest(*self.hasher.finalize().as_bytes())
    }
}

/// The volume digest from its manifest and the digests of its FILE entries (indexed like
/// `entries`; other kinds' slots are ignored).
pub fn volume_digest(kind: VolumeKind, entries: &[Entry], file_digests: &[Digest]) -> Digest {
    if kind.is_file() {
        return file_digests.first().copied().unwrap_or_default();
    }
    let mut h = blake3::Hasher::new();
    h.update(b"drplane.share.v1\0");
    for (i, e) in entries.iter().enumerate() {
        h.update(&(e.path.len() as u32).to_le_bytes());
        h.update(e.path.as_bytes());
        h.update(&[e.kind as u8]);
        h.update(&e.mode.to_le_bytes());
        h.update(&e.size.to_le_bytes());
        h.update(&(e.link_target.len() as u32).to_le_bytes());
        h.update(e.link_target.as_bytes());
        match e.kind {
            EntryKind::File => h.update(&file_digests.get(i).copied().unwrap_or_default().0),
            _ => h.update(&[0u8; 32]),
        };
    }
    Digest(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_geometry() {
        assert_eq!(block_count(0, 4096), 0);
        assert_eq!(block_count(1, 4096), 1);
        assert_eq!(block_count(8192, 4096), 2);
        assert_eq!(block_len(10_000, 4096, 2), 10_000 - 8192);
        assert_eq!(block_len(10_000, 4096, 3), 0);
    }

    #[test]
    fn zero_hash_matches() {
        assert_eq!(zero_hash(100), block_hash(&[0u8; 100]));
        assert_eq!(zero_hash(100), zero_hash(100));
    }
}
