//! Block sync between two `fs` agents over gRPC (`proto/blocksync.proto`).
//!
//! ```text
//!   target agent (sync_from)                         source agent (BlockSync service)
//!   ───────────────────────                          ────────────────────────────────
//!   lock target (exclusive), recover
//!   Begin ─────────────────────────────────────────► lock source (shared), manifest
//!          ◄───────────────────────────────────────── Header, Manifest
//!   scanner thread: hash own blocks ── FileSums ───► source thread: read + hash blocks,
//!                                                     compare, pace (token bucket),
//!          ◄───────────────────────────────────────── Block… Scanned… FileDone… Trailer
//!   writer thread: journal (or shadow file) ◄─ blocks
//!     recompute digests from own hashes + received data; equal to the source's?
//!     yes: commit, apply, remove journal   no: discard, Corrupt
//! ```
//!
//! Both agents read their copy at the same time, so a sync costs about one pass over the
//! image on each side plus the changed blocks on the wire.
//!
//! A full sync into a new image (the shadow file) is bound by CPU: both sides hash every
//! block, and every byte crosses TCP. So block data is not copied on its way (`wire`:
//! gRPC framed by hand, an HTTP/2 frame per block piece towards the target, the source's
//! read buffers pooled), and the shadow file is written with O_DIRECT on its own I/O
//! thread (`ShadowFile`), leaving no page cache to fill and nothing for the fsync.

mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{debug, info, info_span, warn};

use crate::digest::{self, FileDigester, Hash};
use crate::driver::*;
use crate::fs::{self, blocking, AlignedBuf, CrashPoint, FsInner, Vol, DIRECT_ALIGN};
use crate::journal::{self, sync_dir, JournalHeader, JournalWriter};
use crate::manifest::{self, Entry, EntryKind};
use crate::proto;
use crate::proto::block_sync_client::BlockSyncClient;
use crate::proto::block_sync_server::{BlockSync, BlockSyncServer};
use crate::proto::{source_msg, target_msg, SourceMsg, TargetMsg};

const MAX_MESSAGE: usize = 64 << 20;
const MANIFEST_BATCH: usize = 1000;
/// Target hashes per `FileSums`: small enough that the source compares while the target
/// is still hashing (64 MiB of 1 MiB blocks), not after it hashed the whole file.
const HASH_BATCH: usize = 64;
const SCANNED_EVERY: u64 = 4 << 20;
/// Block pieces per message when a bwlimit is set: the pacing granularity.
pub const PACED_CHUNK: u32 = 64 << 10;
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

// ================================================================ source side

struct Service {
    inner: Arc<FsInner>,
    stop: CancellationToken,
}

pub(crate) async fn serve(inner: Arc<FsInner>, bind: SocketAddr) -> Result<SyncServer> {
    let inner_tls = inner.tls.clone();
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .ctx(|| format!("bind sync server on {bind}"))?;
    let addr = listener
        .local_addr()
        .ctx(|| "sync server address".to_string())?;
    let stop = CancellationToken::new();
    let svc = Arc::new(Service {
        inner,
        stop: stop.clone(),
    });
    let router = SyncRouter {
        grpc: BlockSyncServer::from_arc(svc.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
        svc,
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let stop2 = stop.clone();
    let mut builder = tonic::transport::Server::builder();
    let scheme = match &inner_tls {
        Some(tls) => {
            builder = builder
                .tls_config(tls.server())
                .map_err(|e| DriverError::InvalidArgument(format!("sync server TLS: {e}")))?;
            "https"
        }
        None => "http",
    };
    // The same pings from the source's side: a target that vanished stops being served.
    let server = builder
        .http2_keepalive_interval(Some(wire::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(wire::KEEPALIVE_TIMEOUT))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .add_service(router);
    // The server's `tcp_nodelay` applies only to listeners it binds itself: without
    // TCP_NODELAY a response's small frames wait out the target's delayed ACK (40 ms).
    let incoming = TcpListenerStream::new(listener).map(|s| {
        if let Ok(s) = &s {
            if let Err(e) = s.set_nodelay(true) {
                debug!(error = %e, "TCP_NODELAY on a sync connection");
            }
        }
        s
    });
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = rx.await;
            // Syncs in flight stop at their next block; the targets keep their copies.
            stop2.cancel();
        };
        if let Err(e) = server
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
        {
            warn!(error = %e, "sync server stopped");
        }
    });
    info!(%addr, "serving block sync");
    Ok(SyncServer {
        endpoint: format!("{scheme}://{addr}"),
        local_addr: Some(addr),
        shutdown: Some(tx),
        task: Some(task),
        on_drop: Some(Box::new(move || stop.cancel())),
    })
}

