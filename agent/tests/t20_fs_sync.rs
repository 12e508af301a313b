//! fs block sync between two agents over real gRPC on 127.0.0.1, with real files.

mod common;

use common::*;
use drplane_agent::{
    ApplyMode, CancellationToken, Driver, MigrateRequest, SyncRequest, SyncSource, VolumeKind,
    WriteOp,
};

const SIZE: u64 = 256 * MIB;

/// The issue's test: sync a 256 MiB image, change 1% of its blocks, sync again: the second
/// sync moves about 1% of the bytes and the copy's digest equals the source's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_incremental_sync_moves_only_changed_blocks() {
    let src = Agent::start().await;
    let dst = Agent::start().await;
    src.disk("img", SIZE, false).await;
    fill_image(&src.path("img"), SIZE, 42);
    dst.disk("img-r", SIZE, true).await;

    let full = dst.sync_from(&src, "img", "img-r").await;
    let d_src = src.driver.checksum("img").await.unwrap();
    let d_dst = dst.driver.checksum("img-r").await.unwrap();
    assert_eq!(d_src, d_dst);
    assert_eq!(full.digest, d_src);
    assert_eq!(
        full.mode,
        ApplyMode::Shadow,
        "a never-written replica gets a new file"
    );
    assert_eq!(full.data_bytes, SIZE);
    assert_eq!(full.blocks_sent, 256);
    println!(
        "full sync: {} bytes sent for {} in {:?}",
        full.bytes_sent, SIZE, full.elapsed
    );

    // 1% of 256 blocks, rounded up: 3 blocks.
    let changed = change_blocks(&src.driver, "img", SIZE, 3, 7).await;
    let inc = dst.sync_from(&src, "img", "img-r").await;
    let d_src = src.driver.checksum("img").await.unwrap();
    let d_dst = dst.driver.checksum("img-r").await.unwrap();
    assert_eq!(
        d_src, d_dst,
        "copy equals source after the incremental sync"
    );
    assert_eq!(inc.digest, d_src);
    assert_eq!(inc.mode, ApplyMode::Journal);
    assert_eq!(inc.blocks_sent, changed.len() as u64);
    assert_eq!(inc.data_bytes, changed.len() as u64 * MIB);
    let pct = inc.bytes_sent as f64 * 100.0 / SIZE as f64;
    println!(
        "incremental sync: {} of 256 blocks changed, bytes_sent={} ({pct:.3}% of 256 MiB), data_bytes={}, target hashes sent={} B, {:?}",
        changed.len(),
        inc.bytes_sent,
        inc.data_bytes,
        inc.hash_bytes,
        inc.elapsed
    );
    assert!(
        (0.5..=3.0).contains(&pct),
        "second sync moved {pct:.3}% of the image"
    );

    // Nothing changed: nothing moves but hashes and the trailer.
    let again = dst.sync_from(&src, "img", "img-r").await;
    assert_eq!(again.data_bytes, 0);
    assert_eq!(again.mode, ApplyMode::None);
    assert!(again.bytes_sent < 64 * 1024, "{}", again.bytes_sent);
    assert_eq!(dst.driver.checksum("img-r").await.unwrap(), d_src);
}

/// Planned failover then reinit (reverse): final sync, fence the source, promote the
/// target, write there, then bring the old source back as the replica with only the delta.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t21_planned_failover_and_reverse_lose_nothing() {
    let a = Agent::start().await;
    let b = Agent::start().await;
    let size = 16 * MIB;
    a.disk("vm1", size, false).await;
    fill_image(&a.path("vm1"), size, 1);
    b.disk("vm1", size, true).await;
    b.sync_from(&a, "vm1", "vm1").await;

    // Writes after the last periodic sync.
    change_blocks(&a.driver, "vm1", size, 2, 2).await;
    // Planned failover: final sync, fence the source, promote the target.
    b.sync_from(&a, "vm1", "vm1").await;
    a.driver.fence("vm1").await.unwrap();
    b.driver.promote("vm1").await.unwrap();
    let at_failover = a.driver.checksum("vm1").await.unwrap();
    assert_eq!(b.driver.checksum("vm1").await.unwrap(), at_failover);
    // The old primary refuses writes now.
    let w = a
        .driver
        .write(
            "vm1",
            WriteOp::At {
                offset: 0,
                data: b"x",
            },
        )
        .await;
    assert!(
        matches!(w, Err(drplane_agent::DriverError::Fenced(_))),
        "{w:?}"
    );

    // The new primary takes writes; reverse sends only them.
    change_blocks(&b.driver, "vm1", size, 1, 3).await;
    let rev = a.sync_from(&b, "vm1", "vm1").await;
    assert_eq!(rev.blocks_sent, 1);
    assert_eq!(
        a.driver.checksum("vm1").await.unwrap(),
        b.driver.checksum("vm1").await.unwrap()
    );
    // Syncing into a writable primary is refused.
    let r = b
        .driver
        .sync_from(
            &SyncRequest::new(a.endpoint(), "vm1", "vm1"),
            None,
            CancellationToken::new(),
        )
        .await;
    assert!(
        matches!(r, Err(drplane_agent::DriverError::TargetWritable(_))),
        "{r:?}"
    );
}

