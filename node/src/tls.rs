//! Transport security for a node: HTTPS on the API, mutual TLS between nodes, and the
//! development PKI of `drplane dev --tls`.
//!
//! Settings (`--tls-cert`, `--tls-key`, `--tls-ca`; `DRPLANE_TLS_*`; `tls_cert`, `tls_key`,
//! `tls_ca` in the TOML file) are all-or-nothing: a node refuses to start with only some
//! of them, with an unreadable or unparsable file, with a key that is not the
//! certificate's, or with a certificate the CA did not sign. The files are PEM: the
//! certificate file holds this node's certificate (then any intermediates), the key file
//! its private key (PKCS#8, PKCS#1 or SEC1), the CA file the cluster CA certificate(s).
//!
//! With TLS on:
//! - the HTTP API serves HTTPS only (ALPN h2 and http/1.1), no client certificate asked;
//! - the Raft gRPC port requires a client certificate signed by the CA (mutual TLS);
//! - node-to-node RPC (Raft and forwarded requests) connects with `https`, presents this
//!   node's certificate and checks that the peer's is signed by the CA and valid for the
//!   peer's address (so certificates need the node's raft host as a DNS or IP SAN).
//!
//! One node certificate serves both sides, so it needs the serverAuth and clientAuth
//! extended key usages (or none). Handshakes run in their own tasks with a deadline; a
//! failed one (plain HTTP, unknown CA, no certificate) only closes that connection.
//!
//! rustls is used with the ring provider, chosen explicitly for every config we build and
//! installed as the process default for tonic's client side.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once per listener; more connections wait to be accepted.
const MAX_HANDSHAKES: usize = 256;

/// The three files of a node's TLS setup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    /// PEM certificate chain of this node (leaf first).
    pub cert: PathBuf,
    /// PEM private key of the certificate.
    pub key: PathBuf,
    /// PEM certificate(s) of the cluster CA: peers' and clients' certificates must chain
    /// to one of them.
    pub ca: PathBuf,
}

impl TlsPaths {
    /// All three paths, or none: anything in between is refused, naming what is missing.
    pub fn from_parts(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    ) -> anyhow::Result<Option<TlsPaths>> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsPaths { cert, key, ca })),
            (cert, key, ca) => {
                let (mut given, mut missing) = (Vec::new(), Vec::new());
                for (name, v) in [
                    ("tls-cert", cert.is_some()),
                    ("tls-key", key.is_some()),
                    ("tls-ca", ca.is_some()),
                ] {
                    if v {
                        given.push(name);
                    } else {
                        missing.push(name);
                    }
                }
                bail!(
                    "TLS is half-configured: {} given but {} missing; give all three of \
                     --tls-cert, --tls-key and --tls-ca (or DRPLANE_TLS_CERT/_KEY/_CA, or \
                     tls_cert/tls_key/tls_ca in the config file), or none for plain HTTP",
                    given.join(", "),
                    missing.join(", ")
                )
            }
        }
    }
}

/// A node's TLS material, loaded and checked.
#[derive(Clone)]
pub struct TlsMaterial {
    pub paths: TlsPaths,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    ca_pem: Vec<u8>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TlsMaterial")
            .field("paths", &self.paths)
            .field("chain_len", &self.chain.len())
            .field("ca_roots", &self.roots.len())
            .finish()
    }
}

/// The crypto provider every TLS config here uses (ring), also installed as the process
/// default for libraries that build their configs with rustls' defaults (tonic's client).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Err means a default is installed already (by an earlier call): fine either way.
    let _ = CryptoProvider::install_default(rustls::crypto::ring::default_provider());
    provider
}

fn read_file(what: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path)
        .with_context(|| format!("cannot read the TLS {what} file {}", path.display()))
}