fn status(e: DriverError) -> Status {
    match e {
        DriverError::NotFound(_) => Status::not_found(e.to_string()),
        DriverError::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
        DriverError::Cancelled => Status::cancelled(e.to_string()),
        DriverError::Corrupt(_) => Status::data_loss(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

type SourceStream = Pin<Box<dyn Stream<Item = Result<SourceMsg, Status>> + Send>>;

/// The sync server's routes: `Sync` through [`wire`] (block data not copied), everything
/// else (`Digest`) through tonic's generated server.
#[derive(Clone)]
struct SyncRouter {
    svc: Arc<Service>,
    grpc: BlockSyncServer<Service>,
}

impl tonic::server::NamedService for SyncRouter {
    const NAME: &'static str = proto::block_sync_server::SERVICE_NAME;
}

impl tower::Service<http::Request<tonic::body::BoxBody>> for SyncRouter {
    type Response = http::Response<tonic::body::BoxBody>;
    type Error = std::convert::Infallible;
    type Future = Pin<
        Box<
            dyn std::future::Future<Output = std::result::Result<Self::Response, Self::Error>>
                + Send,
        >,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::BoxBody>) -> Self::Future {
        if req.uri().path() != wire::SYNC_PATH {
            let mut grpc = self.grpc.clone();
            return Box::pin(async move { grpc.call(req).await });
        }
        let svc = self.svc.clone();
        Box::pin(async move {
            use tonic::codec::Codec;
            let inbound = tonic::Streaming::new_request(
                tonic::codec::ProstCodec::<SourceMsg, TargetMsg>::default().decoder(),
                req.into_body(),
                None,
                Some(MAX_MESSAGE),
            );
            Ok(match svc.start(inbound).await {
                Ok(rx) => wire::source_response(rx),
                Err(s) => s.into_http(),
            })
        })
    }
}

impl Service {
    /// Begin serving a sync: the messages for the target, as the reading thread makes them.
    async fn start(
        &self,
        mut inbound: tonic::Streaming<TargetMsg>,
    ) -> Result<mpsc::Receiver<Result<SourceMsg, Status>>, Status> {
        let begin = match inbound.message().await? {
            Some(TargetMsg {
                msg: Some(target_msg::Msg::Begin(b)),
            }) => b,
            _ => return Err(Status::invalid_argument("the first message must be Begin")),
        };
        validate_block_size(begin.block_size).map_err(status)?;
        let vol = self.inner.get(&begin.volume).map_err(status)?;
        let span = info_span!("sync_source", volume = %begin.volume, task = %begin.task_id);
        let guard = self.inner.lock_read(&vol).await.map_err(status)?;
        let inner = self.inner.clone();
        let v = vol.clone();
        let entries = blocking(move || inner.manifest(&v)).await.map_err(status)?;
        let kind = vol.kind();

        // Hashes from the target, handed to the reading thread in order.
        let (sums_tx, sums_rx) = mpsc::channel::<proto::FileSums>(64);
        let stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(TargetMsg { msg: Some(target_msg::Msg::Sums(s)) })) => {
                            if sums_tx.send(s).await.is_err() {
                                return;
                            }
                        }
                        Ok(Some(_)) => {
                            debug!("ignoring an unexpected target message");
                        }
                        Ok(None) | Err(_) => return,
                    },
                    _ = stop.cancelled() => return,
                }
            }
        });

        let (out_tx, out_rx) = mpsc::channel::<Result<SourceMsg, Status>>(4);
        let stop = self.stop.clone();
        let job = SourceJob {
            vol,
            kind,
            entries,
            block_size: begin.block_size,
            bwlimit: begin.bwlimit,
            chunk: match (begin.chunk_size, begin.bwlimit) {
                (0, 0) => begin.block_size,
                (0, _) => PACED_CHUNK,
                (c, _) => c.clamp(4096, begin.block_size),
            },
        };
        tokio::task::spawn_blocking(move || {
            let _g = guard;
            let _e = span.enter();
            let started = Instant::now();
            let mut sums = sums_rx;
            match job.run(&mut sums, &out_tx, &stop) {
                Ok(c) => info!(
                    bytes_sent = c.bytes_sent,
                    blocks_sent = c.blocks_sent,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "served sync"
                ),
                Err(e) => {
                    warn!(error = %e, "sync source failed");
                    let _ = out_tx.blocking_send(Err(e));
                }
            }
        });
        Ok(out_rx)
    }
}

#[tonic::async_trait]
impl BlockSync for Service {
    type SyncStream = SourceStream;

    /// Served by [`SyncRouter`] through [`wire`]; this is tonic's way to the same stream.
    async fn sync(
        &self,
        request: Request<tonic::Streaming<TargetMsg>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let rx = self.start(request.into_inner()).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn digest(
        &self,
        request: Request<proto::DigestRequest>,
    ) -> Result<Response<proto::DigestReply>, Status> {
        let req = request.into_inner();
        let bs = if req.block_size == 0 {
            DEFAULT_BLOCK_SIZE
        } else {
            req.block_size
        };
        validate_block_size(bs).map_err(status)?;
        let vol = self.inner.get(&req.volume).map_err(status)?;
        let g = self.inner.lock_read(&vol).await.map_err(status)?;
        let inner = self.inner.clone();
        let (d, kind, total) = blocking(move || {
            let _g = g;
            let d = inner.digest_blocking(&vol, bs)?;
            let total = inner
                .manifest(&vol)?
                .iter()
                .filter(|e| e.kind == EntryKind::File)
                .map(|e| e.size)
                .sum();
            Ok((d, vol.kind(), total))
        })
        .await
        .map_err(status)?;
        Ok(Response::new(proto::DigestReply {
            digest: Bytes::copy_from_slice(&d.0),
            kind: manifest::kind_to_proto(kind) as i32,
            total_bytes: total,
        }))
    }
}

struct SourceJob {
    vol: Arc<Vol>,
    kind: VolumeKind,
    entries: Vec<Entry>,
    block_size: u32,
    bwlimit: u64,
    chunk: u32,
}

struct SourceCounters {
    bytes_sent: u64,
    data_bytes: u64,
    blocks_sent: u64,
    blocks_total: u64,
}

/// Paces bytes to `rate` per second: a bucket of one chunk, refilled continuously, so a
/// sender never runs more than one chunk ahead of the rate.
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u64, capacity: u64) -> Self {
        TokenBucket {
            rate: rate as f64,
            capacity: capacity as f64,
            tokens: capacity as f64,
            last: Instant::now(),
        }
    }

    /// How long to wait before `n` bytes may go (and take them).
    pub fn take(&mut self, n: u64) -> Duration {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate)
            .min(self.capacity.max(n as f64));
        self.last = now;
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

impl SourceJob {
    fn send(
        &self,
        out: &mpsc::Sender<Result<SourceMsg, Status>>,
        msg: source_msg::Msg,
        c: &mut SourceCounters,
    ) -> Result<(), Status> {
        let m = SourceMsg { msg: Some(msg) };
        c.bytes_sent += m.encoded_len() as u64;
        out.blocking_send(Ok(m))
            .map_err(|_| Status::cancelled("the target went away"))
    }

