//! The `sim` driver: volumes that are only numbers, for scale tests of the scheduler.
//!
//! A volume has a size, a content fingerprint and a short history of writes; a sync moves
//! the bytes written since the target's last sync from the same source (or the whole
//! volume), taking `latency + bytes / min(bandwidth, bwlimit)` of (tokio) time. Each
//! operation waits `latency + jitter·u` (rounded up to whole milliseconds) and fails with `DriverError::Injected` with
//! probability `failure_rate`, both drawn from a SplitMix64 generator seeded by
//! `SimConfig::seed`: the same seed and the same sequence of calls give the same delays
//! and failures (run under a paused tokio clock for exact timings). Reads (`volume`,
//! `inventory`) wait but never fail.
//!
//! An agent is one small struct behind an `Arc`: no threads, no files. Agents find each
//! other's volumes through a shared [`SimNetwork`], by the endpoint `sim://<host>` that
//! `serve_sync_source` registers.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::driver::*;

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub host: String,
    pub seed: u64,
    /// Every operation waits at least this long.
    pub latency: Duration,
    /// Plus a uniform extra in `[0, jitter)`.
    pub jitter: Duration,
    /// Probability in [0, 1] that a mutating operation or sync fails.
    pub failure_rate: f64,
    /// Bytes per second of the simulated link a sync uses.
    pub bandwidth: u64,
    /// Pools and their capacities.
    pub pools: Vec<(String, u64)>,
    /// Keep a log of operations (tests); off for scale runs.
    pub record_ops: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            host: "sim".into(),
            seed: 1,
            latency: Duration::from_millis(1),
            jitter: Duration::ZERO,
            failure_rate: 0.0,
            bandwidth: 1 << 30,
            pools: vec![("default".into(), 1 << 40)],
            record_ops: false,
        }
    }
}

/// Where sim agents find each other. Share one `Arc` among the agents of a test.
#[derive(Default)]
pub struct SimNetwork {
    hosts: Mutex<HashMap<String, Weak<SimInner>>>,
}

impl SimNetwork {
    pub fn new() -> Arc<Self> {
        Arc::new(SimNetwork::default())
    }

    fn lookup(&self, endpoint: &str) -> Option<Arc<SimInner>> {
        let hosts = self.hosts.lock().ok()?;
        hosts.get(endpoint).and_then(Weak::upgrade)
    }
}

/// One operation as the simulator decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimOp {
    pub op: &'static str,
    pub volume: String,
    pub delay: Duration,
    pub failed: bool,
}

#[derive(Debug, Clone)]
struct SimVol {
    kind: VolumeKind,
    pool: String,
    provisioned: u64,
    size: u64,
    reserved: bool,
    fenced: bool,
    content: u64,
    version: u64,
    /// (version, bytes written) of recent writes.
    history: VecDeque<(u64, u64)>,
    /// (source endpoint/volume, source version) of the last sync into this volume.
    synced_from: Option<(String, u64)>,
}

const HISTORY: usize = 64;
const SIM_BLOCK: u64 = DEFAULT_BLOCK_SIZE as u64;

struct SimState {
    rng: SplitMix64,
    volumes: BTreeMap<String, SimVol>,
    log: Vec<SimOp>,
}

struct SimInner {
    cfg: SimConfig,
    net: Arc<SimNetwork>,
    state: Mutex<SimState>,
}

/// A simulated host's driver.
#[derive(Clone)]
pub struct SimDriver {
    inner: Arc<SimInner>,
}

/// SplitMix64: tiny, fast, and its sequence never changes with a dependency's version.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn mix(a: u64, b: u64) -> u64 {
    SplitMix64::new(a ^ b.rotate_left(17)).next_u64()
}

impl SimDriver {
    pub fn new(cfg: SimConfig, net: Arc<SimNetwork>) -> Self {
        let rng = SplitMix64::new(cfg.seed);
        SimDriver {
            inner: Arc::new(SimInner {
                cfg,
                net,
                state: Mutex::new(SimState {
                    rng,
                    volumes: BTreeMap::new(),
                    log: Vec::new(),
                }),
            }),
        }
    }

    pub fn host(&self) -> &str {
        &self.inner.cfg.host
    }

    /// The operations decided so far (only with `record_ops`).
    pub fn op_log(&self) -> Vec<SimOp> {
        self.inner
            .state
            .lock()
            .map(|s| s.log.clone())
            .unwrap_or_default()
    }
}

