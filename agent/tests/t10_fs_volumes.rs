//! fs volumes: create, inventory, space, fencing, qcow2 import.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use drplane_agent::{Driver, DriverError, FsConfig, FsDriver, ImageFormat, VolumeKind, WriteOp};

#[tokio::test]
async fn t10_fence_refuses_writes_and_promote_reenables() {
    let a = Agent::start().await;
    a.disk("d", 4 * MIB, false).await;
    let w = |data: &'static [u8]| WriteOp::At { offset: 4096, data };
    a.driver.write("d", w(b"one")).await.unwrap();
    a.driver.fence("d").await.unwrap();
    a.driver.fence("d").await.unwrap(); // idempotent
    let r = a.driver.write("d", w(b"two")).await;
    assert!(matches!(r, Err(DriverError::Fenced(_))), "{r:?}");
    let mode = std::fs::metadata(a.path("d")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o444);
    assert!(a.driver.volume("d").await.unwrap().fenced);
    // Reads still work on a fenced volume.
    let before = a.driver.checksum("d").await.unwrap();
    // Fencing survives a restart.
    let a = a.reopen().await;
    assert!(matches!(
        a.driver.write("d", w(b"two")).await,
        Err(DriverError::Fenced(_))
    ));
    a.driver.promote("d").await.unwrap();
    a.driver.promote("d").await.unwrap(); // idempotent
    let mode = std::fs::metadata(a.path("d")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
    a.driver.write("d", w(b"two")).await.unwrap();
    assert_ne!(a.driver.checksum("d").await.unwrap(), before);

    // Shares: files and directories lose their write bits, and get them back.
    a.driver
        .create_volume(&spec("s", VolumeKind::Share, MIB, false))
        .await
        .unwrap();
    a.driver
        .write(
            "s",
            WriteOp::File {
                path: "x/y.txt",
                data: b"y",
            },
        )
        .await
        .unwrap();
    a.driver.fence("s").await.unwrap();
    let r = a
        .driver
        .write(
            "s",
            WriteOp::File {
                path: "x/z.txt",
                data: b"z",
            },
        )
        .await;
    assert!(matches!(r, Err(DriverError::Fenced(_))), "{r:?}");
    let r = a.driver.write("s", WriteOp::Remove { path: "x" }).await;
    assert!(matches!(r, Err(DriverError::Fenced(_))), "{r:?}");
    let f = a.path("s").join("x/y.txt");
    assert_eq!(
        std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
        0o444
    );
    a.driver.promote("s").await.unwrap();
    assert_eq!(
        std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
        0o644
    );
    a.driver
        .write(
            "s",
            WriteOp::File {
                path: "x/z.txt",
                data: b"z",
            },
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn t11_create_is_idempotent_and_checks_space() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let d = FsDriver::open(FsConfig::new(dir.path()).with_pool("small", Some(10 * MIB)))
        .await
        .unwrap();
    let mut s = spec("a", VolumeKind::Disk, 6 * MIB, false);
    s.pool = "small".into();
    s.reserve = true;
    let info = d.create_volume(&s).await.unwrap();
    assert_eq!(info.size_bytes, 6 * MIB);
    assert!(info.allocated_bytes >= 6 * MIB, "reserved: {info:?}");
    assert_eq!(d.create_volume(&s).await.unwrap().id, "a");
    let mut other = s.clone();
    other.size_bytes = 7 * MIB;
    assert!(matches!(
        d.create_volume(&other).await,
        Err(DriverError::AlreadyExists { .. })
    ));
    let mut b = s.clone();
    b.id = "b".into();
    match d.create_volume(&b).await {
        Err(DriverError::NoSpace { pool, needed, free }) => {
            assert_eq!(pool, "small");
            assert_eq!(needed, 6 * MIB);
            assert_eq!(free, 4 * MIB);
        }
        r => panic!("{r:?}"),
    }
    let inv = d.inventory().await.unwrap();
    assert_eq!(inv.driver, "fs");
    assert_eq!(inv.pools[0].free_bytes, 4 * MIB);
    assert_eq!(inv.volumes.len(), 1);
    for bad in ["", ".x", "../x", "a/b", "x y"] {
        let mut s = s.clone();
        s.id = bad.into();
        assert!(matches!(
            d.create_volume(&s).await,
            Err(DriverError::InvalidArgument(_))
        ));
    }
    d.delete_volume("a").await.unwrap();
    d.delete_volume("a").await.unwrap();
    assert!(matches!(d.volume("a").await, Err(DriverError::NotFound(_))));
    assert_eq!(d.inventory().await.unwrap().pools[0].free_bytes, 10 * MIB);
    // Only configured pools exist.
    assert!(matches!(
        d.create_volume(&spec("s", VolumeKind::Share, 0, false))
            .await,
        Err(DriverError::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn t13_share_writes_stay_inside_the_share() {
    let a = Agent::start().await;
    a.driver
        .create_volume(&spec("s", VolumeKind::Share, 0, false))
        .await
        .unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), a.path("s").join("out")).unwrap();
    for path in ["../x", "/etc/x", "a/../../x", "out/x", ""] {
        let r = a
            .driver
            .write("s", WriteOp::File { path, data: b"x" })
            .await;
        assert!(
            matches!(r, Err(DriverError::InvalidArgument(_))),
            "{path}: {r:?}"
        );
    }
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    // A disk takes no file writes, a share no offset writes.
    a.disk("d", MIB, false).await;
    assert!(matches!(
        a.driver
            .write(
                "d",
                WriteOp::File {
                    path: "f",
                    data: b"x"
                }
            )
            .await,
        Err(DriverError::InvalidArgument(_))
    ));
    assert!(matches!(
        a.driver
            .write(
                "s",
                WriteOp::At {
                    offset: 0,
                    data: b"x"
                }
            )
            .await,
        Err(DriverError::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn t12_qcow2_import_and_export() {
    if std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("qemu-img not installed: skipped");
        return;
    }
    let a = Agent::start().await;
    let work = tempfile::tempdir().unwrap();
    let raw = work.path().join("src.raw");
    std::fs::write(&raw, vec![0u8; 4 * MIB as usize]).unwrap();
    fill_image(&raw, 3 * MIB, 77);
    let qcow = work.path().join("src.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    a.driver
        .import_image(&spec("from-raw", VolumeKind::Disk, 0, false), &raw)
        .await
        .unwrap();
    let info = a
        .driver
        .import_image(&spec("from-qcow", VolumeKind::Disk, 0, false), &qcow)
        .await
        .unwrap();
    assert_eq!(info.size_bytes, 4 * MIB);
    let d = a.driver.checksum("from-raw").await.unwrap();
    assert_eq!(a.driver.checksum("from-qcow").await.unwrap(), d);
    let back = work.path().join("back.qcow2");
    a.driver
        .export_image("from-qcow", &back, ImageFormat::Qcow2)
        .await
        .unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&back)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}