    fn run(
        &self,
        sums: &mut mpsc::Receiver<proto::FileSums>,
        out: &mpsc::Sender<Result<SourceMsg, Status>>,
        stop: &CancellationToken,
    ) -> Result<SourceCounters, Status> {
        let mut c = SourceCounters {
            bytes_sent: 0,
            data_bytes: 0,
            blocks_sent: 0,
            blocks_total: 0,
        };
        let bs = self.block_size;
        let total: u64 = self
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .map(|e| e.size)
            .sum();
        self.send(
            out,
            source_msg::Msg::Header(proto::Header {
                kind: manifest::kind_to_proto(self.kind) as i32,
                block_size: bs,
                total_bytes: total,
                entries: self.entries.len() as u32,
            }),
            &mut c,
        )?;
        let mut chunks = self.entries.chunks(MANIFEST_BATCH).peekable();
        if chunks.peek().is_none() {
            self.send(
                out,
                source_msg::Msg::Manifest(proto::Manifest {
                    entries: vec![],
                    last: true,
                }),
                &mut c,
            )?;
        }
        while let Some(batch) = chunks.next() {
            let last = chunks.peek().is_none();
            self.send(
                out,
                source_msg::Msg::Manifest(proto::Manifest {
                    entries: batch.iter().map(manifest::to_proto).collect(),
                    last,
                }),
                &mut c,
            )?;
        }

        let mut bucket =
            (self.bwlimit > 0).then(|| TokenBucket::new(self.bwlimit, self.chunk as u64));
        let root = self.vol.data_path();
        let mut digests = vec![Digest::default(); self.entries.len()];
        let pool = BufPool::default();
        let mut done: u64 = 0;
        let mut reported: u64 = 0;
        for (i, e) in self.entries.iter().enumerate() {
            if e.kind != EntryKind::File {
                continue;
            }
            let mut theirs = TargetHashes::default();
            let path =
                manifest::safe_join(&root, &e.path).map_err(|e| Status::internal(e.to_string()))?;
            let f = manifest::open_sequential(&path)
                .map_err(|err| Status::internal(format!("open {}: {err}", path.display())))?;
            let mut d = FileDigester::new(e.size, bs);
            let n = digest::block_count(e.size, bs);
            c.blocks_total += n;
            for j in 0..n {
                if stop.is_cancelled() {
                    return Err(Status::unavailable("the source agent is shutting down"));
                }
                let len = digest::block_len(e.size, bs, j);
                let mut mem = pool.get(bs as usize);
                f.read_exact_at(&mut mem.space()[..len], j * bs as u64)
                    .map_err(|err| {
                        if err.kind() == std::io::ErrorKind::UnexpectedEof {
                            Status::aborted(format!("{} shrank during the sync", path.display()))
                        } else {
                            Status::internal(format!("read {}: {err}", path.display()))
                        }
                    })?;
                mem.set_len(len);
                let buf = Bytes::from_owner(Pooled {
                    mem,
                    pool: pool.clone(),
                });
                let h = digest::block_hash(&buf);
                d.push(&h);
                let same = match theirs.get(i as u32, j, sums)? {
                    TargetHash::Zero => h == digest::zero_hash(len),
                    TargetHash::Hash(t) => t == h,
                    TargetHash::Missing => false,
                };
                if !same {
                    let data = buf;
                    let mut off = 0usize;
                    while off < len {
                        let end = (off + self.chunk as usize).min(len);
                        if let Some(b) = bucket.as_mut() {
                            let wait = b.take((end - off) as u64);
                            if !wait.is_zero() {
                                std::thread::sleep(wait);
                            }
                        }
                        self.send(
                            out,
                            source_msg::Msg::Block(proto::Block {
                                file: i as u32,
                                offset: j * bs as u64 + off as u64,
                                data: data.slice(off..end),
                            }),
                            &mut c,
                        )?;
                        off = end;
                    }
                    c.blocks_sent += 1;
                    c.data_bytes += len as u64;
                }
                done += len as u64;
                if done - reported >= SCANNED_EVERY {
                    reported = done;
                    self.send(
                        out,
                        source_msg::Msg::Scanned(proto::Scanned { bytes_done: done }),
                        &mut c,
                    )?;
                }
            }
            // Drain the rest of this file's hashes (the target may hold a longer file).
            theirs.finish(i as u32, sums)?;
            digests[i] = d.finish();
            self.send(
                out,
                source_msg::Msg::FileDone(proto::FileDone {
                    file: i as u32,
                    size: e.size,
                    digest: Bytes::copy_from_slice(&digests[i].0),
                }),
                &mut c,
            )?;
        }
        self.send(
            out,
            source_msg::Msg::Scanned(proto::Scanned { bytes_done: done }),
            &mut c,
        )?;
        let vd = digest::volume_digest(self.kind, &self.entries, &digests);
        let trailer = proto::Trailer {
            digest: Bytes::copy_from_slice(&vd.0),
            bytes_sent: c.bytes_sent,
            data_bytes: c.data_bytes,
            blocks_sent: c.blocks_sent,
            blocks_total: c.blocks_total,
        };
        self.send(out, source_msg::Msg::Trailer(trailer), &mut c)?;
        Ok(c)
    }
}

/// Read buffers of the source, each back in the pool once the last piece sent from it is
/// gone: no fresh pages to fault in and no zeroing for every block.
#[derive(Clone, Default)]
struct BufPool(Arc<std::sync::Mutex<Vec<AlignedBuf>>>);

/// Buffers kept for reuse: what is in flight between the reading thread and the socket.
const POOLED: usize = 16;

impl BufPool {
    fn get(&self, cap: usize) -> AlignedBuf {
        self.0
            .lock()
            .ok()
            .and_then(|mut free| free.pop())
            .filter(|b| b.room() >= cap)
            .unwrap_or_else(|| AlignedBuf::new(cap))
    }
}

/// A block read into a pooled buffer, owned by the `Bytes` sent.
struct Pooled {
    mem: AlignedBuf,
    pool: BufPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.mem.filled()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Ok(mut free) = self.pool.0.lock() {
            if free.len() < POOLED {
                let mut m = std::mem::replace(&mut self.mem, AlignedBuf::new(0));
                m.clear();
                free.push(m);
            }
        }
    }
}

enum TargetHash {
    Zero,
    Hash(Hash),
    Missing,
}

/// The target's hashes of the file being read, arriving in batches.
#[derive(Default)]
struct TargetHashes {
    hashes: Vec<Hash>,
    zero: bool,
    last: bool,
}

impl TargetHashes {
    fn pull(
        &mut self,
        file: u32,
        sums: &mut mpsc::Receiver<proto::FileSums>,
    ) -> Result<(), Status> {
        let s = sums
            .blocking_recv()
            .ok_or_else(|| Status::cancelled("the target went away"))?;
        if s.file != file {
            return Err(Status::invalid_argument(format!(
                "hashes for entry {} while reading entry {file}",
                s.file
            )));
        }
        if s.hashes.len() % 32 != 0 {
            return Err(Status::invalid_argument(
                "hash list not a multiple of 32 bytes",
            ));
        }
        for h in s.hashes.chunks_exact(32) {
            let mut a = [0u8; 32];
            a.copy_from_slice(h);
            self.hashes.push(a);
        }
        self.zero |= s.assume_zero;
        self.last = s.last;
        Ok(())
    }

    fn get(
        &mut self,
        file: u32,
        j: u64,
        sums: &mut mpsc::Receiver<proto::FileSums>,
    ) -> Result<TargetHash, Status> {
        loop {
            if self.zero {
                return Ok(TargetHash::Zero);
            }
            if let Some(h) = self.hashes.get(j as usize) {
                return Ok(TargetHash::Hash(*h));
            }
            if self.last {
                return Ok(TargetHash::Missing);
            }
            self.pull(file, sums)?;
        }
    }

    fn finish(
        &mut self,
        file: u32,
        sums: &mut mpsc::Receiver<proto::FileSums>,
    ) -> Result<(), Status> {
        while !self.last {
            self.pull(file, sums)?;
        }
        Ok(())
    }
}

// ================================================================ target side