impl SimInner {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, SimState>> {
        self.state
            .lock()
            .map_err(|_| DriverError::Injected("sim state poisoned".into()))
    }

    /// Draw this operation's delay and fate, wait, and fail it if so drawn.
    async fn step(
        &self,
        op: &'static str,
        volume: &str,
        can_fail: bool,
        cancel: Option<&CancellationToken>,
    ) -> Result<()> {
        let (delay, failed) = {
            let mut s = self.lock()?;
            let u = s.rng.next_f64();
            let f = s.rng.next_f64();
            let delay = whole_ms(self.cfg.latency + self.cfg.jitter.mul_f64(u));
            let failed = can_fail && f < self.cfg.failure_rate;
            if self.cfg.record_ops {
                s.log.push(SimOp {
                    op,
                    volume: volume.to_string(),
                    delay,
                    failed,
                });
            }
            (delay, failed)
        };
        wait(delay, cancel).await?;
        if failed {
            return Err(DriverError::Injected(format!(
                "{op} {volume} on {}",
                self.cfg.host
            )));
        }
        Ok(())
    }

    fn info(id: &str, v: &SimVol) -> VolumeInfo {
        VolumeInfo {
            id: id.to_string(),
            kind: v.kind,
            pool: v.pool.clone(),
            size_bytes: v.size,
            provisioned_bytes: v.provisioned.max(v.size),
            allocated_bytes: 0,
            reserved: v.reserved,
            fenced: v.fenced,
        }
    }

    fn free(&self, s: &SimState, pool: &str) -> Result<u64> {
        let cap = self
            .cfg
            .pools
            .iter()
            .find(|(n, _)| n == pool)
            .map(|(_, c)| *c)
            .ok_or_else(|| DriverError::InvalidArgument(format!("unknown pool {pool:?}")))?;
        let used: u64 = s
            .volumes
            .values()
            .filter(|v| v.pool == pool)
            .map(|v| v.provisioned.max(v.size))
            .sum();
        Ok(cap.saturating_sub(used))
    }
}

/// Delays are whole milliseconds: tokio's timers have that resolution, so a paused-clock
/// test sees exactly the drawn delays.
fn whole_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_nanos().div_ceil(1_000_000) as u64)
}

async fn wait(d: Duration, cancel: Option<&CancellationToken>) -> Result<()> {
    if d.is_zero() {
        return Ok(());
    }
    match cancel {
        Some(c) => tokio::select! {
            _ = tokio::time::sleep(d) => Ok(()),
            _ = c.cancelled() => Err(DriverError::Cancelled),
        },
        None => {
            tokio::time::sleep(d).await;
            Ok(())
        }
    }
}

