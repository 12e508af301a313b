//! fs sync throughput against `cp`, and the cost of incremental syncs.
//!
//! Release only, not run in CI:
//!   cargo run --release -p drplane-agent --example sync_bench -- [--size-mib 1024] [--dir D]
//!       [--rounds 5] [--inc-rounds 3] [--full-only]
//!
//! Both agents run in this process with their sync servers on 127.0.0.1 and their data
//! directories on the same disk (under --dir, default the system temp dir). The source
//! image is in the page cache for every run, as it is for `cp`.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drplane_agent::{
    CancellationToken, Driver, FsConfig, FsDriver, SyncRequest, VolumeKind, VolumeSpec, WriteOp,
};

/// The allocator of the drplane binary, which runs the agents (node/src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MIB: u64 = 1 << 20;

fn spec(id: &str, size: u64, read_only: bool) -> VolumeSpec {
    VolumeSpec {
        id: id.into(),
        kind: VolumeKind::Disk,
        pool: "default".into(),
        size_bytes: size,
        reserve: false,
        read_only,
    }
}

/// Distinct pseudo-random blocks (xorshift), so no block is all zeros.
fn fill(path: &Path, size: u64) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < size {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = (size - off).min(MIB) as usize;
        f.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    f.sync_all()
}

fn fdatasync_p50(dir: &Path) -> std::io::Result<(Duration, Duration)> {
    let p = dir.join("fsync-probe");
    let f = std::fs::File::create(&p)?;
    let buf = [7u8; 4096];
    let mut t = Vec::with_capacity(100);
    for i in 0..100u64 {
        f.write_all_at(&buf, i * 4096)?;
        let s = Instant::now();
        f.sync_data()?;
        t.push(s.elapsed());
    }
    std::fs::remove_file(&p)?;
    t.sort();
    Ok((t[50], t[98]))
}

/// User + system CPU time of this process so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The 1, 5 and 15-minute load averages: other work on the machine skews every figure.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn mibps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