fn remote(endpoint: &str, s: impl std::fmt::Display) -> DriverError {
    DriverError::Remote {
        endpoint: endpoint.to_string(),
        message: s.to_string(),
    }
}

fn from_status(endpoint: &str, s: &Status) -> DriverError {
    match s.code() {
        tonic::Code::NotFound => remote(
            endpoint,
            format!("source volume not found: {}", s.message()),
        ),
        tonic::Code::DataLoss => {
            DriverError::Corrupt(format!("source {endpoint}: {}", s.message()))
        }
        _ => remote(endpoint, format!("{:?}: {}", s.code(), s.message())),
    }
}

pub(crate) async fn connect(
    endpoint: &str,
    tls: Option<&crate::tls::AgentTls>,
) -> Result<wire::SyncChannel> {
    wire::connect(endpoint, tls).await
}

/// The digest of a volume on another agent.
pub async fn remote_digest(
    endpoint: &str,
    volume: &str,
    tls: Option<&crate::tls::AgentTls>,
) -> Result<Digest> {
    let mut c = BlockSyncClient::new(connect(endpoint, tls).await?)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let r = c
        .digest(proto::DigestRequest {
            volume: volume.to_string(),
            block_size: 0,
        })
        .await
        .map_err(|s| from_status(endpoint, &s))?
        .into_inner();
    digest_from(&r.digest).ok_or_else(|| remote(endpoint, "malformed digest"))
}

fn digest_from(b: &[u8]) -> Option<Digest> {
    let a: [u8; 32] = b.try_into().ok()?;
    Some(Digest(a))
}

async fn next(
    endpoint: &str,
    inbound: &mut wire::SourceStream,
    cancel: &CancellationToken,
    bytes: &mut u64,
) -> Result<source_msg::Msg> {
    tokio::select! {
        m = inbound.message() => match m {
            Ok(Some(m)) => {
                *bytes += m.encoded_len() as u64;
                m.msg.ok_or_else(|| DriverError::Corrupt("empty message from the source".into()))
            }
            Ok(None) => Err(remote(endpoint, "the source ended the sync early")),
            Err(s) => Err(from_status(endpoint, &s)),
        },
        _ = cancel.cancelled() => Err(DriverError::Cancelled),
    }
}

/// What the scanner learned about one of the target's files.
struct Scanned {
    file: u32,
    hashes: Vec<Hash>,
    zero: bool,
}

struct WriterOut {
    digest: Digest,
    data_bytes: u64,
    blocks_sent: u64,
    mode: ApplyMode,
}

pub(crate) async fn pull(
    inner: Arc<FsInner>,
    req: &SyncRequest,
    progress: Option<ProgressFn>,
    cancel: CancellationToken,
) -> Result<SyncStats> {
    let started = Instant::now();
    let bs = req.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
    validate_block_size(bs)?;
    let endpoint = req.source.endpoint.as_str();
    let vol = inner.get(&req.target)?;
    let guard = tokio::select! {
        g = inner.lock_write(&vol) => g?,
        _ = cancel.cancelled() => return Err(DriverError::Cancelled),
    };
    if !vol.is_fenced() {
        return Err(DriverError::TargetWritable(req.target.clone()));
    }
    let kind = vol.kind();

    let mut client = tokio::select! {
        c = connect(endpoint, inner.tls.as_ref()) => c?,
        _ = cancel.cancelled() => return Err(DriverError::Cancelled),
    };
    let (req_tx, req_rx) = mpsc::channel::<TargetMsg>(32);
    let begin = TargetMsg {
        msg: Some(target_msg::Msg::Begin(proto::Begin {
            volume: req.source.volume.clone(),
            block_size: bs,
            bwlimit: req.bwlimit.unwrap_or(0),
            task_id: req.task_id.clone().unwrap_or_default(),
            chunk_size: 0,
        })),
    };
    req_tx
        .send(begin)
        .await
        .map_err(|_| remote(endpoint, "request stream closed"))?;
    let mut inbound = tokio::select! {
        r = wire::open_sync(&mut client, req_rx, MAX_MESSAGE) => r.map_err(|s| from_status(endpoint, &s))?,
        _ = cancel.cancelled() => return Err(DriverError::Cancelled),
    };
    let mut wire: u64 = 0;
    let header = match next(endpoint, &mut inbound, &cancel, &mut wire).await? {
        source_msg::Msg::Header(h) => h,
        _ => {
            return Err(DriverError::Corrupt(
                "the source did not start with a header".into(),
            ))
        }
    };
    let src_kind = manifest::kind_from_proto(header.kind)?;
    // A disk and a database volume are both one image file: either may copy into the
    // other (a database replica is made as a disk by CreateTarget). A share is a tree.
    if src_kind.is_file() != kind.is_file() {
        return Err(DriverError::InvalidArgument(format!(
            "source {} is a {src_kind}, target {} a {kind}",
            req.source.volume, req.target
        )));
    }
    if header.block_size != bs {
        return Err(DriverError::Corrupt(
            "the source changed the block size".into(),
        ));
    }
    let mut entries = Vec::with_capacity(header.entries.min(1 << 20) as usize);
    loop {
        match next(endpoint, &mut inbound, &cancel, &mut wire).await? {
            source_msg::Msg::Manifest(m) => {
                for e in m.entries {
                    entries.push(manifest::from_proto(e)?);
                }
                if entries.len() > header.entries as usize {
                    return Err(DriverError::Corrupt(
                        "manifest longer than announced".into(),
                    ));
                }
                if m.last {
                    break;
                }
            }
            _ => return Err(DriverError::Corrupt("expected the manifest".into())),
        }
    }
    if entries.len() != header.entries as usize {
        return Err(DriverError::Corrupt(
            "manifest shorter than announced".into(),
        ));
    }
    manifest::validate(kind, &entries)?;
    let total = header.total_bytes;

    let data = vol.data_path();
    let shadow = kind.is_file()
        && !{
            let d = data.clone();
            blocking(move || fs::has_data(&d)).await?
        };
    let crash = inner.take_crash();
    let entries = Arc::new(entries);
    let guard = Arc::new(guard);
    let span = tracing::Span::current();

    // Scanner: the target's block hashes, to the source and to the writer.
    let (scan_tx, scan_rx) = std::sync::mpsc::channel::<Scanned>();
    let scanner = {
        let (entries, vol, g, span) = (entries.clone(), vol.clone(), guard.clone(), span.clone());
        let req_tx = req_tx.clone();
        tokio::task::spawn_blocking(move || {
            let _g = g;
            let _e = span.enter();
            scan(&vol, kind, &entries, bs, shadow, &req_tx, &scan_tx)
        })
    };
    drop(req_tx);

    // Writer: journal or shadow file, verification, commit, apply.
    let (w_tx, w_rx) = mpsc::channel::<source_msg::Msg>(16);
    let writer = {
        let (entries, vol, g, span, inner) = (
            entries.clone(),
            vol.clone(),
            guard.clone(),
            span.clone(),
            inner.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let _g = g;
            let _e = span.enter();
            let mut w = Writer::new(inner, vol, kind, entries, bs, shadow, crash);
            let r = w.run(w_rx, scan_rx);
            if r.is_err() {
                w.discard();
            }
            r
        })
    };
    drop(guard);

    let report = |done: u64, wire: u64| {
        if let Some(p) = &progress {
            p(SyncProgress {
                bytes_done: done.min(total),
                bytes_total: total,
                bytes_sent: wire,
            })
        }
    };
    // Where each file starts in the volume's byte count, for progress from block offsets.
    let mut base = Vec::with_capacity(entries.len());
    let mut acc = 0u64;
    for e in entries.iter() {
        base.push(acc);
        if e.kind == EntryKind::File {
            acc += e.size;
        }
    }
    let mut last_report = Instant::now();
    let mut done = 0u64;
    let mut trailer = None;
    let loop_result: Result<()> = async {
        loop {
            let msg = next(endpoint, &mut inbound, &cancel, &mut wire).await?;
            match &msg {
                source_msg::Msg::Scanned(s) => done = done.max(s.bytes_done),
                source_msg::Msg::Block(b) => {
                    if let Some(at) = base.get(b.file as usize) {
                        done = done.max(at + b.offset + b.data.len() as u64);
                    }
                }
                source_msg::Msg::Trailer(t) => trailer = Some(t.clone()),
                _ => {}
            }
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                report(done, wire);
            }
            let is_trailer = trailer.is_some();
            if w_tx.send(msg).await.is_err() {
                // The writer stopped: its error explains why.
                return Ok(());
            }
            if is_trailer {
                return Ok(());
            }
        }
    }
    .await;
    drop(w_tx);
    drop(inbound);
    let written = writer
        .await
        .map_err(|e| DriverError::io("sync writer", std::io::Error::other(e.to_string())))?;
    let scanned = scanner
        .await
        .map_err(|e| DriverError::io("sync scanner", std::io::Error::other(e.to_string())))?;
    let hash_bytes = *scanned.as_ref().unwrap_or(&0);
    let out = match (loop_result, written, scanned) {
        // A failed local read explains a source that gave up waiting for hashes.
        (_, _, Err(e)) if !matches!(e, DriverError::Cancelled) => return Err(e),
        (Err(e), _, _) => return Err(e),
        (Ok(()), Err(e), _) => return Err(e),
        (Ok(()), Ok(o), _) => o,
    };
    let t = trailer.ok_or_else(|| remote(endpoint, "no trailer"))?;
    report(total, wire);
    let stats = SyncStats {
        bytes_total: total,
        bytes_sent: wire,
        data_bytes: out.data_bytes,
        blocks_total: t.blocks_total,
        blocks_sent: out.blocks_sent,
        hash_bytes,
        digest: out.digest,
        mode: out.mode,
        elapsed: started.elapsed(),
    };
    info!(
        source = %req.source.volume,
        bytes_total = stats.bytes_total,
        bytes_sent = stats.bytes_sent,
        blocks_sent = stats.blocks_sent,
        mode = ?stats.mode,
        elapsed_ms = stats.elapsed.as_millis() as u64,
        digest = %stats.digest,
        "sync done"
    );
    Ok(stats)
}