#[async_trait]
impl Driver for SimDriver {
    fn name(&self) -> &'static str {
        "sim"
    }

    async fn create_volume(&self, spec: &VolumeSpec) -> Result<VolumeInfo> {
        validate_volume_id(&spec.id)?;
        self.inner.step("create", &spec.id, true, None).await?;
        let mut s = self.inner.lock()?;
        if let Some(v) = s.volumes.get(&spec.id) {
            if v.kind == spec.kind && v.pool == spec.pool && v.provisioned == spec.size_bytes {
                return Ok(SimInner::info(&spec.id, v));
            }
            return Err(DriverError::AlreadyExists {
                id: spec.id.clone(),
                detail: format!(
                    "it is a {} of {} bytes in pool {}",
                    v.kind, v.provisioned, v.pool
                ),
            });
        }
        let free = self.inner.free(&s, &spec.pool)?;
        if spec.size_bytes > free {
            return Err(DriverError::NoSpace {
                pool: spec.pool.clone(),
                needed: spec.size_bytes,
                free,
            });
        }
        let v = SimVol {
            kind: spec.kind,
            pool: spec.pool.clone(),
            provisioned: spec.size_bytes,
            size: if spec.kind.is_file() {
                spec.size_bytes
            } else {
                0
            },
            reserved: spec.reserve,
            fenced: spec.read_only,
            content: 0,
            version: 0,
            history: VecDeque::new(),
            synced_from: None,
        };
        let info = SimInner::info(&spec.id, &v);
        s.volumes.insert(spec.id.clone(), v);
        Ok(info)
    }

    async fn delete_volume(&self, id: &str) -> Result<()> {
        self.inner.step("delete", id, true, None).await?;
        self.inner.lock()?.volumes.remove(id);
        Ok(())
    }

    async fn volume(&self, id: &str) -> Result<VolumeInfo> {
        self.inner.step("volume", id, false, None).await?;
        let s = self.inner.lock()?;
        s.volumes
            .get(id)
            .map(|v| SimInner::info(id, v))
            .ok_or_else(|| DriverError::NotFound(id.to_string()))
    }

    async fn inventory(&self) -> Result<Inventory> {
        self.inner.step("inventory", "", false, None).await?;
        let s = self.inner.lock()?;
        let mut pools = Vec::new();
        for (name, cap) in &self.inner.cfg.pools {
            pools.push(PoolInfo {
                name: name.clone(),
                capacity_bytes: *cap,
                free_bytes: self.inner.free(&s, name)?,
            });
        }
        Ok(Inventory {
            driver: "sim".into(),
            pools,
            volumes: s
                .volumes
                .iter()
                .map(|(id, v)| SimInner::info(id, v))
                .collect(),
        })
    }

    async fn write(&self, id: &str, op: WriteOp<'_>) -> Result<()> {
        self.inner.step("write", id, true, None).await?;
        let mut s = self.inner.lock()?;
        let v = s
            .volumes
            .get_mut(id)
            .ok_or_else(|| DriverError::NotFound(id.to_string()))?;
        if v.fenced {
            return Err(DriverError::Fenced(id.to_string()));
        }
        let (touched, fp) = match op {
            WriteOp::At { offset, data } if v.kind.is_file() => {
                v.size = v.size.max(offset + data.len() as u64);
                let first = offset / SIM_BLOCK;
                let last = (offset + data.len().max(1) as u64 - 1) / SIM_BLOCK;
                (
                    (last - first + 1) * SIM_BLOCK,
                    mix(offset, blake3_u64(data)),
                )
            }
            WriteOp::File { path, data } if !v.kind.is_file() => {
                v.size += data.len() as u64;
                (
                    (data.len() as u64).div_ceil(SIM_BLOCK).max(1) * SIM_BLOCK,
                    mix(blake3_u64(path.as_bytes()), blake3_u64(data)),
                )
            }
            WriteOp::Remove { path } if !v.kind.is_file() => (0, blake3_u64(path.as_bytes())),
            _ => {
                return Err(DriverError::InvalidArgument(format!(
                    "that write does not apply to a {} volume",
                    v.kind
                )))
            }
        };
        v.content = mix(v.content, fp);
        v.version += 1;
        let version = v.version;
        v.history.push_back((version, touched));
        if v.history.len() > HISTORY {
            v.history.pop_front();
        }
        Ok(())
    }

    async fn serve_sync_source(&self, _bind: SocketAddr) -> Result<SyncServer> {
        let endpoint = format!("sim://{}", self.inner.cfg.host);
        if let Ok(mut h) = self.inner.net.hosts.lock() {
            h.insert(endpoint.clone(), Arc::downgrade(&self.inner));
        }
        let net = self.inner.net.clone();
        let ep = endpoint.clone();
        Ok(SyncServer {
            endpoint,
            local_addr: None,
            shutdown: None,
            task: None,
            on_drop: Some(Box::new(move || {
                if let Ok(mut h) = net.hosts.lock() {
                    h.remove(&ep);
                }
            })),
        })
    }

    async fn sync_from(
        &self,
        req: &SyncRequest,
        progress: Option<ProgressFn>,
        cancel: CancellationToken,
    ) -> Result<SyncStats> {
        let started = tokio::time::Instant::now();
        self.inner
            .step("sync", &req.target, true, Some(&cancel))
            .await?;
        {
            let s = self.inner.lock()?;
            let t = s
                .volumes
                .get(&req.target)
                .ok_or_else(|| DriverError::NotFound(req.target.clone()))?;
            if !t.fenced {
                return Err(DriverError::TargetWritable(req.target.clone()));
            }
        }
        let endpoint = &req.source.endpoint;
        let src = self
            .inner
            .net
            .lookup(endpoint)
            .ok_or_else(|| DriverError::Remote {
                endpoint: endpoint.clone(),
                message: "no sim agent serves this endpoint".into(),
            })?;
        // Snapshot the source at the start, as the fs driver's read lock does.
        let snap = {
            let s = src.lock()?;
            s.volumes
                .get(&req.source.volume)
                .cloned()
                .ok_or_else(|| DriverError::Remote {
                    endpoint: endpoint.clone(),
                    message: format!(
                        "source volume not found: volume {} not found",
                        req.source.volume
                    ),
                })?
        };
        let origin = format!("{endpoint}/{}", req.source.volume);
        let bytes = {
            let s = self.inner.lock()?;
            let t = s
                .volumes
                .get(&req.target)
                .ok_or_else(|| DriverError::NotFound(req.target.clone()))?;
            if !t.fenced {
                return Err(DriverError::TargetWritable(req.target.clone()));
            }
            if t.kind.is_file() != snap.kind.is_file() {
                return Err(DriverError::InvalidArgument(format!(
                    "source is a {}, target a {}",
                    snap.kind, t.kind
                )));
            }
            match &t.synced_from {
                // Synced from this source before: only what was written since, if the
                // history still reaches back that far.
                Some((o, v)) if *o == origin => {
                    let oldest = snap.history.front().map(|(hv, _)| *hv).unwrap_or(u64::MAX);
                    if *v == snap.version {
                        0
                    } else if *v + 1 >= oldest {
                        snap.history
                            .iter()
                            .filter(|(hv, _)| hv > v)
                            .map(|(_, b)| *b)
                            .sum::<u64>()
                            .min(snap.size)
                    } else {
                        snap.size
                    }
                }
                _ if t.content == snap.content && t.size == snap.size => 0,
                _ => snap.size,
            }
        };
        let rate = match req.bwlimit {
            Some(l) if l > 0 => l.min(self.inner.cfg.bandwidth),
            _ => self.inner.cfg.bandwidth,
        }
        .max(1);
        let report = |done: u64| {
            if let Some(p) = &progress {
                p(SyncProgress {
                    bytes_done: done,
                    bytes_total: snap.size,
                    bytes_sent: bytes.min(done),
                })
            }
        };
        report(0);
        wait(
            whole_ms(Duration::from_secs_f64(bytes as f64 / rate as f64)),
            Some(&cancel),
        )
        .await?;
        let digest = {
            let mut s = self.inner.lock()?;
            let t = s
                .volumes
                .get_mut(&req.target)
                .ok_or_else(|| DriverError::NotFound(req.target.clone()))?;
            t.content = snap.content;
            t.size = snap.size;
            t.synced_from = Some((origin, snap.version));
            sim_digest(t)
        };
        report(snap.size);
        Ok(SyncStats {
            bytes_total: snap.size,
            bytes_sent: bytes,
            data_bytes: bytes,
            blocks_total: snap.size.div_ceil(SIM_BLOCK),
            blocks_sent: bytes.div_ceil(SIM_BLOCK),
            hash_bytes: snap.size.div_ceil(SIM_BLOCK) * 32,
            digest,
            mode: if bytes == 0 {
                ApplyMode::None
            } else {
                ApplyMode::Journal
            },
            elapsed: started.elapsed(),
        })
    }

    async fn promote(&self, id: &str) -> Result<()> {
        self.inner.step("promote", id, true, None).await?;
        let mut s = self.inner.lock()?;
        let v = s
            .volumes
            .get_mut(id)
            .ok_or_else(|| DriverError::NotFound(id.to_string()))?;
        v.fenced = false;
        Ok(())
    }

    async fn fence(&self, id: &str) -> Result<()> {
        self.inner.step("fence", id, true, None).await?;
        let mut s = self.inner.lock()?;
        let v = s
            .volumes
            .get_mut(id)
            .ok_or_else(|| DriverError::NotFound(id.to_string()))?;
        v.fenced = true;
        Ok(())
    }

    async fn checksum(&self, id: &str) -> Result<Digest> {
        self.inner.step("checksum", id, true, None).await?;
        let s = self.inner.lock()?;
        s.volumes
            .get(id)
            .map(sim_digest)
            .ok_or_else(|| DriverError::NotFound(id.to_string()))
    }

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

fn blake3_u64(b: &[u8]) -> u64 {
    let h = blake3::hash(b);
    let mut a = [0u8; 8];
    a.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(a)
}

fn sim_digest(v: &SimVol) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"drplane.sim.v1\0");
    h.update(&v.content.to_le_bytes());
    h.update(&v.size.to_le_bytes());
    Digest(*h.finalize().as_bytes())
}
