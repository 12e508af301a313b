//! Transport security on real processes: a three-node cluster over HTTPS with mutual TLS
//! between nodes; a node whose certificate comes from an unknown CA cannot join or talk to
//! the others; plain HTTP to a TLS node fails; a node refuses to start with half a TLS
//! configuration or with files that do not fit together.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chaos_tests::{drplane_bin, free_port, https_client, Cluster, NodeTls, TestPki};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Slower elections for CI: see [`chaos_tests::SLOW_ELECTIONS`].
const TIMING: &[&str] = chaos_tests::SLOW_ELECTIONS;

/// Open a TLS connection to a raft (gRPC) port presenting `client`'s certificate, send the
/// HTTP/2 preface and an empty SETTINGS frame, and report whether the server answered
/// with HTTP/2 frames (true) or cut the connection (false). With TLS 1.3 a refused client
/// certificate shows only after the handshake, as an alert on the first read.
async fn raft_port_accepts(addr: &str, client: &NodeTls, trust: &Path) -> anyhow::Result<bool> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(trust).context("ca")? {
        roots.add(c.context("ca cert")?)?;
    }
    let chain = CertificateDer::pem_file_iter(&client.cert)
        .context("cert")?
        .collect::<Result<Vec<_>, _>>()
        .context("cert")?;
    let key = PrivateKeyDer::from_pem_file(&client.key).context("key")?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls = match connector
        .connect(ServerName::try_from("127.0.0.1")?, tcp)
        .await
    {
        Ok(s) => s,
        Err(_) => return Ok(false),
    };
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // empty SETTINGS
    if tls.write_all(&hello).await.is_err() || tls.flush().await.is_err() {
        return Ok(false);
    }
    let mut buf = [0u8; 9];
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
        Ok(Ok(n)) => Ok(n > 0 && buf[3] == 4), // a SETTINGS frame header
        Ok(Err(_)) => Ok(false),
        Err(_) => anyhow::bail!("raft port {addr}: no answer and no close within 5 s"),
    }
}

