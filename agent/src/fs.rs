//! The `fs` driver: real data on the agent's filesystem.
//!
//! ```text
//! <data>/pools/<pool>/<volume>/
//!     volume.json      spec as created (kind, pool, provisioned size, reserved)
//!     data             disk/database: raw image file; share: the directory tree
//!     FENCED           present while fenced: JSON of the permission bits to restore
//!     journal          a sync in progress or awaiting replay (see journal.rs)
//!     data.sync-new    a full copy being written for an empty target (renamed over data)
//! <data>/pools/<pool>/.<volume>.creating-*, .<volume>.deleting-*   crash leftovers, removed on open
//! ```
//!
//! Fencing writes the marker first, then strips the write bits; promote restores the bits
//! the marker recorded, then removes it. The agent may run as root, for whom permission
//! bits are advisory: the driver itself refuses workload writes to a fenced volume, and a
//! sync writes only into a fenced one.
//!
//! Each volume has a reader-writer lock: serving a sync and computing a checksum share it
//! (a consistent point-in-time read), workload writes, fence, promote, delete and an
//! incoming sync take it alone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument, warn};

use crate::digest::{self, FileDigester};
use crate::driver::*;
use crate::journal::{self, sync_dir};
use crate::manifest::{self, safe_join, Entry, EntryKind};

pub const DEFAULT_POOL: &str = "default";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolConfig {
    pub name: String,
    /// Bytes the pool's volumes may provision; `None`: the filesystem's free space.
    #[serde(default)]
    pub capacity_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FsConfig {
    pub data_dir: PathBuf,
    /// Empty means one pool named "default" without a quota.
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    /// Mutual TLS for the block-sync service and the syncs this agent pulls.
    #[serde(skip)]
    pub tls: Option<crate::tls::AgentTls>,
}

impl FsConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        FsConfig {
            data_dir: data_dir.into(),
            pools: Vec::new(),
            tls: None,
        }
    }

    pub fn with_pool(mut self, name: &str, capacity_bytes: Option<u64>) -> Self {
        self.pools.push(PoolConfig {
            name: name.to_string(),
            capacity_bytes,
        });
        self
    }
}