impl TlsMaterial {
    /// Read and check the three files: each parses, the key belongs to the certificate,
    /// and the certificate chains to the CA and may be used as a client certificate (it
    /// is, towards the other nodes).
    pub fn load(paths: &TlsPaths) -> anyhow::Result<TlsMaterial> {
        let provider = crypto_provider();
        let cert_pem = read_file("certificate (--tls-cert)", &paths.cert)?;
        let key_pem = read_file("key (--tls-key)", &paths.key)?;
        let ca_pem = read_file("CA (--tls-ca)", &paths.ca)?;

        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))
            .with_context(|| {
                format!(
                    "TLS certificate file {} is not valid PEM",
                    paths.cert.display()
                )
            })?;
        if chain.is_empty() {
            bail!(
                "TLS certificate file {} holds no CERTIFICATE block",
                paths.cert.display()
            );
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| anyhow::anyhow!("{e:?}"))
            .with_context(|| {
                format!(
                    "TLS key file {} holds no private key (PEM PKCS#8, PKCS#1 or SEC1)",
                    paths.key.display()
                )
            })?;
        let ca_certs = CertificateDer::pem_slice_iter(&ca_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))
            .with_context(|| format!("TLS CA file {} is not valid PEM", paths.ca.display()))?;
        if ca_certs.is_empty() {
            bail!(
                "TLS CA file {} holds no CERTIFICATE block",
                paths.ca.display()
            );
        }
        let mut roots = RootCertStore::empty();
        for (i, c) in ca_certs.into_iter().enumerate() {
            roots.add(c).with_context(|| {
                format!(
                    "TLS CA file {}: certificate {} is not a usable CA certificate",
                    paths.ca.display(),
                    i + 1
                )
            })?;
        }
        let roots = Arc::new(roots);

        // The key must be the certificate's.
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .with_context(|| {
                format!(
                    "TLS key file {}: unsupported private key",
                    paths.key.display()
                )
            })?;
        CertifiedKey::new(chain.clone(), signing_key)
            .keys_match()
            .map_err(|e| {
                anyhow::anyhow!(
                    "TLS key {} does not belong to the certificate {} ({e})",
                    paths.key.display(),
                    paths.cert.display()
                )
            })?;

        // The certificate must chain to the CA (and be fit for client authentication, as
        // it is used towards the other nodes).
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .context("building the client certificate verifier")?;
        verifier
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .map_err(|e| {
                anyhow::anyhow!(
                    "TLS certificate {} is not accepted under the CA {}: {e} (it must be signed \
                     by that CA, be currently valid, and allow client authentication)",
                    paths.cert.display(),
                    paths.ca.display()
                )
            })?;

        Ok(TlsMaterial {
            paths: paths.clone(),
            cert_pem,
            key_pem,
            ca_pem,
            chain,
            key: Arc::new(key),
            roots,
            provider,
        })
    }

    fn server_builder(
        &self,
    ) -> anyhow::Result<rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>> {
        ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")
    }

    /// HTTPS for the API: this node's certificate, no client certificate asked.
    pub fn http_server_config(&self) -> anyhow::Result<Arc<ServerConfig>> {
        let mut config = self
            .server_builder()?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .context("TLS server configuration for the HTTP API")?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// The Raft gRPC port: mutual TLS, the client must present a certificate signed by
    /// the CA.
    pub fn grpc_server_config(&self) -> anyhow::Result<Arc<ServerConfig>> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()
                .context("building the client certificate verifier")?;
        let mut config = self
            .server_builder()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .context("TLS server configuration for raft gRPC")?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The client side of node-to-node RPC: trust only the CA, present this node's
    /// certificate.
    pub fn grpc_client_config(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
    }

    /// The CA certificate(s) in PEM, for HTTP clients of this node and for agents.
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// This node's (or agent's) certificate chain in PEM.
    pub fn cert_pem(&self) -> &[u8] {
        &self.cert_pem
    }

    /// The private key in PEM (for an agent's TLS configs; never logged).
    pub fn key_pem(&self) -> &[u8] {
        &self.key_pem
    }
}

/// A reqwest client builder for a TLS cluster's HTTP API: rustls, trusting exactly the CA
/// certificates in `ca_pem` (no system roots), for the CLI and `drplane dev --tls`.
pub fn https_client_builder(ca_pem: &[u8]) -> anyhow::Result<reqwest::ClientBuilder> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false);
    let certs = reqwest::Certificate::from_pem_bundle(ca_pem)
        .context("the CA file is not a PEM certificate bundle")?;
    if certs.is_empty() {
        bail!("the CA file holds no certificate");
    }
    for cert in certs {
        builder = builder.add_root_certificate(cert);
    }
    Ok(builder)
}