/// Hash the target's copy of every file in the source's manifest and send the hashes.
fn scan(
    vol: &Vol,
    kind: VolumeKind,
    entries: &[Entry],
    bs: u32,
    shadow: bool,
    req_tx: &mpsc::Sender<TargetMsg>,
    scan_tx: &std::sync::mpsc::Sender<Scanned>,
) -> Result<u64> {
    let mut hash_bytes = 0u64;
    let root = vol.data_path();
    let send = |s: proto::FileSums| {
        req_tx
            .blocking_send(TargetMsg {
                msg: Some(target_msg::Msg::Sums(s)),
            })
            .map_err(|_| DriverError::Cancelled)
    };
    let mut buf = vec![0u8; bs as usize];
    for (i, e) in entries.iter().enumerate() {
        if e.kind != EntryKind::File {
            continue;
        }
        let file = i as u32;
        let path = if kind.is_file() {
            Some(root.clone())
        } else {
            manifest::safe_join(&root, &e.path).ok()
        };
        let existing = match (&path, shadow) {
            (_, true) | (None, _) => None,
            (Some(p), false) => match std::fs::symlink_metadata(p) {
                Ok(m) if m.file_type().is_file() => Some((p.clone(), m.len())),
                _ => None,
            },
        };
        let Some((path, their_len)) = existing else {
            // New file (or an empty image): it starts as zeros.
            send(proto::FileSums {
                file,
                hashes: Bytes::new(),
                assume_zero: true,
                last: true,
            })?;
            let _ = scan_tx.send(Scanned {
                file,
                hashes: Vec::new(),
                zero: true,
            });
            continue;
        };
        let f = manifest::open_sequential(&path).ctx(|| format!("open {}", path.display()))?;
        // Only blocks the source also has matter.
        let n = digest::block_count(their_len, bs).min(digest::block_count(e.size, bs));
        let mut hashes = Vec::with_capacity(n as usize);
        let mut batch = Vec::with_capacity(HASH_BATCH * 32);
        for j in 0..n {
            let len = digest::block_len(their_len, bs, j);
            f.read_exact_at(&mut buf[..len], j * bs as u64)
                .ctx(|| format!("read {}", path.display()))?;
            let h = digest::block_hash(&buf[..len]);
            hashes.push(h);
            batch.extend_from_slice(&h);
            if batch.len() >= HASH_BATCH * 32 {
                hash_bytes += batch.len() as u64;
                send(proto::FileSums {
                    file,
                    hashes: Bytes::from(std::mem::take(&mut batch)),
                    assume_zero: false,
                    last: false,
                })?;
            }
        }
        hash_bytes += batch.len() as u64;
        send(proto::FileSums {
            file,
            hashes: Bytes::from(batch),
            assume_zero: false,
            last: true,
        })?;
        let _ = scan_tx.send(Scanned {
            file,
            hashes,
            zero: false,
        });
    }
    Ok(hash_bytes)
}

enum Sink {
    Journal(Option<Box<JournalWriter>>),
    Shadow(ShadowFile),
}

/// Bytes per O_DIRECT write, and buffers in flight between the writer and its I/O thread.
const DIRECT_BUF: usize = 4 << 20;
const DIRECT_BUFS: usize = 3;

