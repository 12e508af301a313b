//! The sync journal: how a target changes its copy in place without ever holding a mix.
//!
//! ```text
//!  "DRPJRNL1" | le32 n | header (JSON: kind, block size, manifest)
//!  record*    : 0x01 | le32 file | le64 offset | le32 len | data
//!  commit     : 0x02 | le64 records | blake3(every byte before this commit record)
//! ```
//!
//! Life of a sync on the target: records are appended while blocks arrive; once the copy
//! they describe has been verified against the source's digest the commit record is
//! appended, the journal fdatasync'ed and its directory fsync'ed. Only then is the image
//! touched: records are written in place, sizes set, the image synced, and the journal
//! removed. On open, a journal with a valid commit is replayed (replay is idempotent: it
//! writes the same bytes again) and any other journal is discarded. A crash before the
//! commit is durable therefore leaves the previous copy; after it, the new one.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::driver::{DriverError, IoContext, Result, VolumeKind};
use crate::manifest::Entry;

const MAGIC: &[u8; 8] = b"DRPJRNL1";
const TAG_RECORD: u8 = 1;
const TAG_COMMIT: u8 = 2;
const MAX_HEADER: u32 = 1 << 30;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalHeader {
    pub kind: VolumeKind,
    pub block_size: u32,
    pub entries: Vec<Entry>,
}

pub struct JournalWriter {
    path: PathBuf,
    out: BufWriter<File>,
    hasher: blake3::Hasher,
    records: u64,
}

impl JournalWriter {
    pub fn create(path: &Path, header: &JournalHeader) -> Result<Self> {
        let file = File::create(path).ctx(|| format!("create journal {}", path.display()))?;
        let mut w = JournalWriter {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 20, file),
            hasher: blake3::Hasher::new(),
            records: 0,
        };
        let json = serde_json::to_vec(header)
            .map_err(|e| DriverError::Corrupt(format!("encode journal header: {e}")))?;
        w.put(MAGIC)?;
        w.put(&(json.len() as u32).to_le_bytes())?;
        w.put(&json)?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.hasher.update(b);
        let path = &self.path;
        self.out
            .write_all(b)
            .ctx(|| format!("write journal {}", path.display()))
    }

    pub fn append(&mut self, file: u32, offset: u64, data: &[u8]) -> Result<()> {
        let mut head = [0u8; 17];
        head[0] = TAG_RECORD;
        head[1..5].copy_from_slice(&file.to_le_bytes());
        head[5..13].copy_from_slice(&offset.to_le_bytes());
        head[13..17].copy_from_slice(&(data.len() as u32).to_le_bytes());
        self.put(&head)?;
        self.put(data)?;
        self.records += 1;
        Ok(())
    }

    /// Flush the records without a commit (a test crash point: an incomplete journal).
    pub fn flush_uncommitted(mut self) -> Result<()> {
        let path = self.path.clone();
        self.out
            .flush()
            .ctx(|| format!("flush journal {}", path.display()))?;
        let file = self.out.get_ref();
        file.sync_data()
            .ctx(|| format!("sync journal {}", path.display()))
    }

    /// Append the commit record and make the journal durable, directory entry included.
    pub fn commit(mut self) -> Result<u64> {
        let digest = *self.hasher.finalize().as_bytes();
        let mut tail = [0u8; 41];
        tail[0] = TAG_COMMIT;
        tail[1..9].copy_from_slice(&self.records.to_le_bytes());
        tail[9..41].copy_from_slice(&digest);
        let path = self.path.clone();
        self.out
            .write_all(&tail)
            .and_then(|_| self.out.flush())
            .ctx(|| format!("write journal {}", path.display()))?;
        self.out
            .get_ref()
            .sync_data()
            .ctx(|| format!("sync journal {}", path.display()))?;
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        Ok(self.records)
    }
}

/// A record found by [`read`]: where its data sits in the journal file.
#[derive(Debug, Clone, Copy)]
pub struct Record {
    pub file: u32,
    pub offset: u64,
    pub len: u32,
    pub pos: u64,
}

pub struct Committed {
    pub header: JournalHeader,
    pub records: Vec<Record>,
    pub file: File,
}

impl Committed {
    pub fn read_record(&self, r: &Record, buf: &mut Vec<u8>) -> Result<()> {
        buf.resize(r.len as usize, 0);
        self.file
            .read_exact_at(buf, r.pos)
            .ctx(|| "read journal record".to_string())
    }
}

