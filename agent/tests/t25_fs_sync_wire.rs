//! The block-sync stream on the wire: over mutual TLS, against tonic's generated client,
//! and with a byte changed in transit (the copy is verified, not trusted).

mod common;

use std::path::Path;

use common::*;
use drplane_agent::proto::block_sync_client::BlockSyncClient;
use drplane_agent::proto::{self, source_msg, target_msg, TargetMsg};
use drplane_agent::{
    AgentTls, CancellationToken, Driver, DriverError, FsConfig, FsDriver, SyncRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA and one certificate for 127.0.0.1 and localhost, issued by it (PEM).
struct Pki {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

fn pki(name: &str) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.distinguished_name
        .push(DnType::CommonName, format!("{name} CA"));
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let mut p = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    p.distinguished_name
        .push(DnType::CommonName, format!("{name} agent"));
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
    Pki {
        ca: ca_cert.pem().into_bytes(),
        cert: cert.pem().into_bytes(),
        key: key.serialize_pem().into_bytes(),
    }
}

async fn tls_agent(dir: &Path, tls: AgentTls) -> (FsDriver, drplane_agent::SyncServer) {
    let mut cfg = FsConfig::new(dir);
    cfg.tls = Some(tls);
    let driver = FsDriver::open(cfg).await.unwrap();
    let server = driver
        .serve_sync_source("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    (driver, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t25_sync_over_mutual_tls() {
    init_tracing();
    let p = pki("cluster");
    let tls = AgentTls::from_pem(p.ca.clone(), p.cert.clone(), p.key.clone());
    let dirs = [
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    ];
    let (src, server) = tls_agent(dirs[0].path(), tls.clone()).await;
    let (dst, _dst_server) = tls_agent(dirs[1].path(), tls.clone()).await;
    assert!(server.endpoint().starts_with("https://"));
    let size = 8 * MIB + 12_345;
    src.create_volume(&spec("img", drplane_agent::VolumeKind::Disk, size, false))
        .await
        .unwrap();
    fill_image(&src.volume_path("img").unwrap(), size, 11);
    dst.create_volume(&spec("img", drplane_agent::VolumeKind::Disk, size, true))
        .await
        .unwrap();
    let req = SyncRequest::new(server.endpoint(), "img", "img");
    let st = dst
        .sync_from(&req, None, CancellationToken::new())
        .await
        .unwrap();
    let d = src.checksum("img").await.unwrap();
    assert_eq!(st.digest, d);
    assert_eq!(dst.checksum("img").await.unwrap(), d);
    assert_eq!(
        drplane_agent::blocksync::remote_digest(server.endpoint(), "img", Some(&tls))
            .await
            .unwrap(),
        d
    );

    // An agent whose certificate another CA issued is refused, and trusts no one else.
    let q = pki("rogue");
    let rogue_tls = AgentTls::from_pem(q.ca, q.cert, q.key);
    let (rogue, _rogue_server) = tls_agent(dirs[2].path(), rogue_tls).await;
    rogue
        .create_volume(&spec("img", drplane_agent::VolumeKind::Disk, size, true))
        .await
        .unwrap();
    let err = rogue
        .sync_from(&req, None, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::Remote { .. }), "{err:?}");
}

/// tonic's generated client decodes the source's hand-framed stream: it is plain gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t26_tonic_client_reads_the_sync_stream() {
    let src = Agent::start().await;
    let size = 3 * MIB + 777;
    src.disk("img", size, false).await;
    fill_image(&src.path("img"), size, 3);
    let image = std::fs::read(src.path("img")).unwrap();

    let mut client = BlockSyncClient::connect(src.endpoint()).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<TargetMsg>(4);
    tx.send(TargetMsg {
        msg: Some(target_msg::Msg::Begin(proto::Begin {
            volume: "img".into(),
            block_size: MIB as u32,
            bwlimit: 0,
            task_id: "t26".into(),
            chunk_size: 256 << 10,
        })),
    })
    .await
    .unwrap();
    tx.send(TargetMsg {
        msg: Some(target_msg::Msg::Sums(proto::FileSums {
            file: 0,
            hashes: Default::default(),
            assume_zero: true,
            last: true,
        })),
    })
    .await
    .unwrap();
    let mut stream = client
        .sync(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut copy = vec![0u8; size as usize];
    let (mut header, mut trailer, mut pieces) = (None, None, 0);
    while let Some(m) = stream.message().await.unwrap() {
        match m.msg.unwrap() {
            source_msg::Msg::Header(h) => header = Some(h),
            source_msg::Msg::Block(b) => {
                let at = b.offset as usize;
                copy[at..at + b.data.len()].copy_from_slice(&b.data);
                pieces += 1;
            }
            source_msg::Msg::Trailer(t) => trailer = Some(t),
            _ => {}
        }
    }
    drop(tx);
    let header = header.expect("a header");
    assert_eq!(header.total_bytes, size);
    assert_eq!(copy, image);
    // 256 KiB pieces: 4 per whole block, 1 for the 777-byte tail.
    assert_eq!(pieces, 13);
    let trailer = trailer.expect("a trailer");
    assert_eq!(trailer.data_bytes, size);
    assert_eq!(trailer.blocks_sent, 4);
    assert_eq!(
        trailer.digest.as_ref(),
        &src.driver.checksum("img").await.unwrap().0[..]
    );
}

/// Forward one connection to `upstream`, flipping the byte at offset `flip` of what comes
/// back from it.
async fn corrupting_proxy(upstream: std::net::SocketAddr, flip: u64) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (down, _) = listener.accept().await.unwrap();
        let up = tokio::net::TcpStream::connect(upstream).await.unwrap();
        let (mut down_r, mut down_w) = down.into_split();
        let (mut up_r, mut up_w) = up.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut down_r, &mut up_w).await;
            let _ = up_w.shutdown().await;
        });
        let mut buf = vec![0u8; 64 << 10];
        let mut at = 0u64;
        loop {
            let n = match up_r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if (at..at + n as u64).contains(&flip) {
                buf[(flip - at) as usize] ^= 0x20;
            }
            at += n as u64;
            if down_w.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = down_w.shutdown().await;
    });
    addr
}