/// Where a test can make the target "crash" during a sync: the sync returns
/// `DriverError::Injected` and leaves the files as a killed process would. Reopening the
/// driver (or the volume's next operation) recovers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// All blocks journaled and flushed, commit record not written.
    BeforeCommit,
    /// Journal committed and durable, nothing applied.
    AfterCommit,
    /// Journal committed, this many records written in place.
    MidApply(usize),
    /// Shadow copy written and synced, not renamed over the image.
    BeforeRename,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct VolumeMeta {
    pub id: String,
    pub kind: VolumeKind,
    pub pool: String,
    pub size_bytes: u64,
    pub reserved: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct FenceMarker {
    /// Permission bits to restore on promote, by relative path ("" is the image file or
    /// the share's root directory).
    pub modes: BTreeMap<String, u32>,
}

pub(crate) struct Vol {
    pub id: String,
    pub dir: PathBuf,
    pub meta: Mutex<VolumeMeta>,
    pub lock: Arc<RwLock<()>>,
    pub needs_recovery: AtomicBool,
    pub deleted: AtomicBool,
}

impl Vol {
    pub fn data_path(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn journal_path(&self) -> PathBuf {
        self.dir.join("journal")
    }
    pub fn shadow_path(&self) -> PathBuf {
        self.dir.join("data.sync-new")
    }
    pub fn marker_path(&self) -> PathBuf {
        self.dir.join("FENCED")
    }
    pub fn meta(&self) -> VolumeMeta {
        match self.meta.lock() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
    pub fn kind(&self) -> VolumeKind {
        self.meta().kind
    }
    pub fn is_fenced(&self) -> bool {
        self.marker_path().exists()
    }
    fn check_live(&self) -> Result<()> {
        if self.deleted.load(Ordering::SeqCst) {
            Err(DriverError::NotFound(self.id.clone()))
        } else {
            Ok(())
        }
    }

    pub fn read_marker(&self) -> Result<Option<FenceMarker>> {
        let p = self.marker_path();
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| DriverError::Corrupt(format!("{}: {e}", p.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DriverError::io(format!("read {}", p.display()), e)),
        }
    }

    pub fn write_marker(&self, m: &FenceMarker) -> Result<()> {
        let json = serde_json::to_vec_pretty(m)
            .map_err(|e| DriverError::Corrupt(format!("encode fence marker: {e}")))?;
        write_atomic(&self.marker_path(), &json)
    }
}

pub(crate) struct FsInner {
    pub root: PathBuf,
    pools: Vec<PoolConfig>,
    pub(crate) tls: Option<crate::tls::AgentTls>,
    volumes: Mutex<HashMap<String, Arc<Vol>>>,
    crash: Mutex<Option<CrashPoint>>,
    create_lock: tokio::sync::Mutex<()>,
    seq: AtomicU64,
}

/// The fs driver. Cheap to clone; all clones share the volumes.
#[derive(Clone)]
pub struct FsDriver {
    pub(crate) inner: Arc<FsInner>,
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DriverError::io("blocking task", std::io::Error::other(e.to_string())))?
}

impl FsDriver {
    /// Open (or create) the data directory, recover every volume: replay committed sync
    /// journals, discard incomplete ones and half-written copies, re-apply fencing.
    #[instrument(skip_all, fields(data = %config.data_dir.display()))]
    pub async fn open(config: FsConfig) -> Result<Self> {
        let mut pools = config.pools;
        if pools.is_empty() {
            pools.push(PoolConfig {
                name: DEFAULT_POOL.into(),
                capacity_bytes: None,
            });
        }
        for p in &pools {
            validate_pool_name(&p.name)?;
        }
        let inner = Arc::new(FsInner {
            root: config.data_dir,
            pools,
            tls: config.tls,
            volumes: Mutex::new(HashMap::new()),
            crash: Mutex::new(None),
            create_lock: tokio::sync::Mutex::new(()),
            seq: AtomicU64::new(0),
        });
        let i2 = inner.clone();
        blocking(move || i2.load_all()).await?;
        Ok(FsDriver { inner })
    }

    /// Test hook: the next sync into this driver stops at `point` as if the process died.
    #[doc(hidden)]
    pub fn inject_crash(&self, point: Option<CrashPoint>) {
        if let Ok(mut c) = self.inner.crash.lock() {
            *c = point;
        }
    }

    /// The image file (disk/database) or directory (share) of a volume, for a hypervisor,
    /// file server or database to use, and for tests.
    pub fn volume_path(&self, id: &str) -> Result<PathBuf> {
        Ok(self.inner.get(id)?.data_path())
    }

    /// Create a disk or database volume from an existing image file, raw or qcow2 (qcow2
    /// is converted to raw with `qemu-img convert`). The volume's size is the larger of the
    /// spec's and the image's virtual size.
    #[instrument(skip(self, spec), fields(volume = %spec.id))]
    pub async fn import_image(&self, spec: &VolumeSpec, image: &Path) -> Result<VolumeInfo> {
        if !spec.kind.is_file() {
            return Err(DriverError::InvalidArgument(
                "only disk and database volumes take an image".into(),
            ));
        }
        let format = detect_format(image)?;
        self.inner
            .create(spec, Some((image.to_path_buf(), format)))
            .await
    }

    /// Write a volume's image to `dest` as raw or qcow2.
    #[instrument(skip(self), fields(volume = %id))]
    pub async fn export_image(&self, id: &str, dest: &Path, format: ImageFormat) -> Result<()> {
        let vol = self.inner.get(id)?;
        if !vol.kind().is_file() {
            return Err(DriverError::InvalidArgument("a share has no image".into()));
        }
        let _g = self.inner.lock_read(&vol).await?;
        let src = vol.data_path();
        match format {
            ImageFormat::Raw => {
                let dest = dest.to_path_buf();
                blocking(move || {
                    std::fs::copy(&src, &dest)
                        .map(|_| ())
                        .ctx(|| format!("copy to {}", dest.display()))
                })
                .await
            }
            ImageFormat::Qcow2 => {
                qemu_img(&[
                    "convert".as_ref(),
                    "-f".as_ref(),
                    "raw".as_ref(),
                    "-O".as_ref(),
                    "qcow2".as_ref(),
                    src.as_os_str(),
                    dest.as_os_str(),
                ])
                .await
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

fn detect_format(path: &Path) -> Result<ImageFormat> {
    let f = File::open(path).ctx(|| format!("open image {}", path.display()))?;
    let mut magic = [0u8; 4];
    match f.read_exact_at(&mut magic, 0) {
        Ok(()) if &magic == b"QFI\xfb" => Ok(ImageFormat::Qcow2),
        Ok(()) => Ok(ImageFormat::Raw),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(ImageFormat::Raw),
        Err(e) => Err(DriverError::io(format!("read image {}", path.display()), e)),
    }
}

async fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<()> {
    let out = tokio::process::Command::new("qemu-img")
        .args(args)
        .output()
        .await
        .ctx(|| "run qemu-img (is qemu-utils installed?)".to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DriverError::io(
            "qemu-img",
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        ))
    }
}

impl FsInner {
    fn pools_dir(&self) -> PathBuf {
        self.root.join("pools")
    }

    fn pool(&self, name: &str) -> Result<&PoolConfig> {
        self.pools
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| DriverError::InvalidArgument(format!("unknown pool {name:?}")))
    }

    pub(crate) fn get(&self, id: &str) -> Result<Arc<Vol>> {
        let map = self
            .volumes
            .lock()
            .map_err(|_| DriverError::Corrupt("volume table poisoned".into()))?;
        map.get(id)
            .cloned()
            .ok_or_else(|| DriverError::NotFound(id.to_string()))
    }

    fn all(&self) -> Vec<Arc<Vol>> {
        match self.volumes.lock() {
            Ok(m) => m.values().cloned().collect(),
            Err(_) => Vec::new(),
        }
    }

    pub(crate) fn take_crash(&self) -> Option<CrashPoint> {
        self.crash.lock().ok().and_then(|mut c| c.take())
    }

    fn load_all(&self) -> Result<()> {
        for pool in &self.pools {
            let dir = self.pools_dir().join(&pool.name);
            std::fs::create_dir_all(&dir).ctx(|| format!("create pool {}", dir.display()))?;
            let rd = std::fs::read_dir(&dir).ctx(|| format!("list {}", dir.display()))?;
            for item in rd {
                let item = item.ctx(|| format!("list {}", dir.display()))?;
                let name = item.file_name();
                let path = item.path();
                if name.as_bytes().starts_with(b".") {
                    warn!(path = %path.display(), "removing leftover of an interrupted create/delete");
                    remove_tree(&path)?;
                    continue;
                }
                let meta_path = path.join("volume.json");
                let bytes =
                    std::fs::read(&meta_path).ctx(|| format!("read {}", meta_path.display()))?;
                let meta: VolumeMeta = serde_json::from_slice(&bytes)
                    .map_err(|e| DriverError::Corrupt(format!("{}: {e}", meta_path.display())))?;
                let vol = Arc::new(Vol {
                    id: meta.id.clone(),
                    dir: path,
                    meta: Mutex::new(meta),
                    lock: Arc::new(RwLock::new(())),
                    needs_recovery: AtomicBool::new(false),
                    deleted: AtomicBool::new(false),
                });
                self.recover(&vol)?;
                if let Ok(mut m) = self.volumes.lock() {
                    m.insert(vol.id.clone(), vol);
                }
            }
        }
        Ok(())
    }

    /// Bring a volume to a consistent state: replay a committed journal, discard an
    /// incomplete one and any half-written shadow copy, re-apply fencing. Idempotent.
    pub(crate) fn recover(&self, vol: &Vol) -> Result<()> {
        let shadow = vol.shadow_path();
        if shadow.exists() {
            warn!(volume = %vol.id, "discarding an unfinished full copy");
            std::fs::remove_file(&shadow).ctx(|| format!("remove {}", shadow.display()))?;
            sync_dir(&vol.dir)?;
        }
        let jpath = vol.journal_path();
        if jpath.exists() {
            match journal::read(&jpath)? {
                Some(committed) => {
                    info!(volume = %vol.id, records = committed.records.len(), "replaying a committed sync journal");
                    apply_committed(vol, &committed, None)?;
                }
                None => warn!(volume = %vol.id, "discarding an incomplete sync journal"),
            }
            std::fs::remove_file(&jpath).ctx(|| format!("remove {}", jpath.display()))?;
            sync_dir(&vol.dir)?;
        }
        if let Some(marker) = vol.read_marker()? {
            apply_fence_modes(vol, &marker)?;
        }
        vol.needs_recovery.store(false, Ordering::SeqCst);
        Ok(())
    }

    pub(crate) async fn lock_write(
        self: &Arc<Self>,
        vol: &Arc<Vol>,
    ) -> Result<OwnedRwLockWriteGuard<()>> {
        let g = vol.lock.clone().write_owned().await;
        vol.check_live()?;
        if vol.needs_recovery.load(Ordering::SeqCst) {
            let (me, v) = (self.clone(), vol.clone());
            blocking(move || me.recover(&v)).await?;
        }
        Ok(g)
    }

    pub(crate) async fn lock_read(
        self: &Arc<Self>,
        vol: &Arc<Vol>,
    ) -> Result<OwnedRwLockReadGuard<()>> {
        loop {
            if vol.needs_recovery.load(Ordering::SeqCst) {
                drop(self.lock_write(vol).await?);
            }
            let g = vol.lock.clone().read_owned().await;
            vol.check_live()?;
            if !vol.needs_recovery.load(Ordering::SeqCst) {
                return Ok(g);
            }
        }
    }

    fn provisioned(&self, pool: &str) -> u64 {
        self.all()
            .iter()
            .filter(|v| !v.deleted.load(Ordering::SeqCst))
            .map(|v| v.meta())
            .filter(|m| m.pool == pool)
            .map(|m| m.size_bytes)
            .sum()
    }

    fn pool_info(&self, pool: &PoolConfig) -> Result<PoolInfo> {
        let dir = self.pools_dir().join(&pool.name);
        let (total, avail) = fs_space(&dir)?;
        Ok(match pool.capacity_bytes {
            Some(cap) => PoolInfo {
                name: pool.name.clone(),
                capacity_bytes: cap,
                free_bytes: cap.saturating_sub(self.provisioned(&pool.name)).min(avail),
            },
            None => PoolInfo {
                name: pool.name.clone(),
                capacity_bytes: total,
                free_bytes: avail,
            },
        })
    }

    fn info(&self, vol: &Vol) -> Result<VolumeInfo> {
        let meta = vol.meta();
        let data = vol.data_path();
        let (size, allocated) = if meta.kind.is_file() {
            let m = std::fs::metadata(&data).ctx(|| format!("stat {}", data.display()))?;
            (m.len(), m.blocks() * 512)
        } else {
            let entries = manifest::walk_share(&data, &BTreeMap::new())?;
            let mut alloc = 0;
            for e in entries.iter().filter(|e| e.kind == EntryKind::File) {
                if let Ok(m) = std::fs::symlink_metadata(data.join(&e.path)) {
                    alloc += m.blocks() * 512;
                }
            }
            (
                entries
                    .iter()
                    .filter(|e| e.kind == EntryKind::File)
                    .map(|e| e.size)
                    .sum(),
                alloc,
            )
        };
        Ok(VolumeInfo {
            id: meta.id,
            kind: meta.kind,
            pool: meta.pool,
            size_bytes: size,
            provisioned_bytes: meta
                .size_bytes
                .max(if meta.kind.is_file() { size } else { 0 }),
            allocated_bytes: allocated,
            reserved: meta.reserved,
            fenced: vol.is_fenced(),
        })
    }

    pub(crate) async fn create(
        self: &Arc<Self>,
        spec: &VolumeSpec,
        import: Option<(PathBuf, ImageFormat)>,
    ) -> Result<VolumeInfo> {
        validate_volume_id(&spec.id)?;
        let pool = self.pool(&spec.pool)?.clone();
        let _c = self.create_lock.lock().await;
        if let Ok(vol) = self.get(&spec.id) {
            let m = vol.meta();
            if m.kind == spec.kind
                && m.pool == spec.pool
                && m.size_bytes == spec.size_bytes
                && import.is_none()
            {
                let me = self.clone();
                return blocking(move || me.info(&vol)).await;
            }
            return Err(DriverError::AlreadyExists {
                id: spec.id.clone(),
                detail: format!(
                    "it is a {} of {} bytes in pool {}",
                    m.kind, m.size_bytes, m.pool
                ),
            });
        }
        let me = self.clone();
        let spec = spec.clone();
        let vol = blocking(move || me.create_blocking(&spec, &pool, import)).await?;
        let me = self.clone();
        blocking(move || me.info(&vol)).await
    }

    fn create_blocking(
        &self,
        spec: &VolumeSpec,
        pool: &PoolConfig,
        import: Option<(PathBuf, ImageFormat)>,
    ) -> Result<Arc<Vol>> {
        let pool_dir = self.pools_dir().join(&pool.name);
        let tmp = pool_dir.join(format!(
            ".{}.creating-{}",
            spec.id,
            self.seq.fetch_add(1, Ordering::Relaxed)
        ));
        let res = self.populate(spec, pool, &tmp, import);
        let size = match res {
            Ok(size) => size,
            Err(e) => {
                let _ = remove_tree(&tmp);
                return Err(e);
            }
        };
        let final_dir = pool_dir.join(&spec.id);
        std::fs::rename(&tmp, &final_dir).ctx(|| format!("rename into {}", final_dir.display()))?;
        sync_dir(&pool_dir)?;
        let vol = Arc::new(Vol {
            id: spec.id.clone(),
            dir: final_dir,
            meta: Mutex::new(VolumeMeta {
                id: spec.id.clone(),
                kind: spec.kind,
                pool: spec.pool.clone(),
                size_bytes: size,
                reserved: spec.reserve,
            }),
            lock: Arc::new(RwLock::new(())),
            needs_recovery: AtomicBool::new(false),
            deleted: AtomicBool::new(false),
        });
        if let Ok(mut m) = self.volumes.lock() {
            m.insert(spec.id.clone(), vol.clone());
        }
        info!(volume = %spec.id, kind = %spec.kind, pool = %spec.pool, size, "volume created");
        Ok(vol)
    }

    /// Fill a new volume directory; returns the provisioned size.
    fn populate(
        &self,
        spec: &VolumeSpec,
        pool: &PoolConfig,
        dir: &Path,
        import: Option<(PathBuf, ImageFormat)>,
    ) -> Result<u64> {
        std::fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
        let data = dir.join("data");
        let mut size = spec.size_bytes;
        if let Some((src, format)) = import {
            match format {
                ImageFormat::Raw => {
                    std::fs::copy(&src, &data).ctx(|| format!("copy {}", src.display()))?;
                }
                ImageFormat::Qcow2 => {
                    let out = std::process::Command::new("qemu-img")
                        .arg("convert")
                        .args(["-f", "qcow2", "-O", "raw"])
                        .arg(&src)
                        .arg(&data)
                        .output()
                        .ctx(|| "run qemu-img (is qemu-utils installed?)".to_string())?;
                    if !out.status.success() {
                        return Err(DriverError::io(
                            format!("qemu-img convert {}", src.display()),
                            std::io::Error::other(
                                String::from_utf8_lossy(&out.stderr).trim().to_string(),
                            ),
                        ));
                    }
                }
            }
            let len = std::fs::metadata(&data)
                .ctx(|| format!("stat {}", data.display()))?
                .len();
            size = size.max(len);
        }
        let free = self.pool_info(pool)?.free_bytes;
        if size > free {
            return Err(DriverError::NoSpace {
                pool: pool.name.clone(),
                needed: size,
                free,
            });
        }
        if spec.kind.is_file() {
            let f = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .mode(0o644)
                .open(&data)
                .ctx(|| format!("create {}", data.display()))?;
            f.set_len(size).ctx(|| format!("size {}", data.display()))?;
            if spec.reserve {
                fallocate(&f, size).map_err(|e| match e.raw_os_error() {
                    Some(libc::ENOSPC) => DriverError::NoSpace {
                        pool: pool.name.clone(),
                        needed: size,
                        free,
                    },
                    _ => DriverError::io(format!("reserve {}", data.display()), e),
                })?;
            }
            f.sync_all().ctx(|| format!("sync {}", data.display()))?;
        } else {
            std::fs::create_dir(&data).ctx(|| format!("create {}", data.display()))?;
            std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755))
                .ctx(|| format!("chmod {}", data.display()))?;
        }
        let meta = VolumeMeta {
            id: spec.id.clone(),
            kind: spec.kind,
            pool: spec.pool.clone(),
            size_bytes: size,
            reserved: spec.reserve,
        };
        let json = serde_json::to_vec_pretty(&meta)
            .map_err(|e| DriverError::Corrupt(format!("encode volume meta: {e}")))?;
        write_atomic(&dir.join("volume.json"), &json)?;
        if spec.read_only {
            let tmp_vol = Vol {
                id: spec.id.clone(),
                dir: dir.to_path_buf(),
                meta: Mutex::new(meta),
                lock: Arc::new(RwLock::new(())),
                needs_recovery: AtomicBool::new(false),
                deleted: AtomicBool::new(false),
            };
            fence_blocking(&tmp_vol)?;
        }
        sync_dir(dir)?;
        Ok(size)
    }

    pub(crate) fn set_size(&self, vol: &Vol, size: u64) -> Result<()> {
        let mut meta = vol.meta();
        if meta.size_bytes == size {
            return Ok(());
        }
        meta.size_bytes = size;
        let json = serde_json::to_vec_pretty(&meta)
            .map_err(|e| DriverError::Corrupt(format!("encode volume meta: {e}")))?;
        write_atomic(&vol.dir.join("volume.json"), &json)?;
        if let Ok(mut m) = vol.meta.lock() {
            *m = meta;
        }
        Ok(())
    }

    /// The entries of a volume with the modes its workload sees (a fenced volume reports
    /// those it will get back on promote).
    pub(crate) fn manifest(&self, vol: &Vol) -> Result<Vec<Entry>> {
        let data = vol.data_path();
        let modes = vol.read_marker()?.map(|m| m.modes).unwrap_or_default();
        if vol.kind().is_file() {
            let m = std::fs::symlink_metadata(&data).ctx(|| format!("stat {}", data.display()))?;
            if !m.file_type().is_file() {
                return Err(DriverError::Corrupt(format!(
                    "{} is not a file",
                    data.display()
                )));
            }
            Ok(vec![Entry {
                path: String::new(),
                kind: EntryKind::File,
                mode: modes.get("").copied().unwrap_or(m.mode()) & manifest::MODE_MASK,
                size: m.len(),
                link_target: String::new(),
            }])
        } else {
            manifest::walk_share(&data, &modes)
        }
    }

    pub(crate) fn digest_blocking(&self, vol: &Vol, block_size: u32) -> Result<Digest> {
        let kind = vol.kind();
        let entries = self.manifest(vol)?;
        let root = vol.data_path();
        let mut digests = vec![Digest::default(); entries.len()];
        let mut buf = vec![0u8; block_size as usize];
        for (i, e) in entries.iter().enumerate() {
            if e.kind != EntryKind::File {
                continue;
            }
            let path = safe_join(&root, &e.path)?;
            let f = manifest::open_sequential(&path).ctx(|| format!("open {}", path.display()))?;
            let mut d = FileDigester::new(e.size, block_size);
            for j in 0..digest::block_count(e.size, block_size) {
                let len = digest::block_len(e.size, block_size, j);
                f.read_exact_at(&mut buf[..len], j * block_size as u64)
                    .ctx(|| format!("read {}", path.display()))?;
                d.push(&digest::block_hash(&buf[..len]));
            }
            digests[i] = d.finish();
        }
        Ok(digest::volume_digest(kind, &entries, &digests))
    }
}

// ---------------------------------------------------------------- fencing

/// Write the marker (with the modes to restore) unless present, then strip write bits.
fn fence_blocking(vol: &Vol) -> Result<()> {
    let marker = match vol.read_marker()? {
        Some(m) => m,
        None => {
            let data = vol.data_path();
            let mut modes = BTreeMap::new();
            let root_meta =
                std::fs::symlink_metadata(&data).ctx(|| format!("stat {}", data.display()))?;
            modes.insert(String::new(), root_meta.mode() & manifest::MODE_MASK);
            if !vol.kind().is_file() {
                for e in manifest::walk_share(&data, &BTreeMap::new())? {
                    if e.kind != EntryKind::Symlink {
                        modes.insert(e.path, e.mode);
                    }
                }
            }
            let m = FenceMarker { modes };
            vol.write_marker(&m)?;
            m
        }
    };
    apply_fence_modes(vol, &marker)
}

/// Strip the write bits of everything in a fenced volume (idempotent).
fn apply_fence_modes(vol: &Vol, marker: &FenceMarker) -> Result<()> {
    let data = vol.data_path();
    let ro = |mode: u32| mode & !0o222;
    let root_mode = marker.modes.get("").copied().unwrap_or(0o755);
    chmod(&data, ro(root_mode))?;
    if !vol.kind().is_file() {
        for e in manifest::walk_share(&data, &BTreeMap::new())? {
            if e.kind == EntryKind::Symlink {
                continue;
            }
            let m = marker.modes.get(&e.path).copied().unwrap_or(e.mode);
            chmod(&data.join(&e.path), ro(m))?;
        }
    }
    Ok(())
}

fn promote_blocking(vol: &Vol) -> Result<()> {
    let Some(marker) = vol.read_marker()? else {
        return Ok(());
    };
    let data = vol.data_path();
    if !vol.kind().is_file() {
        for e in manifest::walk_share(&data, &BTreeMap::new())? {
            if e.kind == EntryKind::Symlink {
                continue;
            }
            let m = marker.modes.get(&e.path).copied().unwrap_or(e.mode | 0o200);
            chmod(&data.join(&e.path), m)?;
        }
    }
    chmod(
        &data,
        marker.modes.get("").copied().unwrap_or(0o755) | 0o200,
    )?;
    let p = vol.marker_path();
    std::fs::remove_file(&p).ctx(|| format!("remove {}", p.display()))?;
    sync_dir(&vol.dir)
}

fn chmod(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .ctx(|| format!("chmod {}", path.display()))
}

/// Add owner write/exec bits to every directory and file so that a non-root agent can
/// rewrite a fenced replica (root ignores the bits anyway). The final modes are set after.
fn make_tree_writable(root: &Path) -> Result<()> {
    let m = std::fs::symlink_metadata(root).ctx(|| format!("stat {}", root.display()))?;
    if m.file_type().is_symlink() {
        return Ok(());
    }
    chmod(
        root,
        m.mode() & 0o7777 | if m.is_dir() { 0o700 } else { 0o600 },
    )?;
    if m.is_dir() {
        for item in std::fs::read_dir(root).ctx(|| format!("list {}", root.display()))? {
            let item = item.ctx(|| format!("list {}", root.display()))?;
            make_tree_writable(&item.path())?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- applying a sync

fn open_rw(path: &Path, create: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Write a committed journal into the volume. Idempotent, so a replay after a crash at any
/// point of a previous apply converges on the same content. `crash` stops after that many
/// records (test hook).
pub(crate) fn apply_committed(
    vol: &Vol,
    c: &journal::Committed,
    crash: Option<usize>,
) -> Result<()> {
    let h = &c.header;
    let data = vol.data_path();
    let fenced = vol.read_marker()?;
    let mut buf = Vec::new();
    if h.kind.is_file() {
        let e = h
            .entries
            .first()
            .ok_or_else(|| DriverError::Corrupt("journal without an entry".into()))?;
        if fenced.is_some() {
            make_tree_writable(&data)?;
        }
        let f = open_rw(&data, true).ctx(|| format!("open {}", data.display()))?;
        for (n, r) in c.records.iter().enumerate() {
            if crash == Some(n) {
                f.sync_data().ctx(|| format!("sync {}", data.display()))?;
                return Err(DriverError::Injected(format!(
                    "crash after applying {n} records"
                )));
            }
            c.read_record(r, &mut buf)?;
            f.write_all_at(&buf, r.offset)
                .ctx(|| format!("write {}", data.display()))?;
        }
        f.set_len(e.size)
            .ctx(|| format!("size {}", data.display()))?;
        f.sync_data().ctx(|| format!("sync {}", data.display()))?;
        if let Some(marker) = fenced {
            apply_fence_modes(vol, &marker)?;
        }
        return Ok(());
    }

    // A share: shape the tree, write the blocks, set sizes, remove what the source does
    // not have, set modes, then sync the filesystem.
    std::fs::create_dir_all(&data).ctx(|| format!("create {}", data.display()))?;
    if fenced.is_some() {
        make_tree_writable(&data)?;
    }
    for e in &h.entries {
        let p = data.join(&e.path);
        let cur = std::fs::symlink_metadata(&p).ok();
        let keep = match (&cur, e.kind) {
            (None, _) => false,
            (Some(m), EntryKind::Dir) => m.is_dir(),
            (Some(m), EntryKind::File) => m.file_type().is_file(),
            (Some(m), EntryKind::Symlink) => {
                m.file_type().is_symlink()
                    && std::fs::read_link(&p).ok().as_deref() == Some(Path::new(&e.link_target))
            }
        };
        if !keep {
            if cur.is_some() {
                remove_tree(&p)?;
            }
            match e.kind {
                EntryKind::Dir => {
                    std::fs::create_dir(&p).ctx(|| format!("mkdir {}", p.display()))?
                }
                EntryKind::File => {
                    open_rw(&p, true).ctx(|| format!("create {}", p.display()))?;
                }
                EntryKind::Symlink => std::os::unix::fs::symlink(&e.link_target, &p)
                    .ctx(|| format!("symlink {}", p.display()))?,
            }
        }
    }
    let mut open: Option<(u32, File)> = None;
    for (n, r) in c.records.iter().enumerate() {
        if crash == Some(n) {
            return Err(DriverError::Injected(format!(
                "crash after applying {n} records"
            )));
        }
        let e = h
            .entries
            .get(r.file as usize)
            .filter(|e| e.kind == EntryKind::File)
            .ok_or_else(|| DriverError::Corrupt(format!("journal record for entry {}", r.file)))?;
        if open.as_ref().map(|(i, _)| *i) != Some(r.file) {
            let p = data.join(&e.path);
            open = Some((
                r.file,
                open_rw(&p, true).ctx(|| format!("open {}", p.display()))?,
            ));
        }
        c.read_record(r, &mut buf)?;
        if let Some((_, f)) = &open {
            f.write_all_at(&buf, r.offset)
                .ctx(|| format!("write {}", e.path))?;
        }
    }
    drop(open);
    for e in h.entries.iter().filter(|e| e.kind == EntryKind::File) {
        let p = data.join(&e.path);
        let f = open_rw(&p, true).ctx(|| format!("open {}", p.display()))?;
        f.set_len(e.size).ctx(|| format!("size {}", p.display()))?;
    }
    let wanted: HashSet<&str> = h.entries.iter().map(|e| e.path.as_str()).collect();
    let mut removed: Vec<String> = Vec::new();
    for e in manifest::walk_share(&data, &BTreeMap::new())? {
        if wanted.contains(e.path.as_str()) {
            continue;
        }
        if removed.iter().any(|r| {
            e.path.starts_with(r.as_str()) && e.path.as_bytes().get(r.len()) == Some(&b'/')
        }) {
            continue;
        }
        remove_tree(&data.join(&e.path))?;
        removed.push(e.path);
    }
    let mut new_marker = fenced.clone();
    for e in h.entries.iter().filter(|e| e.kind != EntryKind::Symlink) {
        let p = data.join(&e.path);
        match &mut new_marker {
            Some(m) => {
                m.modes.insert(e.path.clone(), e.mode);
                chmod(&p, e.mode & !0o222)?;
            }
            None => chmod(&p, e.mode)?,
        }
    }
    if let Some(mut m) = new_marker {
        m.modes
            .retain(|k, _| k.is_empty() || wanted.contains(k.as_str()));
        vol.write_marker(&m)?;
        chmod(&data, m.modes.get("").copied().unwrap_or(0o755) & !0o222)?;
    }
    syncfs(&data)
}

// ---------------------------------------------------------------- helpers

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp).ctx(|| format!("create {}", tmp.display()))?;
        std::io::Write::write_all(&mut f, bytes).ctx(|| format!("write {}", tmp.display()))?;
        f.sync_all().ctx(|| format!("sync {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).ctx(|| format!("rename {}", path.display()))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

pub(crate) fn remove_tree(p: &Path) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            make_tree_writable(p)?;
            std::fs::remove_dir_all(p).ctx(|| format!("remove {}", p.display()))
        }
        Ok(_) => std::fs::remove_file(p).ctx(|| format!("remove {}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DriverError::io(format!("stat {}", p.display()), e)),
    }
}

fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| DriverError::InvalidArgument(format!("path {} has a NUL", p.display())))
}

/// (total, available to unprivileged users) bytes of the filesystem holding `p`.
pub(crate) fn fs_space(p: &Path) -> Result<(u64, u64)> {
    let c = cpath(p)?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(DriverError::io(
            format!("statvfs {}", p.display()),
            std::io::Error::last_os_error(),
        ));
    }
    let frsize = st.f_frsize as u64;
    Ok((st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize))
}

fn fallocate(f: &File, len: u64) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: a valid open file descriptor; posix_fallocate returns an error number.
    let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len as libc::off_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

pub(crate) fn fallocate_file(f: &File, len: u64) -> std::io::Result<()> {
    fallocate(f, len)
}

fn syncfs(p: &Path) -> Result<()> {
    let f = File::open(p).ctx(|| format!("open {}", p.display()))?;
    // SAFETY: a valid open file descriptor.
    let rc = unsafe { libc::syncfs(f.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(DriverError::io(
            format!("syncfs {}", p.display()),
            std::io::Error::last_os_error(),
        ))
    }
}

/// Whether an image holds any data (not only holes): an image that was created sparse and
/// never written is synced by writing a new file instead of journaling every block.
pub(crate) fn has_data(p: &Path) -> Result<bool> {
    let f = match File::open(p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(DriverError::io(format!("open {}", p.display()), e)),
    };
    let len = f.metadata().ctx(|| format!("stat {}", p.display()))?.len();
    if len == 0 {
        return Ok(false);
    }
    // SAFETY: a valid open file descriptor.
    let off = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
    if off >= 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    Ok(err.raw_os_error() != Some(libc::ENXIO))
}

// ---------------------------------------------------------------- O_DIRECT buffers

/// Alignment of O_DIRECT buffers, offsets and lengths (512 and 4096-byte sectors alike).
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// A page-aligned buffer (O_DIRECT needs aligned memory), carved from a `Vec`.
pub(crate) struct AlignedBuf {
    mem: Vec<u8>,
    start: usize,
    cap: usize,
    len: usize,
}

impl AlignedBuf {
    /// Room for `cap` bytes rounded up to [`DIRECT_ALIGN`] (none for 0: no allocation).
    pub(crate) fn new(cap: usize) -> Self {
        if cap == 0 {
            return AlignedBuf {
                mem: Vec::new(),
                start: 0,
                cap: 0,
                len: 0,
            };
        }
        let cap = cap.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let mem = vec![0u8; cap + DIRECT_ALIGN];
        let start = mem.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        AlignedBuf {
            mem,
            start,
            cap,
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn room(&self) -> usize {
        self.cap - self.len
    }

    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }

    pub(crate) fn extend(&mut self, data: &[u8]) {
        let at = self.start + self.len;
        self.mem[at..at + data.len()].copy_from_slice(data);
        self.len += data.len();
    }

    pub(crate) fn filled(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.len]
    }

    /// The whole buffer, to read into; then [`AlignedBuf::set_len`].
    pub(crate) fn space(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.cap]
    }

    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len.min(self.cap);
    }
}

// ---------------------------------------------------------------- the trait

#[async_trait]
impl Driver for FsDriver {
    fn name(&self) -> &'static str {
        "fs"
    }

    #[instrument(skip(self, spec), fields(volume = %spec.id))]
    async fn create_volume(&self, spec: &VolumeSpec) -> Result<VolumeInfo> {
        self.inner.create(spec, None).await
    }

    #[instrument(skip(self), fields(volume = %id))]
    async fn delete_volume(&self, id: &str) -> Result<()> {
        let vol = match self.inner.get(id) {
            Ok(v) => v,
            Err(DriverError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let _c = self.inner.create_lock.lock().await;
        let g = match self.inner.lock_write(&vol).await {
            Ok(g) => g,
            Err(DriverError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let inner = self.inner.clone();
        let v = vol.clone();
        blocking(move || {
            let _g = g;
            let pool_dir = v.dir.parent().map(Path::to_path_buf).unwrap_or_default();
            let tomb = pool_dir.join(format!(
                ".{}.deleting-{}",
                v.id,
                inner.seq.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::rename(&v.dir, &tomb).ctx(|| format!("rename {}", v.dir.display()))?;
            sync_dir(&pool_dir)?;
            v.deleted.store(true, Ordering::SeqCst);
            if let Ok(mut m) = inner.volumes.lock() {
                m.remove(&v.id);
            }
            remove_tree(&tomb)?;
            info!(volume = %v.id, "volume deleted");
            Ok(())
        })
        .await
    }

    async fn volume(&self, id: &str) -> Result<VolumeInfo> {
        let vol = self.inner.get(id)?;
        let g = self.inner.lock_read(&vol).await?;
        let inner = self.inner.clone();
        blocking(move || {
            let _g = g;
            inner.info(&vol)
        })
        .await
    }

    async fn inventory(&self) -> Result<Inventory> {
        let mut vols = self.inner.all();
        vols.sort_by(|a, b| a.id.cmp(&b.id));
        let mut volumes = Vec::with_capacity(vols.len());
        for v in vols {
            match self.volume(&v.id).await {
                Ok(info) => volumes.push(info),
                Err(DriverError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let inner = self.inner.clone();
        let pools =
            blocking(move || inner.pools.iter().map(|p| inner.pool_info(p)).collect()).await?;
        Ok(Inventory {
            driver: "fs".into(),
            pools,
            volumes,
        })
    }

    #[instrument(skip(self, op), fields(volume = %id, bytes = op.len()))]
    async fn write(&self, id: &str, op: WriteOp<'_>) -> Result<()> {
        let vol = self.inner.get(id)?;
        let g = self.inner.lock_write(&vol).await?;
        if vol.is_fenced() {
            return Err(DriverError::Fenced(id.to_string()));
        }
        let kind = vol.kind();
        let data = vol.data_path();
        enum Owned {
            At(u64, Vec<u8>),
            File(String, Vec<u8>),
            Remove(String),
        }
        let op = match op {
            WriteOp::At { offset, data } if kind.is_file() => Owned::At(offset, data.to_vec()),
            WriteOp::File { path, data } if !kind.is_file() => {
                Owned::File(path.to_string(), data.to_vec())
            }
            WriteOp::Remove { path } if !kind.is_file() => Owned::Remove(path.to_string()),
            _ => {
                return Err(DriverError::InvalidArgument(format!(
                    "that write does not apply to a {kind} volume"
                )))
            }
        };
        if let Owned::File(path, _) | Owned::Remove(path) = &op {
            if path.is_empty() {
                return Err(DriverError::InvalidArgument(
                    "a share write needs a relative path".into(),
                ));
            }
        }
        blocking(move || {
            let _g = g;
            match op {
                Owned::At(offset, bytes) => {
                    let f = open_rw(&data, false).ctx(|| format!("open {}", data.display()))?;
                    f.write_all_at(&bytes, offset)
                        .ctx(|| format!("write {}", data.display()))
                }
                Owned::File(path, bytes) => {
                    let p = safe_join(&data, &path)?;
                    if let Some(parent) = p.parent() {
                        std::fs::create_dir_all(parent)
                            .ctx(|| format!("mkdir {}", parent.display()))?;
                    }
                    if std::fs::symlink_metadata(&p)
                        .map(|m| !m.file_type().is_file())
                        .unwrap_or(false)
                    {
                        remove_tree(&p)?;
                    }
                    let f = OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o644)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&p)
                        .ctx(|| format!("create {}", p.display()))?;
                    f.write_all_at(&bytes, 0)
                        .ctx(|| format!("write {}", p.display()))
                }
                Owned::Remove(path) => remove_tree(&safe_join(&data, &path)?),
            }
        })
        .await
    }

    async fn serve_sync_source(&self, bind: std::net::SocketAddr) -> Result<SyncServer> {
        crate::blocksync::serve(self.inner.clone(), bind).await
    }

    #[instrument(skip(self, req, progress, cancel), fields(volume = %req.target, task = req.task_id.as_deref().unwrap_or("")))]
    async fn sync_from(
        &self,
        req: &SyncRequest,
        progress: Option<ProgressFn>,
        cancel: CancellationToken,
    ) -> Result<SyncStats> {
        crate::blocksync::pull(self.inner.clone(), req, progress, cancel).await
    }

    #[instrument(skip(self), fields(volume = %id))]
    async fn promote(&self, id: &str) -> Result<()> {
        let vol = self.inner.get(id)?;
        let g = self.inner.lock_write(&vol).await?;
        blocking(move || {
            let _g = g;
            promote_blocking(&vol)?;
            info!(volume = %vol.id, "promoted (writable)");
            Ok(())
        })
        .await
    }

    #[instrument(skip(self), fields(volume = %id))]
    async fn fence(&self, id: &str) -> Result<()> {
        let vol = self.inner.get(id)?;
        let g = self.inner.lock_write(&vol).await?;
        blocking(move || {
            let _g = g;
            fence_blocking(&vol)?;
            sync_dir(&vol.dir)?;
            info!(volume = %vol.id, "fenced (read-only)");
            Ok(())
        })
        .await
    }

    #[instrument(skip(self), fields(volume = %id))]
    async fn checksum(&self, id: &str) -> Result<Digest> {
        let vol = self.inner.get(id)?;
        let g = self.inner.lock_read(&vol).await?;
        let inner = self.inner.clone();
        blocking(move || {
            let _g = g;
            inner.digest_blocking(&vol, DEFAULT_BLOCK_SIZE)
        })
        .await
    }

    #[instrument(skip(self, req, progress, cancel), fields(volume = %req.target.id, task = req.task_id.as_deref().unwrap_or("")))]
    async fn migrate(
        &self,
        req: &MigrateRequest,
        progress: Option<ProgressFn>,
        cancel: CancellationToken,
    ) -> Result<SyncStats> {
        let mut spec = req.target.clone();
        spec.read_only = true;
        match self.create_volume(&spec).await {
            Ok(_) => {}
            // A retried migration finds its own half-done copy: still a fenced replica.
            Err(DriverError::AlreadyExists { .. })
                if self
                    .volume(&spec.id)
                    .await
                    .map(|v| v.fenced)
                    .unwrap_or(false) => {}
            Err(e) => return Err(e),
        }
        let sync = SyncRequest {
            source: req.source.clone(),
            target: spec.id.clone(),
            bwlimit: req.bwlimit,
            block_size: None,
            task_id: req.task_id.clone(),
        };
        let stats = self.sync_from(&sync, progress, cancel).await?;
        self.promote(&spec.id).await?;
        Ok(stats)
    }
}