/// Read a journal. `Ok(None)`: it is incomplete (no commit record, or its checksum does not
/// match) and must be discarded.
pub fn read(path: &Path) -> Result<Option<Committed>> {
    let file = File::open(path).ctx(|| format!("open journal {}", path.display()))?;
    let len = file
        .metadata()
        .ctx(|| format!("stat journal {}", path.display()))?
        .len();
    let mut r = Reader {
        inner: std::io::BufReader::with_capacity(1 << 20, &file),
        hasher: blake3::Hasher::new(),
        pos: 0,
        path,
    };
    let mut magic = [0u8; 8];
    if !r.take(&mut magic, true)? || &magic != MAGIC {
        return Ok(None);
    }
    let mut n = [0u8; 4];
    if !r.take(&mut n, true)? {
        return Ok(None);
    }
    let n = u32::from_le_bytes(n);
    if n > MAX_HEADER || n as u64 > len {
        return Ok(None);
    }
    let mut json = vec![0u8; n as usize];
    if !r.take(&mut json, true)? {
        return Ok(None);
    }
    let Ok(header) = serde_json::from_slice::<JournalHeader>(&json) else {
        return Ok(None);
    };
    let mut records = Vec::new();
    let mut data = Vec::new();
    loop {
        let mut tag = [0u8; 1];
        // The commit tag is not part of the hashed prefix.
        if !r.take(&mut tag, false)? {
            return Ok(None);
        }
        match tag[0] {
            TAG_RECORD => {
                r.hasher.update(&tag);
                let mut head = [0u8; 16];
                if !r.take(&mut head, true)? {
                    return Ok(None);
                }
                let file_idx = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
                let mut off = [0u8; 8];
                off.copy_from_slice(&head[4..12]);
                let offset = u64::from_le_bytes(off);
                let dlen = u32::from_le_bytes([head[12], head[13], head[14], head[15]]);
                if r.pos + dlen as u64 > len {
                    return Ok(None);
                }
                let at = r.pos;
                data.resize(dlen as usize, 0);
                if !r.take(&mut data, true)? {
                    return Ok(None);
                }
                records.push(Record {
                    file: file_idx,
                    offset,
                    len: dlen,
                    pos: at,
                });
            }
            TAG_COMMIT => {
                let mut tail = [0u8; 40];
                if !r.take(&mut tail, false)? {
                    return Ok(None);
                }
                let mut cnt = [0u8; 8];
                cnt.copy_from_slice(&tail[0..8]);
                let expect = *r.hasher.finalize().as_bytes();
                if u64::from_le_bytes(cnt) != records.len() as u64 || tail[8..40] != expect {
                    return Ok(None);
                }
                drop(r);
                return Ok(Some(Committed {
                    header,
                    records,
                    file,
                }));
            }
            _ => return Ok(None),
        }
    }
}

struct Reader<'a> {
    inner: std::io::BufReader<&'a File>,
    hasher: blake3::Hasher,
    pos: u64,
    path: &'a Path,
}

impl Reader<'_> {
    /// Reads exactly `buf.len()` bytes; `false` at the end of the file (an incomplete
    /// journal).
    fn take(&mut self, buf: &mut [u8], hash: bool) -> Result<bool> {
        match self.inner.read_exact(buf) {
            Ok(()) => {
                if hash {
                    self.hasher.update(buf);
                }
                self.pos += buf.len() as u64;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(DriverError::io(
                format!("read journal {}", self.path.display()),
                e,
            )),
        }
    }
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("sync directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::EntryKind;

    fn header() -> JournalHeader {
        JournalHeader {
            kind: VolumeKind::Disk,
            block_size: 65536,
            entries: vec![Entry {
                path: String::new(),
                kind: EntryKind::File,
                mode: 0o644,
                size: 10,
                link_target: String::new(),
            }],
        }
    }

    #[test]
    fn commit_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let mut w = JournalWriter::create(&p, &header()).unwrap();
        w.append(0, 0, b"hello").unwrap();
        w.append(0, 5, b"world").unwrap();
        assert_eq!(w.commit().unwrap(), 2);
        let c = read(&p).unwrap().unwrap();
        assert_eq!(c.records.len(), 2);
        let mut buf = Vec::new();
        c.read_record(&c.records[1], &mut buf).unwrap();
        assert_eq!(buf, b"world");
        assert_eq!(c.header.block_size, 65536);
    }

    #[test]
    fn every_truncation_is_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let mut w = JournalWriter::create(&p, &header()).unwrap();
        w.append(0, 0, b"hello").unwrap();
        w.commit().unwrap();
        let full = std::fs::read(&p).unwrap();
        for cut in 0..full.len() {
            std::fs::write(&p, &full[..cut]).unwrap();
            assert!(read(&p).unwrap().is_none(), "cut at {cut}");
        }
        // A flipped byte anywhere is caught by the commit checksum.
        for i in 0..full.len() {
            let mut bad = full.clone();
            bad[i] ^= 0x40;
            std::fs::write(&p, &bad).unwrap();
            assert!(read(&p).unwrap().is_none(), "flip at {i}");
        }
        std::fs::write(&p, &full).unwrap();
        assert!(read(&p).unwrap().is_some());
    }

    #[test]
    fn uncommitted_is_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let mut w = JournalWriter::create(&p, &header()).unwrap();
        w.append(0, 0, b"hello").unwrap();
        w.flush_uncommitted().unwrap();
        assert!(read(&p).unwrap().is_none());
    }
}