/// A full sync into a new (empty) target writes around the journal and takes no hashes
/// from it, yet a byte changed on the way is caught: the target hashes what it receives,
/// refuses the copy and keeps the volume as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t27_full_sync_detects_corruption_in_transit() {
    let src = Agent::start().await;
    let dst = Agent::start().await;
    let size = 8 * MIB;
    src.disk("img", size, false).await;
    fill_image(&src.path("img"), size, 9);
    dst.disk("img-r", size, true).await;
    let before = dst.driver.checksum("img-r").await.unwrap();

    let upstream = src.server.as_ref().unwrap().local_addr().unwrap();
    // Inside the data of the fourth 1 MiB block.
    let proxy = corrupting_proxy(upstream, 3 * MIB + MIB / 2).await;
    let req = SyncRequest::new(format!("http://{proxy}"), "img", "img-r");
    let err = dst
        .driver
        .sync_from(&req, None, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::Corrupt(_)), "{err:?}");
    assert_eq!(dst.driver.checksum("img-r").await.unwrap(), before);
    let dir = dst.path("img-r").parent().unwrap().to_path_buf();
    assert!(!dir.join("data.sync-new").exists(), "the new copy is gone");
    assert!(!dir.join("journal").exists());

    // Without the proxy the same sync succeeds.
    let st = dst.sync_from(&src, "img", "img-r").await;
    assert_eq!(st.digest, src.driver.checksum("img").await.unwrap());
    assert_eq!(dst.driver.checksum("img-r").await.unwrap(), st.digest);
}

/// Forward connections to `upstream` until `cut` is cancelled; from then on move no more
/// bytes either way but keep the sockets open, like a peer that dropped off the network.
async fn blackhole_proxy(
    upstream: std::net::SocketAddr,
    cut: CancellationToken,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((down, _)) = listener.accept().await {
            let up = tokio::net::TcpStream::connect(upstream).await.unwrap();
            let (down_r, down_w) = down.into_split();
            let (up_r, up_w) = up.into_split();
            for (mut r, mut w) in [(down_r, up_w), (up_r, down_w)].map(|(r, w)| {
                (
                    Box::new(r) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                    Box::new(w) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                )
            }) {
                let cut = cut.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = tokio::select! {
                            _ = cut.cancelled() => break,
                            n = r.read(&mut buf) => match n {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            },
                        };
                        if cut.is_cancelled() || w.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    // Silent from here on: hold both halves open, move nothing.
                    std::future::pending::<()>().await;
                    drop((r, w));
                });
            }
        }
    });
    addr
}

/// A source that drops off the network mid-sync (no FIN, no RST: the bytes just stop) is
/// noticed by the HTTP/2 pings: the sync fails as a remote error within seconds instead of
/// waiting for the next block until the task is cancelled, and the target keeps its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t28_a_silent_source_fails_the_sync_within_the_keepalive() {
    let src = Agent::start().await;
    let dst = Agent::start().await;
    let size = 64 * MIB;
    src.disk("img", size, false).await;
    fill_image(&src.path("img"), size, 5);
    dst.disk("img-r", size, true).await;
    let before = dst.driver.checksum("img-r").await.unwrap();

    let upstream = src.server.as_ref().unwrap().local_addr().unwrap();
    let cut = CancellationToken::new();
    let proxy = blackhole_proxy(upstream, cut.clone()).await;
    let mut req = SyncRequest::new(format!("http://{proxy}"), "img", "img-r");
    // 8 MiB/s: the 64 MiB copy would take about 8 s, so it is mid-way when the link dies.
    req.bwlimit = Some(8 * MIB);
    let sync = {
        let driver = dst.driver.clone();
        tokio::spawn(async move { driver.sync_from(&req, None, CancellationToken::new()).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    cut.cancel();
    let cut_at = std::time::Instant::now();
    let result = tokio::time::timeout(std::time::Duration::from_secs(30), sync)
        .await
        .expect("the sync still waits 30 s after its source went silent")
        .unwrap();
    let waited = cut_at.elapsed();
    let err = result.expect_err("a sync whose source went silent cannot succeed");
    assert!(matches!(err, DriverError::Remote { .. }), "{err:?}");
    assert!(
        waited < std::time::Duration::from_secs(12),
        "noticed only after {waited:?}"
    );
    assert_eq!(dst.driver.checksum("img-r").await.unwrap(), before);
}