/// One filled buffer and where it goes.
struct DirectWrite {
    buf: AlignedBuf,
    offset: u64,
}

/// The new copy of an image for an empty target (`data.sync-new`). Block data goes to
/// disk with O_DIRECT in large aligned writes on an I/O thread, in parallel with receiving
/// and hashing: no page cache to fill on the way and nothing left to write back at the
/// fsync, as with a copy tool. The unaligned tail of a file, and everything on a
/// filesystem without O_DIRECT, go through the page cache.
struct ShadowFile {
    file: std::fs::File,
    direct: Option<DirectPipe>,
}

struct DirectPipe {
    /// The buffer being filled and the file offset of its first byte.
    cur: Option<DirectWrite>,
    to_io: Option<std::sync::mpsc::SyncSender<DirectWrite>>,
    free: std::sync::mpsc::Receiver<AlignedBuf>,
    io: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl ShadowFile {
    fn new(file: std::fs::File, path: &std::path::Path) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let direct = match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(d) => Some(DirectPipe::start(
                d,
                file.try_clone()
                    .ctx(|| format!("reopen {}", path.display()))?,
            )?),
            Err(e) => {
                debug!(path = %path.display(), error = %e, "no O_DIRECT: writing through the page cache");
                None
            }
        };
        Ok(ShadowFile { file, direct })
    }

    fn put(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        match &mut self.direct {
            // Page-aligned (`DIRECT_ALIGN` is a power of two), or where the buffer ends.
            Some(d) if offset & (DIRECT_ALIGN as u64 - 1) == 0 || d.continues(offset) => {
                d.put(offset, data)
            }
            Some(d) => {
                // Never happens with whole blocks in order; keep it correct regardless.
                d.flush()?;
                self.file
                    .write_all_at(data, offset)
                    .ctx(|| "write the new copy".to_string())
            }
            None => self
                .file
                .write_all_at(data, offset)
                .ctx(|| "write the new copy".to_string()),
        }
    }

    /// Write what is buffered, wait for the I/O thread, and make the file durable.
    fn finish(mut self, path: &std::path::Path) -> Result<std::fs::File> {
        if let Some(d) = self.direct.take() {
            d.finish()?;
        }
        self.file
            .sync_all()
            .ctx(|| format!("sync {}", path.display()))?;
        Ok(self.file)
    }
}

impl DirectPipe {
    fn start(direct: std::fs::File, buffered: std::fs::File) -> Result<Self> {
        let (to_io, from_writer) = std::sync::mpsc::sync_channel::<DirectWrite>(DIRECT_BUFS);
        let (give_back, free) = std::sync::mpsc::channel::<AlignedBuf>();
        for _ in 0..DIRECT_BUFS {
            let _ = give_back.send(AlignedBuf::new(DIRECT_BUF));
        }
        let span = tracing::Span::current();
        let io = std::thread::Builder::new()
            .name("drplane-sync-io".into())
            .spawn(move || {
                let _e = span.enter();
                let mut use_direct = true;
                for mut w in from_writer {
                    let data = w.buf.filled();
                    // Whole sectors with O_DIRECT; a short tail (end of file) buffered.
                    let aligned = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
                    let mut done = 0;
                    if use_direct && aligned > 0 {
                        match direct.write_all_at(&data[..aligned], w.offset) {
                            Ok(()) => done = aligned,
                            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                                debug!(error = %e, "O_DIRECT refused: writing through the page cache");
                                use_direct = false;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    if done < data.len() {
                        buffered.write_all_at(&data[done..], w.offset + done as u64)?;
                    }
                    w.buf.clear();
                    if give_back.send(w.buf).is_err() {
                        break;
                    }
                }
                Ok(())
            })
            .ctx(|| "start the sync I/O thread".to_string())?;
        Ok(DirectPipe {
            cur: None,
            to_io: Some(to_io),
            free,
            io: Some(io),
        })
    }

    fn continues(&self, offset: u64) -> bool {
        self.cur
            .as_ref()
            .is_some_and(|c| c.offset + c.buf.len() as u64 == offset)
    }

    fn put(&mut self, mut offset: u64, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let fits = self
                .cur
                .as_ref()
                .is_some_and(|c| c.offset + c.buf.len() as u64 == offset && c.buf.room() > 0);
            if !fits {
                self.flush()?;
                let buf = match self.free.recv() {
                    Ok(b) => b,
                    Err(_) => return Err(self.io_error()),
                };
                self.cur = Some(DirectWrite { buf, offset });
            }
            let Some(c) = self.cur.as_mut() else {
                return Err(DriverError::Corrupt("sync buffer missing".into()));
            };
            let n = c.buf.room().min(data.len());
            c.buf.extend(&data[..n]);
            data = &data[n..];
            offset += n as u64;
        }
        Ok(())
    }

    /// Hand the buffer being filled to the I/O thread.
    fn flush(&mut self) -> Result<()> {
        if let Some(w) = self.cur.take() {
            if w.buf.is_empty() {
                return Ok(());
            }
            let sent = self.to_io.as_ref().is_some_and(|t| t.send(w).is_ok());
            if !sent {
                return Err(self.io_error());
            }
        }
        Ok(())
    }

    /// The I/O thread stopped early: its error.
    fn io_error(&mut self) -> DriverError {
        self.to_io = None;
        match self.io.take().map(|h| h.join()) {
            Some(Ok(Err(e))) => DriverError::io("write the new copy", e),
            Some(Err(_)) => DriverError::io(
                "write the new copy",
                std::io::Error::other("the sync I/O thread panicked"),
            ),
            _ => DriverError::io(
                "write the new copy",
                std::io::Error::other("the sync I/O thread stopped"),
            ),
        }
    }

    fn finish(mut self) -> Result<()> {
        self.flush()?;
        self.to_io = None;
        match self.io.take().map(|h| h.join()) {
            Some(Ok(Ok(()))) | None => Ok(()),
            Some(Ok(Err(e))) => Err(DriverError::io("write the new copy", e)),
            Some(Err(_)) => Err(DriverError::io(
                "write the new copy",
                std::io::Error::other("the sync I/O thread panicked"),
            )),
        }
    }
}

impl Drop for DirectPipe {
    fn drop(&mut self) {
        // An abandoned sync: let the I/O thread finish what it has, then end.
        self.to_io = None;
        if let Some(h) = self.io.take() {
            let _ = h.join();
        }
    }
}

struct Writer {
    inner: Arc<FsInner>,
    vol: Arc<Vol>,
    kind: VolumeKind,
    entries: Arc<Vec<Entry>>,
    bs: u32,
    shadow: bool,
    crash: Option<CrashPoint>,
    sink: Option<Sink>,
    keep_files: bool,
}

/// The block being received: its chunks arrive in order, one after another.
struct Pending {
    file: u32,
    index: u64,
    got: usize,
    hasher: blake3::Hasher,
}

impl Writer {
    fn new(
        inner: Arc<FsInner>,
        vol: Arc<Vol>,
        kind: VolumeKind,
        entries: Arc<Vec<Entry>>,
        bs: u32,
        shadow: bool,
        crash: Option<CrashPoint>,
    ) -> Self {
        Writer {
            inner,
            vol,
            kind,
            entries,
            bs,
            shadow,
            crash,
            sink: None,
            keep_files: false,
        }
    }

