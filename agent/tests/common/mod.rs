//! Agents for the fs tests: each an `FsDriver` in its own temp dir with its sync server on
//! 127.0.0.1, all in this test process.
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Once;

use drplane_agent::{
    CancellationToken, Driver, FsConfig, FsDriver, SyncRequest, SyncServer, SyncStats, VolumeKind,
    VolumeSpec,
};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

pub const MIB: u64 = 1 << 20;

pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

pub struct Agent {
    pub driver: FsDriver,
    pub server: Option<SyncServer>,
    pub dir: tempfile::TempDir,
}

impl Agent {
    pub async fn start() -> Agent {
        init_tracing();
        let dir = tempfile::Builder::new()
            .prefix("drplane-agent-test")
            .tempdir()
            .unwrap();
        let driver = FsDriver::open(FsConfig::new(dir.path())).await.unwrap();
        let server = driver
            .serve_sync_source("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        Agent {
            driver,
            server: Some(server),
            dir,
        }
    }

    pub fn endpoint(&self) -> String {
        self.server.as_ref().unwrap().endpoint().to_string()
    }

    /// Drop the driver and open the same data directory again, as after a restart.
    pub async fn reopen(self) -> Agent {
        let Agent {
            driver,
            server,
            dir,
        } = self;
        if let Some(s) = server {
            s.shutdown().await;
        }
        drop(driver);
        let driver = FsDriver::open(FsConfig::new(dir.path())).await.unwrap();
        let server = driver
            .serve_sync_source("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        Agent {
            driver,
            server: Some(server),
            dir,
        }
    }

    pub async fn disk(&self, id: &str, size: u64, read_only: bool) {
        self.driver
            .create_volume(&spec(id, VolumeKind::Disk, size, read_only))
            .await
            .unwrap();
    }

    pub fn path(&self, id: &str) -> PathBuf {
        self.driver.volume_path(id).unwrap()
    }

    pub async fn sync_from(&self, src: &Agent, src_vol: &str, dst_vol: &str) -> SyncStats {
        self.driver
            .sync_from(
                &SyncRequest::new(src.endpoint(), src_vol, dst_vol),
                None,
                CancellationToken::new(),
            )
            .await
            .unwrap()
    }
}

pub fn spec(id: &str, kind: VolumeKind, size: u64, read_only: bool) -> VolumeSpec {
    VolumeSpec {
        id: id.into(),
        kind,
        pool: "default".into(),
        size_bytes: size,
        reserve: false,
        read_only,
    }
}

/// Fill an image with distinct, incompressible blocks derived from `seed` (cheap even in
/// a debug build: one random MiB, varied per block).
pub fn fill_image(path: &std::path::Path, size: u64, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut base = vec![0u8; MIB as usize];
    rng.fill_bytes(&mut base);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut off = 0;
    let mut block = base.clone();
    while off < size {
        let n = (size - off).min(MIB) as usize;
        let tag: u64 = rng.gen();
        for (i, chunk) in block[..n].chunks_mut(4096).enumerate() {
            let v = tag ^ (off + i as u64 * 4096);
            chunk[..8].copy_from_slice(&v.to_le_bytes());
        }
        f.write_all_at(&block[..n], off).unwrap();
        off += n as u64;
    }
    f.sync_all().unwrap();
}

/// Change `count` distinct blocks (chosen by `seed`) of a volume through the driver:
/// 4 KiB of new bytes at a random place in each. Returns the block indexes.
pub async fn change_blocks(
    driver: &FsDriver,
    id: &str,
    size: u64,
    count: usize,
    seed: u64,
) -> Vec<u64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let blocks = size / MIB;
    let mut chosen = Vec::new();
    while chosen.len() < count {
        let b = rng.gen_range(0..blocks);
        if !chosen.contains(&b) {
            chosen.push(b);
        }
    }
    for &b in &chosen {
        let mut data = vec![0u8; 4096];
        rng.fill_bytes(&mut data);
        let within = rng.gen_range(0..(MIB - 4096));
        driver
            .write(
                id,
                drplane_agent::WriteOp::At {
                    offset: b * MIB + within,
                    data: &data,
                },
            )
            .await
            .unwrap();
    }
    chosen
}