fn time_cp(src: &Path, dst: &Path, fsync: bool) -> std::io::Result<Duration> {
    let _ = std::fs::remove_file(dst);
    let s = Instant::now();
    let st = std::process::Command::new("cp")
        .arg(src)
        .arg(dst)
        .status()?;
    if !st.success() {
        return Err(std::io::Error::other("cp failed"));
    }
    if fsync {
        std::fs::File::open(dst)?.sync_all()?;
    }
    let d = s.elapsed();
    std::fs::remove_file(dst)?;
    Ok(d)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut size = 1024 * MIB;
    let mut base: PathBuf = std::env::temp_dir();
    let mut rounds = 5usize;
    let mut inc_rounds = 3usize;
    let mut full_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size-mib" => size = args.next().ok_or("--size-mib N")?.parse::<u64>()? * MIB,
            "--dir" => base = args.next().ok_or("--dir D")?.into(),
            "--rounds" => rounds = args.next().ok_or("--rounds N")?.parse::<usize>()?.max(1),
            "--inc-rounds" => {
                inc_rounds = args
                    .next()
                    .ok_or("--inc-rounds N")?
                    .parse::<usize>()?
                    .max(1)
            }
            // Only the full syncs (no cp, no incremental syncs): for profiling.
            "--full-only" => full_only = true,
            _ => return Err(format!("unknown argument {a}").into()),
        }
    }
    let work = tempfile::Builder::new()
        .prefix("drplane-sync-bench")
        .tempdir_in(&base)?;
    println!(
        "sync_bench: {} MiB image under {}; load average {}",
        size / MIB,
        work.path().display(),
        loadavg()
    );

    let (p50, p99) = fdatasync_p50(work.path())?;
    println!(
        "disk: fdatasync of a 4 KiB write p50 {:.3} ms, p99 {:.3} ms (100 samples)",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );

    // Hashing speed: why BLAKE3 is not the bottleneck.
    let block = vec![0xabu8; MIB as usize];
    let s = Instant::now();
    for _ in 0..256 {
        std::hint::black_box(blake3::hash(std::hint::black_box(&block)));
    }
    println!(
        "blake3: {:.0} MiB/s on one core",
        mibps(256 * MIB, s.elapsed())
    );

    let a = FsDriver::open(FsConfig::new(work.path().join("a"))).await?;
    let b = FsDriver::open(FsConfig::new(work.path().join("b"))).await?;
    let server = a.serve_sync_source("127.0.0.1:0".parse()?).await?;
    a.create_volume(&spec("img", size, false)).await?;
    let src = a.volume_path("img")?;
    fill(&src, size)?;
    // Warm the page cache for every contestant alike.
    std::fs::read(&src).map(drop)?;

    // One side's share of a sync: read and hash the image once.
    let s = Instant::now();
    {
        let f = std::fs::File::open(&src)?;
        let mut buf = vec![0u8; MIB as usize];
        let mut off = 0;
        while off < size {
            let n = (size - off).min(MIB) as usize;
            f.read_exact_at(&mut buf[..n], off)?;
            std::hint::black_box(blake3::hash(&buf[..n]));
            off += n as u64;
        }
    }
    let rh = s.elapsed();
    println!(
        "read + hash the image once: {:.3} s ({:.0} MiB/s)",
        rh.as_secs_f64(),
        mibps(size, rh)
    );

    let cp_dst = work.path().join("cp-copy");
    let mut cp = Vec::new();
    let mut cp_sync = Vec::new();
    let mut full = Vec::new();
    let mut full_cpu = Vec::new();
    // Profiling aid: `perf record -D -1 --control fifo:F …` with SYNC_BENCH_PERF_CTL=F
    // records the full syncs only.
    let perf_ctl = |cmd: &str| {
        if let Some(p) = std::env::var_os("SYNC_BENCH_PERF_CTL") {
            if let Err(e) = std::fs::write(&p, format!("{cmd}\n")) {
                eprintln!("perf control {}: {e}", Path::new(&p).display());
            }
        }
    };
    for round in 0..rounds {
        if !full_only {
            // Untimed: the copy's pages, freed again, are what the timed copies get. A
            // full sync writes around the page cache and frees none, and on a VM fresh
            // pages cost (the guest's freed memory goes back to the host): without this,
            // `cp` after a sync takes up to 5 times as long, flattering the ratio.
            time_cp(&src, &cp_dst, false)?;
            cp.push(time_cp(&src, &cp_dst, false)?);
            cp_sync.push(time_cp(&src, &cp_dst, true)?);
        }
        let id = format!("full{round}");
        b.create_volume(&spec(&id, size, true)).await?;
        perf_ctl("enable");
        let c0 = cpu_time();
        let st = b
            .sync_from(
                &SyncRequest::new(server.endpoint(), "img", &id),
                None,
                CancellationToken::new(),
            )
            .await?;
        full.push(st.elapsed);
        full_cpu.push(cpu_time() - c0);
        perf_ctl("disable");
        b.delete_volume(&id).await?;
    }
    if full_only {
        for (t, c) in full.iter().zip(&full_cpu) {
            println!(
                "full sync: {:.3} s, {:.3} CPU-s",
                t.as_secs_f64(),
                c.as_secs_f64()
            );
        }
        server.shutdown().await;
        return Ok(());
    }
    let med = median;
    let best = |v: &[Duration]| v.iter().min().copied().unwrap_or_default();
    println!("                median     best   ({rounds} rounds, each cp, cp + fsync, full sync)");
    let row = |name: &str, v: &[Duration], what: &str| {
        println!(
            "{name:<14}{:>7.3} s {:>7.3} s {:>6.0} MiB/s (median) {what}",
            med(v).as_secs_f64(),
            best(v).as_secs_f64(),
            mibps(size, med(v))
        )
    };
    row("cp:", &cp, "(page cache, no fsync)");
    row("cp + fsync:", &cp_sync, "");
    row(
        "fs full sync:",
        &full,
        "(hash both sides, gRPC, write, fsync, verify)",
    );
    println!(
        "  CPU for the full sync (both agents): {:.3} s user+sys (median), {:.2} cores busy",
        med(&full_cpu).as_secs_f64(),
        med(&full_cpu).as_secs_f64() / med(&full).as_secs_f64()
    );
    println!(
        "ratio fs sync / cp+fsync throughput: {:.2} (medians; best/best {:.2})   (/ cp without fsync: {:.2})",
        med(&cp_sync).as_secs_f64() / med(&full).as_secs_f64(),
        best(&cp_sync).as_secs_f64() / best(&full).as_secs_f64(),
        med(&cp).as_secs_f64() / med(&full).as_secs_f64()
    );

    // Incremental syncs: a fixed cost (both sides read and hash the image) plus the
    // changed blocks (journal, commit, apply).
    b.create_volume(&spec("inc", size, true)).await?;
    let req = SyncRequest::new(server.endpoint(), "img", "inc");
    b.sync_from(&req, None, CancellationToken::new()).await?;
    let blocks = size / MIB;
    println!(
        "incremental syncs of a {} MiB image (1 MiB blocks), median of {inc_rounds}:",
        size / MIB
    );
    // A full sync into a new copy writes around the page cache: the next sync reads the
    // target's copy from disk.
    let st = b.sync_from(&req, None, CancellationToken::new()).await?;
    println!(
        "  first sync after the full sync (target copy not cached): {:.3} s, {} bytes sent",
        st.elapsed.as_secs_f64(),
        st.bytes_sent
    );
    println!("  changed blocks   sent bytes      time     per changed MiB");
    let mut base_time = None;
    let mut round = 0u64;
    for changed in [0u64, 1, blocks / 100, blocks / 10, blocks / 4] {
        let mut times = Vec::new();
        let mut sent = (0, 0);
        for _ in 0..inc_rounds {
            round += 1;
            for k in 0..changed {
                let blk = (k * 7919 + round * 104_729) % blocks;
                a.write(
                    "img",
                    WriteOp::At {
                        offset: blk * MIB + 100,
                        data: &(round << 32 | k).to_le_bytes(),
                    },
                )
                .await?;
            }
            let st = b.sync_from(&req, None, CancellationToken::new()).await?;
            times.push(st.elapsed);
            sent = (st.blocks_sent, st.bytes_sent);
        }
        let t = med(&times);
        let base: Duration = *base_time.get_or_insert(t);
        let per = if sent.0 > 0 {
            format!(
                "{:.2} ms",
                (t.saturating_sub(base)).as_secs_f64() * 1e3 / sent.0 as f64
            )
        } else {
            "-".into()
        };
        println!(
            "  {:>6} ({:>5.1}%) {:>12} {:>9.3} s   {per}",
            sent.0,
            sent.0 as f64 * 100.0 / blocks as f64,
            sent.1,
            t.as_secs_f64()
        );
    }
    println!("load average at the end: {}", loadavg());
    assert_eq!(a.checksum("img").await?, b.checksum("inc").await?);
    server.shutdown().await;
    Ok(())
}