    fn open_sink(&mut self) -> Result<()> {
        if self.shadow {
            let p = self.vol.shadow_path();
            let size = self.entries.first().map(|e| e.size).unwrap_or(0);
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&p)
                .ctx(|| format!("create {}", p.display()))?;
            f.set_len(size).ctx(|| format!("size {}", p.display()))?;
            if self.vol.meta().reserved {
                fs::fallocate_file(&f, size).ctx(|| format!("reserve {}", p.display()))?;
            }
            self.sink = Some(Sink::Shadow(ShadowFile::new(f, &p)?));
        } else {
            let header = JournalHeader {
                kind: self.kind,
                block_size: self.bs,
                entries: self.entries.as_ref().clone(),
            };
            self.sink = Some(Sink::Journal(Some(Box::new(JournalWriter::create(
                &self.vol.journal_path(),
                &header,
            )?))));
        }
        Ok(())
    }

    fn put(&mut self, file: u32, offset: u64, data: &[u8]) -> Result<()> {
        match &mut self.sink {
            Some(Sink::Shadow(f)) => f.put(offset, data),
            Some(Sink::Journal(Some(j))) => j.append(file, offset, data),
            _ => Err(DriverError::Corrupt("sync sink closed".into())),
        }
    }

    /// Remove what an unfinished sync wrote; the previous copy stays.
    fn discard(&mut self) {
        if self.keep_files {
            self.vol.needs_recovery.store(true, Ordering::SeqCst);
            return;
        }
        self.sink = None;
        for p in [self.vol.journal_path(), self.vol.shadow_path()] {
            if p.exists() {
                if let Err(e) = std::fs::remove_file(&p) {
                    warn!(path = %p.display(), error = %e, "could not remove an unfinished sync file");
                    self.vol.needs_recovery.store(true, Ordering::SeqCst);
                }
            }
        }
    }

    fn run(
        &mut self,
        mut rx: mpsc::Receiver<source_msg::Msg>,
        scans: std::sync::mpsc::Receiver<Scanned>,
    ) -> Result<WriterOut> {
        self.open_sink()?;
        let entries = self.entries.clone();
        let bs = self.bs;
        let mut scanned: HashMap<u32, Scanned> = HashMap::new();
        let mut received: HashMap<u64, Hash> = HashMap::new();
        let mut pending: Option<Pending> = None;
        let mut file_digests = vec![Digest::default(); entries.len()];
        let mut files_done = vec![false; entries.len()];
        let mut current: Option<u32> = None;
        let (mut data_bytes, mut blocks_sent) = (0u64, 0u64);

        let finish_block = |p: Pending, received: &mut HashMap<u64, Hash>| -> Result<()> {
            let e = &entries[p.file as usize];
            if p.got != digest::block_len(e.size, bs, p.index) {
                return Err(DriverError::Corrupt(format!(
                    "block {} of {:?} arrived incomplete",
                    p.index, e.path
                )));
            }
            received.insert(p.index, *p.hasher.finalize().as_bytes());
            Ok(())
        };

        while let Some(msg) = rx.blocking_recv() {
            match msg {
                source_msg::Msg::Block(b) => {
                    let e = entries
                        .get(b.file as usize)
                        .filter(|e| e.kind == EntryKind::File)
                        .ok_or_else(|| {
                            DriverError::Corrupt(format!("block for entry {}", b.file))
                        })?;
                    if current.is_some_and(|c| c > b.file) || files_done[b.file as usize] {
                        return Err(DriverError::Corrupt("blocks out of file order".into()));
                    }
                    if current != Some(b.file) {
                        if pending.is_some() {
                            return Err(DriverError::Corrupt(
                                "block cut short by the next file".into(),
                            ));
                        }
                        current = Some(b.file);
                        received.clear();
                    }
                    let len = b.data.len() as u64;
                    if len == 0 || b.offset.checked_add(len).is_none_or(|end| end > e.size) {
                        return Err(DriverError::Corrupt(format!(
                            "block past the end of {:?}",
                            e.path
                        )));
                    }
                    let index = b.offset / bs as u64;
                    let within = (b.offset % bs as u64) as usize;
                    if within + len as usize > bs as usize {
                        return Err(DriverError::Corrupt(
                            "a piece crosses a block boundary".into(),
                        ));
                    }
                    let continues = pending
                        .as_ref()
                        .is_some_and(|p| p.file == b.file && p.index == index && p.got == within);
                    if !continues {
                        if let Some(p) = pending.take() {
                            finish_block(p, &mut received)?;
                        }
                        if within != 0 || received.contains_key(&index) {
                            return Err(DriverError::Corrupt("block pieces out of order".into()));
                        }
                        pending = Some(Pending {
                            file: b.file,
                            index,
                            got: 0,
                            hasher: blake3::Hasher::new(),
                        });
                        blocks_sent += 1;
                    }
                    if let Some(p) = pending.as_mut() {
                        p.hasher.update(&b.data);
                        p.got += b.data.len();
                    }
                    self.put(b.file, b.offset, &b.data)?;
                    data_bytes += len;
                }
                source_msg::Msg::FileDone(fd) => {
                    let i = fd.file as usize;
                    let e = entries
                        .get(i)
                        .filter(|e| e.kind == EntryKind::File)
                        .ok_or_else(|| DriverError::Corrupt(format!("file done for entry {i}")))?;
                    if files_done[i] || current.is_some_and(|c| c > fd.file) {
                        return Err(DriverError::Corrupt("files out of order".into()));
                    }
                    if let Some(p) = pending.take() {
                        if p.file != fd.file {
                            return Err(DriverError::Corrupt("block cut short".into()));
                        }
                        finish_block(p, &mut received)?;
                    }
                    if current != Some(fd.file) {
                        received.clear();
                        current = Some(fd.file);
                    }
                    while !scanned.contains_key(&fd.file) {
                        let s = scans
                            .recv()
                            .map_err(|_| DriverError::Corrupt("scanner stopped early".into()))?;
                        scanned.insert(s.file, s);
                    }
                    let mine = scanned.remove(&fd.file);
                    let zero = self.shadow || mine.as_ref().is_some_and(|s| s.zero);
                    let mut d = FileDigester::new(e.size, bs);
                    for j in 0..digest::block_count(e.size, bs) {
                        let h = match received.get(&j) {
                            Some(h) => *h,
                            None if zero => digest::zero_hash(digest::block_len(e.size, bs, j)),
                            None => *mine
                                .as_ref()
                                .and_then(|s| s.hashes.get(j as usize))
                                .ok_or_else(|| {
                                    DriverError::Corrupt(format!(
                                        "block {j} of {:?} was neither sent nor held",
                                        e.path
                                    ))
                                })?,
                        };
                        d.push(&h);
                    }
                    let got = d.finish();
                    if Some(got) != digest_from(&fd.digest) || fd.size != e.size {
                        return Err(DriverError::Corrupt(format!(
                            "{:?}: the copy's digest differs from the source's",
                            e.path
                        )));
                    }
                    file_digests[i] = got;
                    files_done[i] = true;
                    received.clear();
                }
                source_msg::Msg::Trailer(t) => {
                    if pending.is_some() {
                        return Err(DriverError::Corrupt(
                            "block cut short by the trailer".into(),
                        ));
                    }
                    let all = entries
                        .iter()
                        .zip(&files_done)
                        .all(|(e, d)| e.kind != EntryKind::File || *d);
                    if !all {
                        return Err(DriverError::Corrupt("the source skipped files".into()));
                    }
                    let ours = digest::volume_digest(self.kind, &entries, &file_digests);
                    if Some(ours) != digest_from(&t.digest) {
                        return Err(DriverError::Corrupt(
                            "the copy's volume digest differs from the source's".into(),
                        ));
                    }
                    let mode = self.commit(data_bytes)?;
                    return Ok(WriterOut {
                        digest: ours,
                        data_bytes,
                        blocks_sent,
                        mode,
                    });
                }
                source_msg::Msg::Scanned(_) => {}
                _ => {
                    return Err(DriverError::Corrupt(
                        "unexpected message from the source".into(),
                    ))
                }
            }
        }
        Err(DriverError::Cancelled)
    }