/// Accept TCP connections on `listener` and run TLS handshakes with `config`, each in its
/// own task with a deadline; the connections that complete one come out of the receiver.
/// A failed handshake is logged (at debug: a port scan or a plain-HTTP client must not
/// flood the log) and closes only that connection. The loop ends when the receiver is
/// dropped.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    what: &'static str,
) -> mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(listener = what, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send((tls, peer)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(listener = what, %peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        tracing::debug!(listener = what, %peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    rx
}

/// An HTTPS listener for `axum::serve`.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        Ok(TlsListener {
            rx: tls_incoming(listener, config, "http"),
            local,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept loop only ends when this receiver is dropped; never here.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// The Raft gRPC listener's connections after the mutual-TLS handshake, for tonic's
/// `serve_with_incoming_shutdown`.
pub fn grpc_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> impl futures::Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> {
    use futures::StreamExt;
    tokio_stream::wrappers::ReceiverStream::new(tls_incoming(listener, config, "raft"))
        .map(|(stream, _peer)| Ok(stream))
}

// ---------------------------------------------------------------------------------------
// Development PKI.

/// What [`generate_dev_pki`] wrote.
#[derive(Debug, Clone)]
pub struct DevPki {
    /// The CA certificate: give it to clients (`curl --cacert`, the CLI) and every node.
    pub ca_cert: PathBuf,
    /// The CA's private key (kept for issuing more node certificates by hand).
    pub ca_key: PathBuf,
    /// One entry per node name given, in order.
    pub nodes: Vec<TlsPaths>,
}

/// Create a local CA and one certificate per node under `dir` (`ca.pem`, `ca-key.pem`,
/// `<name>.pem`, `<name>-key.pem`; keys readable by the owner only). Every node
/// certificate is valid for `hosts` (DNS names or IP addresses; `localhost`, `127.0.0.1`
/// and `::1` are always added) for both server and client authentication. An existing set
/// with every file present is reused as it is, so a restarted dev cluster keeps its CA.
pub fn generate_dev_pki(dir: &Path, node_names: &[&str], hosts: &[&str]) -> anyhow::Result<DevPki> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    for name in node_names {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            bail!("dev PKI: node name '{name}' must be letters, digits, - or _");
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let pki = DevPki {
        ca_cert: dir.join("ca.pem"),
        ca_key: dir.join("ca-key.pem"),
        nodes: node_names
            .iter()
            .map(|n| TlsPaths {
                cert: dir.join(format!("{n}.pem")),
                key: dir.join(format!("{n}-key.pem")),
                ca: dir.join("ca.pem"),
            })
            .collect(),
    };
    let all_present = pki.ca_cert.exists()
        && pki.ca_key.exists()
        && pki.nodes.iter().all(|n| n.cert.exists() && n.key.exists());
    if all_present {
        return Ok(pki);
    }

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "drplane dev CA");
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .context("signing the CA certificate")?;

    let mut sans: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    for always in ["localhost", "127.0.0.1", "::1"] {
        if !sans.iter().any(|s| s == always) {
            sans.push(always.to_string());
        }
    }
    write_file(&pki.ca_cert, ca_cert.pem().as_bytes(), false)?;
    write_file(&pki.ca_key, ca_key.serialize_pem().as_bytes(), true)?;
    for (name, paths) in node_names.iter().zip(&pki.nodes) {
        let mut params = CertificateParams::new(sans.clone())
            .with_context(|| format!("certificate parameters for {name} (hosts {sans:?})"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("drplane {name}"));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().with_context(|| format!("generating the key of {name}"))?;
        let cert = params
            .signed_by(&key, &ca_cert, &ca_key)
            .with_context(|| format!("signing the certificate of {name}"))?;
        write_file(&paths.cert, cert.pem().as_bytes(), false)?;
        write_file(&paths.key, key.serialize_pem().as_bytes(), true)?;
    }
    Ok(pki)
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn err_of(r: anyhow::Result<TlsMaterial>) -> String {
        format!("{:#}", r.expect_err("must fail"))
    }

    #[test]
    fn all_three_paths_or_none() {
        assert_eq!(TlsPaths::from_parts(None, None, None).expect("none"), None);
        let p = |s: &str| Some(PathBuf::from(s));
        assert!(TlsPaths::from_parts(p("c"), p("k"), p("a"))
            .expect("all")
            .is_some());
        let e = TlsPaths::from_parts(p("c"), p("k"), None).expect_err("half");
        let msg = e.to_string();
        assert!(msg.contains("half-configured"), "{msg}");
        assert!(
            msg.contains("tls-cert, tls-key given but tls-ca missing"),
            "{msg}"
        );
        let e = TlsPaths::from_parts(None, None, p("a")).expect_err("half");
        assert!(e.to_string().contains("tls-cert, tls-key missing"), "{e}");
    }

    #[test]
    fn dev_pki_loads_and_is_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki =
            generate_dev_pki(dir.path(), &["node-1", "node-2"], &["node.example"]).expect("pki");
        assert_eq!(pki.nodes.len(), 2);
        for n in &pki.nodes {
            let m = TlsMaterial::load(n).expect("loads");
            m.http_server_config().expect("http config");
            m.grpc_server_config().expect("grpc config");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&pki.nodes[0].key)
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "key files are private");
        }
        let before = std::fs::read(&pki.ca_cert).expect("ca");
        generate_dev_pki(dir.path(), &["node-1", "node-2"], &[]).expect("again");
        assert_eq!(std::fs::read(&pki.ca_cert).expect("ca"), before, "reused");
        assert!(generate_dev_pki(dir.path(), &["../x"], &[]).is_err());
    }

    #[test]
    fn load_names_the_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = generate_dev_pki(&dir.path().join("a"), &["n1", "n2"], &[]).expect("pki a");
        let b = generate_dev_pki(&dir.path().join("b"), &["n1"], &[]).expect("pki b");
        let good = a.nodes[0].clone();

        let mut p = good.clone();
        p.cert = dir.path().join("missing.pem");
        let e = err_of(TlsMaterial::load(&p));
        assert!(
            e.contains("cannot read the TLS certificate") && e.contains("missing.pem"),
            "{e}"
        );

        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem at all").expect("write");
        let mut p = good.clone();
        p.cert = junk.clone();
        let e = err_of(TlsMaterial::load(&p));
        assert!(e.contains("no CERTIFICATE block"), "{e}");
        let mut p = good.clone();
        p.key = junk.clone();
        let e = err_of(TlsMaterial::load(&p));
        assert!(e.contains("holds no private key"), "{e}");
        let mut p = good.clone();
        p.ca = junk;
        let e = err_of(TlsMaterial::load(&p));
        assert!(
            e.contains("TLS CA file") && e.contains("no CERTIFICATE block"),
            "{e}"
        );

        // The other node's key.
        let mut p = good.clone();
        p.key = a.nodes[1].key.clone();
        let e = err_of(TlsMaterial::load(&p));
        assert!(e.contains("does not belong to the certificate"), "{e}");

        // A certificate from another CA.
        let mut p = good.clone();
        p.cert = b.nodes[0].cert.clone();
        p.key = b.nodes[0].key.clone();
        let e = err_of(TlsMaterial::load(&p));
        assert!(e.contains("is not accepted under the CA"), "{e}");
    }

    /// The HTTPS listener serves axum; a client trusting the CA gets through, plain HTTP
    /// and a client trusting another CA do not.
    #[tokio::test]
    async fn https_listener_serves_axum() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = generate_dev_pki(&dir.path().join("a"), &["n1"], &[]).expect("pki a");
        let b = generate_dev_pki(&dir.path().join("b"), &["n1"], &[]).expect("pki b");
        let m = TlsMaterial::load(&a.nodes[0]).expect("load");
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let listener = TlsListener::new(tcp, m.http_server_config().expect("cfg")).expect("tls");
        let app = axum::Router::new().route("/livez", axum::routing::get(|| async { "ok" }));
        tokio::spawn(async move { axum::serve(listener, app).await });

        let client = https_client_builder(m.ca_pem())
            .expect("builder")
            .build()
            .expect("client");
        for host in ["127.0.0.1", "localhost"] {
            let r = client
                .get(format!("https://{host}:{}/livez", addr.port()))
                .send()
                .await
                .expect("https works");
            assert_eq!(r.status(), 200);
            assert_eq!(r.text().await.expect("body"), "ok");
        }
        let plain = reqwest::Client::new();
        assert!(plain
            .get(format!("http://{addr}/livez"))
            .send()
            .await
            .is_err());
        let other_ca = std::fs::read(&b.ca_cert).expect("ca b");
        let stranger = https_client_builder(&other_ca)
            .expect("builder")
            .build()
            .expect("client");
        assert!(stranger
            .get(format!("https://{addr}/livez"))
            .send()
            .await
            .is_err());
        assert!(https_client_builder(b"junk").is_err());
        // Still serving after the failed handshakes.
        let r = client
            .get(format!("https://{addr}/livez"))
            .send()
            .await
            .expect("https works");
        assert_eq!(r.status(), 200);
    }

    /// Raft-port mutual TLS in-process: a client with a certificate from the cluster CA
    /// gets through; one from another CA, one without a certificate, and a plain-text
    /// client do not; the listener keeps serving after each failure.
    #[tokio::test]
    async fn grpc_side_requires_a_client_certificate_from_the_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = generate_dev_pki(&dir.path().join("a"), &["n1", "n2"], &[]).expect("pki a");
        let b = generate_dev_pki(&dir.path().join("b"), &["rogue"], &[]).expect("pki b");
        let server = TlsMaterial::load(&a.nodes[0]).expect("server");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut rx = tls_incoming(listener, server.grpc_server_config().expect("cfg"), "test");
        tokio::spawn(async move {
            while let Some((mut s, _)) = rx.recv().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4];
                    if s.read_exact(&mut buf).await.is_ok() {
                        let _ = s.write_all(&buf).await;
                        let _ = s.flush().await;
                    }
                });
            }
        });

        let client_config = |identity: Option<&TlsPaths>, trust: &Path| {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(trust).expect("ca") {
                roots.add(c.expect("cert")).expect("root");
            }
            let b = rustls::ClientConfig::builder_with_provider(crypto_provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots);
            let c = match identity {
                Some(p) => b
                    .with_client_auth_cert(
                        CertificateDer::pem_file_iter(&p.cert)
                            .expect("cert")
                            .map(|c| c.expect("cert"))
                            .collect(),
                        PrivateKeyDer::from_pem_file(&p.key).expect("key"),
                    )
                    .expect("client auth"),
                None => b.with_no_client_auth(),
            };
            Arc::new(c)
        };
        let echo = |config: Arc<rustls::ClientConfig>| async move {
            let tcp = TcpStream::connect(addr).await?;
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1")
                .map_err(std::io::Error::other)?;
            let mut s = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            s.write_all(b"ping").await?;
            s.flush().await?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        };

        let good = client_config(Some(&a.nodes[1]), &a.ca_cert);
        assert_eq!(
            &echo(good.clone()).await.expect("member gets through"),
            b"ping"
        );
        let rogue = client_config(Some(&b.nodes[0]), &a.ca_cert);
        assert!(echo(rogue).await.is_err(), "certificate from another CA");
        let anonymous = client_config(None, &a.ca_cert);
        assert!(echo(anonymous).await.is_err(), "no client certificate");
        // A client that trusts another CA refuses this server.
        let wrong_trust = client_config(Some(&a.nodes[1]), &b.ca_cert);
        assert!(
            echo(wrong_trust).await.is_err(),
            "server from an unknown CA"
        );
        // Plain text: the server closes the connection.
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let _ = tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let mut buf = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        assert!(!String::from_utf8_lossy(&buf[..n]).contains("HTTP/1.1 200"));
        // Still serving.
        assert_eq!(&echo(good).await.expect("still serving"), b"ping");
    }
}