/// An HTTPS client trusting `cas` that sends the admin's token.
fn client_trusting(cas: &[&Path], token: Option<&str>) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .timeout(Duration::from_secs(10));
    for ca in cas {
        b = b.add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca)?)?);
    }
    if let Some(t) = token {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("x-auth-token", reqwest::header::HeaderValue::from_str(t)?);
        b = b.default_headers(headers);
    }
    Ok(b.build()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_cluster_works_and_refuses_strangers() -> anyhow::Result<()> {
    let mut c = Cluster::start_tls(&["site-a", "site-b", "site-c"], TIMING).await?;
    assert!(c.url(1).starts_with("https://"), "{}", c.url(1));
    let cluster_ca = c.pki.as_ref().expect("tls cluster").ca_cert.clone();

    // Works over HTTPS: a write through a follower is forwarded to the leader over mutual
    // TLS, and every node reads it linearizably (read index over mutual TLS too).
    let leader = c.wait_leader(Duration::from_secs(10)).await?;
    let follower = c
        .ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    let r = c
        .post(follower, "/drplane/v1/sites", &json!({"name": "tls-site"}))
        .await?;
    assert_eq!(r.status, 201, "{}", r.text);
    for id in c.ids() {
        let r = c.get(id, "/drplane/v1/sites/tls-site").await?;
        assert_eq!(r.status, 200, "node {id}: {}", r.text);
    }
    let status = c.status(follower).await?;
    let members = status["members"].as_array().expect("members");
    assert_eq!(members.len(), 3);
    assert!(members.iter().all(|m| m["role"] == "voter"), "{status}");

    // Plain HTTP to a TLS node fails; so does HTTPS from a client that does not trust the
    // cluster CA.
    let http_addr = c.spec(1)?.http.clone();
    let raft_addr = c.spec(1)?.raft.clone();
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let r = plain.get(format!("http://{http_addr}/livez")).send().await;
    assert!(r.is_err(), "plain HTTP to a TLS node must fail: {r:?}");
    let stranger = TestPki::new(&c.dir.path().join("stranger"), "stranger CA")?;
    let untrusting = https_client(&[&stranger.ca_cert])?;
    let r = untrusting
        .get(format!("https://{http_addr}/livez"))
        .send()
        .await;
    assert!(
        r.is_err(),
        "a server certificate from an unknown CA must be refused: {r:?}"
    );
    let r = plain.get(format!("http://{raft_addr}/")).send().await;
    assert!(r.is_err(), "plain HTTP to the raft port must fail: {r:?}");

    // The CLI over https: trusting the cluster CA (--ca or DRPLANE_CA) it works; without
    // a CA, or with another one, it fails and says how to fix it.
    let admin = [
        ("DRPLANE_USER", "admin"),
        ("DRPLANE_PASSWORD", chaos_tests::ADMIN_PASSWORD),
    ];
    let url1 = c.url(1);
    let ca_arg = cluster_ca.to_string_lossy().into_owned();
    let (ok, out, err) = chaos_tests::cli_env(
        &["cluster", "status", "--endpoint", &url1, "--ca", &ca_arg],
        &admin,
    )?;
    assert!(ok, "cli over https with --ca: {out}\n{err}");
    assert!(out.contains("voter"), "{out}");
    let mut with_env = admin.to_vec();
    with_env.push(("DRPLANE_CA", &ca_arg));
    let (ok, out, err) = chaos_tests::cli_env(
        &["sites", "list", "-o", "json", "--endpoint", &url1],
        &with_env,
    )?;
    assert!(ok, "cli over https with DRPLANE_CA: {out}\n{err}");
    assert!(out.contains("tls-site"), "{out}");
    let stranger_ca = stranger.ca_cert.to_string_lossy().into_owned();
    for extra in [vec![], vec!["--ca", stranger_ca.as_str()]] {
        let mut args = vec!["cluster", "status", "--endpoint", &url1];
        args.extend(extra.iter().copied());
        let (ok, out, err) = chaos_tests::cli_env(&args, &admin)?;
        assert!(!ok, "{args:?} must fail: {out}");
        assert!(
            err.contains("certificate verification failed") && err.contains("--ca FILE"),
            "{args:?}: {err}"
        );
    }

    // The raft port takes a client certificate from the cluster CA and cuts off one from
    // another CA.
    let member_cert = c
        .pki
        .as_ref()
        .expect("pki")
        .issue("probe", &["127.0.0.1"])?;
    assert!(
        raft_port_accepts(&raft_addr, &member_cert, &cluster_ca).await?,
        "a client certificate from the cluster CA must be accepted"
    );
    let rogue = TestPki::new(&c.dir.path().join("rogue"), "rogue CA")?;
    let rogue_cert = rogue.issue("node-4", &["127.0.0.1", "localhost"])?;
    assert!(
        !raft_port_accepts(&raft_addr, &rogue_cert, &cluster_ca).await?,
        "a client certificate from an unknown CA must be refused"
    );

    // A node whose certificate (and trust) comes from the rogue CA starts, but cannot
    // join: the leader refuses its server certificate, it cannot reach the others.
    c.spawn_new_with_tls(4, "site-d", Some(rogue_cert))?;
    c.http = client_trusting(&[&cluster_ca, &rogue.ca_cert], c.token.as_deref())?;
    c.wait_live(4, Duration::from_secs(20)).await?;
    let r = c.add_member(leader, 4).await?;
    assert_eq!(r.status, 201, "{}", r.text);
    // Node 4's own view (public while its store has no user: nothing ever reached it).
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let r = c.get(4, "/drplane/v1/cluster?consistency=stale").await?;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(
            r.body["leader_id"].is_null(),
            "the rogue node must not learn of a leader: {}",
            r.text
        );
        assert!(
            r.body["applied_index"].is_null() && r.body["last_log_index"].is_null(),
            "nothing may replicate to the rogue node: {}",
            r.text
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = c.status(leader).await?;
    let rogue_view = status["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["id"] == 4))
        .cloned()
        .unwrap_or(Value::Null);
    assert!(
        rogue_view["matched_index"].is_null(),
        "the leader never replicated to the rogue node: {rogue_view}"
    );

    // The three members are unaffected.
    let r = c
        .post(
            follower,
            "/drplane/v1/sites",
            &json!({"name": "after-rogue"}),
        )
        .await?;
    assert_eq!(r.status, 201, "{}", r.text);
    Ok(())
}

/// Run `drplane server <args>`; it must exit (with an error) within 20 s. Returns
/// (success, stderr).
fn run_server_expecting_exit(args: &[String]) -> anyhow::Result<(bool, String)> {
    let dir = tempfile::tempdir()?;
    let err_path = dir.path().join("stderr");
    let err_file = std::fs::File::create(&err_path)?;
    let mut child = Command::new(drplane_bin()?)
        .arg("server")
        .args(args)
        .env_remove("DRPLANE_TLS_CERT")
        .env_remove("DRPLANE_TLS_KEY")
        .env_remove("DRPLANE_TLS_CA")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err_file)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "drplane server {args:?} kept running: it should have refused to start\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok((status.success(), std::fs::read_to_string(&err_path)?))
}

#[test]
fn node_refuses_to_start_with_a_broken_tls_configuration() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(&dir.path().join("ca"), "test CA")?;
    let other = TestPki::new(&dir.path().join("other"), "other CA")?;
    let a = pki.issue("a", &["127.0.0.1"])?;
    let b = pki.issue("b", &["127.0.0.1"])?;
    let x = other.issue("x", &["127.0.0.1"])?;
    let s = |p: &Path| p.display().to_string();
    let base = |n: usize| -> anyhow::Result<Vec<String>> {
        Ok(vec![
            "--id".into(),
            "1".into(),
            "--site".into(),
            "s".into(),
            "--http".into(),
            format!("127.0.0.1:{}", free_port()?),
            "--raft".into(),
            format!("127.0.0.1:{}", free_port()?),
            "--data".into(),
            s(&dir.path().join(format!("data-{n}"))),
        ])
    };
    let missing = dir.path().join("missing.pem");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--tls-cert".into(), s(&a.cert)],
            "TLS is half-configured",
        ),
        (
            vec![
                "--tls-cert".into(),
                s(&a.cert),
                "--tls-key".into(),
                s(&a.key),
            ],
            "tls-ca missing",
        ),
        (
            vec![
                "--tls-cert".into(),
                s(&a.cert),
                "--tls-key".into(),
                s(&b.key),
                "--tls-ca".into(),
                s(&pki.ca_cert),
            ],
            "does not belong to the certificate",
        ),
        (
            vec![
                "--tls-cert".into(),
                s(&x.cert),
                "--tls-key".into(),
                s(&x.key),
                "--tls-ca".into(),
                s(&pki.ca_cert),
            ],
            "is not accepted under the CA",
        ),
        (
            vec![
                "--tls-cert".into(),
                s(&missing),
                "--tls-key".into(),
                s(&a.key),
                "--tls-ca".into(),
                s(&pki.ca_cert),
            ],
            "cannot read the TLS certificate",
        ),
        (
            vec![
                "--tls-cert".into(),
                s(&a.cert),
                "--tls-key".into(),
                s(&a.key),
                "--tls-ca".into(),
                s(&a.key),
            ],
            "TLS CA file",
        ),
    ];
    for (i, (tls_args, expected)) in cases.into_iter().enumerate() {
        let mut args = base(i)?;
        args.extend(tls_args.iter().cloned());
        let (ok, stderr) = run_server_expecting_exit(&args)?;
        assert!(!ok, "{tls_args:?} must not start");
        assert!(
            stderr.contains(expected),
            "{tls_args:?}: expected '{expected}' in:\n{stderr}"
        );
    }
    Ok(())
}