/// A share: nested files, a symlink, an empty directory and modes; then a deletion, a
/// change and a new file propagate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t22_share_sync_with_nested_files_and_deletion() {
    let src = Agent::start().await;
    let dst = Agent::start().await;
    src.driver
        .create_volume(&spec("docs", VolumeKind::Share, 64 * MIB, false))
        .await
        .unwrap();
    dst.driver
        .create_volume(&spec("docs", VolumeKind::Share, 64 * MIB, true))
        .await
        .unwrap();
    let big: Vec<u8> = (0..3 * MIB + 12345).map(|i| (i * 31 % 251) as u8).collect();
    let d = &src.driver;
    d.write(
        "docs",
        WriteOp::File {
            path: "top.txt",
            data: b"hello",
        },
    )
    .await
    .unwrap();
    d.write(
        "docs",
        WriteOp::File {
            path: "a/b/c.txt",
            data: b"deep",
        },
    )
    .await
    .unwrap();
    d.write(
        "docs",
        WriteOp::File {
            path: "a/b/d.txt",
            data: b"also deep",
        },
    )
    .await
    .unwrap();
    d.write(
        "docs",
        WriteOp::File {
            path: "a/big.bin",
            data: &big,
        },
    )
    .await
    .unwrap();
    d.write(
        "docs",
        WriteOp::File {
            path: "empty.txt",
            data: b"",
        },
    )
    .await
    .unwrap();
    let root = src.path("docs");
    std::fs::create_dir(root.join("emptydir")).unwrap();
    std::os::unix::fs::symlink("a/b/c.txt", root.join("link")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("top.txt"), std::fs::Permissions::from_mode(0o750)).unwrap();

    let s1 = dst.sync_from(&src, "docs", "docs").await;
    let want = src.driver.checksum("docs").await.unwrap();
    assert_eq!(dst.driver.checksum("docs").await.unwrap(), want);
    assert_eq!(s1.digest, want);
    let troot = dst.path("docs");
    assert_eq!(std::fs::read(troot.join("a/b/c.txt")).unwrap(), b"deep");
    assert_eq!(std::fs::read(troot.join("a/big.bin")).unwrap(), big);
    assert_eq!(
        std::fs::read_link(troot.join("link")).unwrap(),
        std::path::Path::new("a/b/c.txt")
    );
    assert!(troot.join("emptydir").is_dir());
    // The replica is fenced: read-only on disk.
    let m = std::fs::metadata(troot.join("top.txt"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(m, 0o550);

    // Delete a subtree, change a file, add one.
    d.write("docs", WriteOp::Remove { path: "a/b" })
        .await
        .unwrap();
    d.write(
        "docs",
        WriteOp::File {
            path: "top.txt",
            data: b"hello, again",
        },
    )
    .await
    .unwrap();
    d.write(
        "docs",
        WriteOp::File {
            path: "new/n.txt",
            data: b"new",
        },
    )
    .await
    .unwrap();
    let s2 = dst.sync_from(&src, "docs", "docs").await;
    let want = src.driver.checksum("docs").await.unwrap();
    assert_eq!(dst.driver.checksum("docs").await.unwrap(), want);
    assert!(!troot.join("a/b").exists(), "deletion propagated");
    assert!(troot.join("a/big.bin").exists());
    assert_eq!(
        std::fs::read(troot.join("top.txt")).unwrap(),
        b"hello, again"
    );
    assert_eq!(std::fs::read(troot.join("new/n.txt")).unwrap(), b"new");
    // The big unchanged file was not resent.
    assert!(s2.data_bytes < 1024, "{}", s2.data_bytes);
    println!(
        "share: first sync {} B sent, second {} B sent ({} B of data)",
        s1.bytes_sent, s2.bytes_sent, s2.data_bytes
    );

    // Promote: the modes the source has come back.
    dst.driver.promote("docs").await.unwrap();
    let m = std::fs::metadata(troot.join("top.txt"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(m, 0o750);
    assert_eq!(dst.driver.checksum("docs").await.unwrap(), want);
    dst.driver
        .write(
            "docs",
            WriteOp::File {
                path: "after.txt",
                data: b"writable",
            },
        )
        .await
        .unwrap();
}

/// Cold migration: the new host creates, syncs, verifies and promotes its copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t23_migrate_creates_syncs_and_promotes() {
    let a = Agent::start().await;
    let b = Agent::start().await;
    a.disk("db0", 8 * MIB, false).await;
    fill_image(&a.path("db0"), 8 * MIB, 9);
    a.driver.fence("db0").await.unwrap();
    let req = MigrateRequest {
        source: SyncSource {
            endpoint: a.endpoint(),
            volume: "db0".into(),
        },
        target: spec("db0", VolumeKind::Disk, 8 * MIB, false),
        bwlimit: None,
        task_id: Some("task-1".into()),
    };
    let stats = b
        .driver
        .migrate(&req, None, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(stats.data_bytes, 8 * MIB);
    let info = b.driver.volume("db0").await.unwrap();
    assert!(!info.fenced);
    assert_eq!(
        b.driver.checksum("db0").await.unwrap(),
        a.driver.checksum("db0").await.unwrap()
    );
    // Retrying the finished migration is harmless.
    b.driver.fence("db0").await.unwrap();
    b.driver
        .migrate(&req, None, CancellationToken::new())
        .await
        .unwrap();
    // The switch: the old host drops its copy.
    a.driver.delete_volume("db0").await.unwrap();
    assert!(a.driver.inventory().await.unwrap().volumes.is_empty());
}