    fn injected(&mut self, what: &str) -> DriverError {
        self.keep_files = true;
        DriverError::Injected(format!("crash {what}"))
    }

    /// Make the verified copy the volume's content.
    fn commit(&mut self, data_bytes: u64) -> Result<ApplyMode> {
        let vol = self.vol.clone();
        let data = vol.data_path();
        match self.sink.take() {
            Some(Sink::Shadow(f)) => {
                let shadow = vol.shadow_path();
                drop(f.finish(&shadow)?);
                // Keep the image's permissions (fenced: read-only).
                if let Ok(m) = std::fs::metadata(&data) {
                    std::fs::set_permissions(&shadow, m.permissions())
                        .ctx(|| format!("chmod {}", shadow.display()))?;
                }
                if self.crash == Some(CrashPoint::BeforeRename) {
                    return Err(self.injected("before renaming the new copy"));
                }
                std::fs::rename(&shadow, &data)
                    .ctx(|| format!("rename over {}", data.display()))?;
                sync_dir(&vol.dir)?;
                if let Some(e) = self.entries.first() {
                    self.inner.set_size(&vol, e.size)?;
                }
                Ok(ApplyMode::Shadow)
            }
            Some(Sink::Journal(Some(j))) => {
                let size_unchanged = self.kind.is_file()
                    && self.entries.first().map(|e| e.size)
                        == std::fs::metadata(&data).ok().map(|m| m.len());
                if data_bytes == 0 && size_unchanged && self.crash.is_none() {
                    drop(j);
                    let jp = vol.journal_path();
                    std::fs::remove_file(&jp).ctx(|| format!("remove {}", jp.display()))?;
                    return Ok(ApplyMode::None);
                }
                if self.crash == Some(CrashPoint::BeforeCommit) {
                    j.flush_uncommitted()?;
                    return Err(self.injected("before the journal commit"));
                }
                j.commit()?;
                if self.crash == Some(CrashPoint::AfterCommit) {
                    return Err(self.injected("after the journal commit"));
                }
                // From here on the new copy is durable: a failure leaves the journal for
                // replay, never discards it.
                self.keep_files = true;
                let jp = vol.journal_path();
                let committed = journal::read(&jp)?.ok_or_else(|| {
                    DriverError::Corrupt("the journal just committed reads as incomplete".into())
                })?;
                let stop = match self.crash {
                    Some(CrashPoint::MidApply(n)) => Some(n),
                    _ => None,
                };
                fs::apply_committed(&vol, &committed, stop)?;
                drop(committed);
                std::fs::remove_file(&jp).ctx(|| format!("remove {}", jp.display()))?;
                sync_dir(&vol.dir)?;
                if let Some(e) = self.entries.first().filter(|_| self.kind.is_file()) {
                    self.inner.set_size(&vol, e.size)?;
                }
                self.keep_files = false;
                Ok(ApplyMode::Journal)
            }
            _ => Err(DriverError::Corrupt("sync sink missing".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces as the writer gets them: whole blocks in order with gaps (zero blocks are
    /// not sent), a block cut in pieces, a short last block.
    fn write_pieces(direct: bool) {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = dir.path().join("data.sync-new");
        let bs = 1usize << 20;
        let size = 9 * bs + 1234;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .expect("create");
        f.set_len(size as u64).expect("size");
        let mut s = if direct {
            ShadowFile::new(f, &p).expect("shadow file")
        } else {
            ShadowFile {
                file: f,
                direct: None,
            }
        };
        let mut want = vec![0u8; size];
        let mut x = 7u32;
        for (i, b) in want.iter_mut().enumerate() {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            // Blocks 2 and 5 stay zeros: never written.
            if i / bs != 2 && i / bs != 5 {
                *b = (x >> 16) as u8;
            }
        }
        for blk in [0usize, 1, 3, 4, 6, 7, 8, 9] {
            let start = blk * bs;
            let end = (start + bs).min(size);
            // Block 4 in three pieces, the others whole.
            let cuts: Vec<usize> = if blk == 4 {
                vec![start, start + 4096, start + 300_000, end]
            } else {
                vec![start, end]
            };
            for w in cuts.windows(2) {
                s.put(w[0] as u64, &want[w[0]..w[1]]).expect("put");
            }
        }
        drop(s.finish(&p).expect("finish"));
        assert_eq!(std::fs::read(&p).expect("read back"), want);
    }

    #[test]
    fn shadow_file_writes_with_o_direct() {
        write_pieces(true);
    }

    #[test]
    fn shadow_file_writes_through_the_page_cache() {
        write_pieces(false);
    }
}