/// Agents of a TLS cluster speak mutual TLS to the nodes and to each other: two `fs`
/// agents with certificates from the cluster CA register, and a replication pair between
/// them syncs byte for byte over their mutual-TLS block-sync service; an agent whose
/// certificate comes from another CA never comes online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_use_mutual_tls() -> anyhow::Result<()> {
    let mut c = Cluster::start_tls(&["site-a", "site-b", "site-c"], TIMING).await?;
    let pki = c.pki.as_ref().expect("tls cluster");
    let a = pki.issue("h1", &["127.0.0.1", "localhost"])?;
    let b = pki.issue("h2", &["127.0.0.1", "localhost"])?;
    let rogue_ca = TestPki::new(&c.dir.path().join("rogue-agent"), "rogue CA")?;
    let r = rogue_ca.issue("h3", &["127.0.0.1", "localhost"])?;
    let flags = |t: &NodeTls| {
        vec![
            "--tls-cert".to_string(),
            t.cert.to_string_lossy().into_owned(),
            "--tls-key".to_string(),
            t.key.to_string_lossy().into_owned(),
            "--tls-ca".to_string(),
            t.ca.to_string_lossy().into_owned(),
        ]
    };
    let config = c.dir.path().join("h1.toml");
    std::fs::write(
        &config,
        "[[servers]]\nid = \"vm-1\"\nproject = \"demo\"\nname = \"vm-1\"\nvcpus = 1\n\
         ram_mb = 512\ndisks = [{ id = \"vm-1-root\", size_bytes = 2097152 }]\n",
    )?;
    let mut h1 = flags(&a);
    h1.extend([
        "--config".to_string(),
        config.to_string_lossy().into_owned(),
    ]);
    let h1: Vec<&str> = h1.iter().map(String::as_str).collect();
    c.spawn_agent_with("h1", "site-a", "fs", &h1)?;
    let h2 = flags(&b);
    let h2: Vec<&str> = h2.iter().map(String::as_str).collect();
    c.spawn_agent_with("h2", "site-b", "fs", &h2)?;
    let h3 = flags(&r);
    let h3: Vec<&str> = h3.iter().map(String::as_str).collect();
    c.spawn_agent_with("h3", "site-c", "fs", &h3)?;
    let hosts = c
        .wait_hosts_state(&["h1", "h2"], "online", Duration::from_secs(30))
        .await?;
    assert!(
        hosts["h1"]["agent_address"]
            .as_str()
            .is_some_and(|a| a.starts_with("https://")),
        "{}",
        hosts["h1"]
    );
    let src = c
        .dir
        .path()
        .join("agent-h1/volumes/pools/default/vm-1-root/data");
    let data: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&src, &data)?;
    let leader = c.wait_leader(Duration::from_secs(10)).await?;
    let r = c
        .post(
            leader,
            "/drplane/v1/pairs",
            &json!({
                "id": "p-tls",
                "project": "demo",
                "source": {"host": "h1", "pool": "default", "volume_id": "vm-1-root",
                           "size_bytes": 2097152, "layout": "block"},
                "target": {"host": "h2", "pool": "default"},
                "sleep_time": 60,
            }),
        )
        .await?;
    assert_eq!(r.status, 202, "{}", r.text);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let p = c.get(leader, "/drplane/v1/pairs/p-tls").await?;
        if p.body["pair"]["state"] == "active" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pair not active: {}\n{}",
            p.text,
            c.agent_log("h2")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dst = c
        .dir
        .path()
        .join("agent-h2/volumes/pools/default/vm-1-root/data");
    assert!(std::fs::read(&dst)? == data, "the copy differs");
    // The agent with a foreign certificate is refused by every node: it keeps failing to
    // connect, and its host never shows online.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !c
        .agent_log("h3")
        .contains("certificate verification failed")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "h3 did not log a refused certificate: {}",
            c.agent_log("h3")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let hosts = c.hosts().await?;
    assert!(
        hosts.get("h3").is_none_or(|h| h["state"] != "online"),
        "{:?}",
        hosts.get("h3")
    );
    Ok(())
}
