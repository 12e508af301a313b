//! The `BlockSync.Sync` stream on the wire, without copying block data.
//!
//! It is plain gRPC: HTTP/2, each message a protobuf with gRPC's 5-byte prefix (flag 0,
//! big-endian length), the status in `grpc-status` trailers, exactly what tonic's generated
//! client and server exchange (tests check both directions against them). Only the copies
//! are gone:
//!
//! - tonic 0.12 encodes every message into its own buffer. The source sends a `Block` as
//!   two DATA chunks instead: the message's few header bytes, then the block data as read
//!   from the file ([`encode_source`], [`SourceBody`]).
//! - tonic's `Streaming` appends every DATA frame to one buffer before decoding. The target
//!   decodes from the frames as they come ([`MessageReader`]): a `Block` whose data is one
//!   frame gets that frame as its `Bytes`.
//! - tonic 0.12's `Endpoint` keeps HTTP/2's 16 KiB frames towards the client (the target):
//!   a syscall and a wake-up on each side per 16 KiB. The target's own connection
//!   ([`connect`]) accepts frames of a whole block piece.
//!
//! The `Digest` RPC and the request direction (small `TargetMsg`s) keep tonic's codec.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::BodyExt;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tonic::{Code, Status};
use tracing::debug;

use crate::driver::{DriverError, Result};
use crate::proto::{self, source_msg, SourceMsg, TargetMsg};

pub(crate) const SYNC_PATH: &str = "/drplane.blocksync.v1.BlockSync/Sync";
const GRPC_CONTENT_TYPE: &str = "application/grpc";
/// Flag byte and length before every gRPC message.
const PREFIX: usize = 5;
/// `SourceMsg.block` and `Block.data`: both field 3.
const BLOCK_FIELD: u32 = 3;
const DATA_FIELD: u32 = 3;

/// Largest HTTP/2 frame the target accepts: a 16 MiB block piece in one frame.
const MAX_FRAME: u32 = (1 << 24) - 1;
/// HTTP/2 flow-control windows of the target's connection.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings on a sync connection: a source that dies or drops off the network without
/// closing the connection is noticed within interval + timeout (7 s), instead of the
/// target waiting for its next block until the task is cancelled.
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

// ================================================================ encoding

/// A message with its gRPC prefix, in one buffer.
pub(crate) fn encode<M: Message>(m: &M) -> Bytes {
    let len = m.encoded_len();
    let mut buf = BytesMut::with_capacity(PREFIX + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    // Cannot fail: a BytesMut grows.
    let _ = m.encode(&mut buf);
    buf.freeze()
}

/// A `SourceMsg` with its gRPC prefix: the bytes to send, and for a block the block data
/// to send right after them, not copied. Concatenated they are what `encode` gives.
pub(crate) fn encode_source(m: SourceMsg) -> (Bytes, Option<Bytes>) {
    let b = match m.msg {
        Some(source_msg::Msg::Block(b)) if !b.data.is_empty() => b,
        msg => return (encode(&SourceMsg { msg }), None),
    };
    let data = b.data;
    let head = proto::Block {
        file: b.file,
        offset: b.offset,
        data: Bytes::new(),
    };
    let n = data.len();
    let data_field = key_len(DATA_FIELD) + encoded_len_varint(n as u64) + n;
    let inner = head.encoded_len() + data_field;
    let outer = key_len(BLOCK_FIELD) + encoded_len_varint(inner as u64) + inner;
    let mut buf = BytesMut::with_capacity(PREFIX + outer - n);
    buf.put_u8(0);
    buf.put_u32(outer as u32);
    encode_key(BLOCK_FIELD, WireType::LengthDelimited, &mut buf);
    encode_varint(inner as u64, &mut buf);
    let _ = head.encode(&mut buf);
    encode_key(DATA_FIELD, WireType::LengthDelimited, &mut buf);
    encode_varint(n as u64, &mut buf);
    (buf.freeze(), Some(data))
}

fn status_trailers(s: &Status) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    if s.add_header(&mut h).is_err() {
        h.insert("grpc-status", http::HeaderValue::from_static("13"));
    }
    h
}

/// The source's response body: the messages the reading thread sends, then the status.
pub(crate) struct SourceBody {
    rx: mpsc::Receiver<std::result::Result<SourceMsg, Status>>,
    data: Option<Bytes>,
    done: bool,
}

impl http_body::Body for SourceBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if let Some(d) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        Poll::Ready(Some(Ok(match ready!(this.rx.poll_recv(cx)) {
            Some(Ok(m)) => {
                let (head, data) = encode_source(m);
                this.data = data;
                Frame::data(head)
            }
            Some(Err(s)) => {
                this.done = true;
                Frame::trailers(status_trailers(&s))
            }
            None => {
                this.done = true;
                Frame::trailers(status_trailers(&Status::ok("")))
            }
        })))
    }
}

/// The `Sync` response: headers now, the messages as the source produces them.
pub(crate) fn source_response(
    rx: mpsc::Receiver<std::result::Result<SourceMsg, Status>>,
) -> http::Response<tonic::body::BoxBody> {
    let mut r = http::Response::new(tonic::body::boxed(SourceBody {
        rx,
        data: None,
        done: false,
    }));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(GRPC_CONTENT_TYPE),
    );
    r
}

/// The target's request body: `TargetMsg`s until the sender is dropped.
struct TargetBody {
    rx: mpsc::Receiver<TargetMsg>,
}

impl http_body::Body for TargetBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        Poll::Ready(ready!(this.rx.poll_recv(cx)).map(|m| Ok(Frame::data(encode(&m)))))
    }
}

// ================================================================ decoding

/// gRPC messages out of HTTP/2 DATA frames. A `bytes` field that lies within one frame
/// is decoded as a slice of it, without a copy.
#[derive(Default)]
pub(crate) struct MessageReader {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl MessageReader {
    pub(crate) fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.chunks.push_back(b);
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn skip(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                return;
            };
            let k = n.min(front.len());
            front.advance(k);
            if front.is_empty() {
                self.chunks.pop_front();
            }
            self.len -= k;
            n -= k;
        }
    }

    /// The next whole message, if it has arrived.
    pub(crate) fn next<M: Message + Default>(
        &mut self,
        max: usize,
    ) -> std::result::Result<Option<M>, Status> {
        if self.len < PREFIX {
            return Ok(None);
        }
        let mut prefix = [0u8; PREFIX];
        let mut got = 0;
        for c in &self.chunks {
            let k = (PREFIX - got).min(c.len());
            prefix[got..got + k].copy_from_slice(&c[..k]);
            got += k;
            if got == PREFIX {
                break;
            }
        }
        if prefix[0] != 0 {
            return Err(Status::internal(
                "protocol error: a compressed message, and no compression was negotiated",
            ));
        }
        let n = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if n > max {
            return Err(Status::out_of_range(format!(
                "a message of {n} bytes, the limit is {max}"
            )));
        }
        if self.len < PREFIX + n {
            return Ok(None);
        }
        self.skip(PREFIX);
        let mut body = Limited { r: self, left: n };
        let m = M::decode(&mut body);
        let left = body.left;
        self.skip(left);
        m.map(Some)
            .map_err(|e| Status::internal(format!("decode a message: {e}")))
    }
}

/// One message's bytes at the front of a [`MessageReader`].
struct Limited<'a> {
    r: &'a mut MessageReader,
    left: usize,
}

impl Buf for Limited<'_> {
    fn remaining(&self) -> usize {
        self.left
    }

    fn chunk(&self) -> &[u8] {
        match self.r.chunks.front() {
            Some(c) => &c[..c.len().min(self.left)],
            None => &[],
        }
    }

    fn advance(&mut self, cnt: usize) {
        let cnt = cnt.min(self.left);
        self.r.skip(cnt);
        self.left -= cnt;
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        let len = len.min(self.left);
        if let Some(front) = self.r.chunks.front_mut() {
            if front.len() >= len {
                let b = front.split_to(len);
                if front.is_empty() {
                    self.r.chunks.pop_front();
                }
                self.r.len -= len;
                self.left -= len;
                return b;
            }
        }
        let mut out = BytesMut::with_capacity(len);
        while out.len() < len {
            let c = self.chunk();
            if c.is_empty() {
                break;
            }
            let k = c.len().min(len - out.len());
            out.extend_from_slice(&c[..k]);
            self.advance(k);
        }
        out.freeze()
    }
}

// ================================================================ the target's connection

type SendRequest = hyper::client::conn::http2::SendRequest<tonic::body::BoxBody>;

/// The target's HTTP/2 connection to a source agent, for tonic's generated client (the
/// `Digest` RPC) and for [`open_sync`].
#[derive(Clone)]
pub(crate) struct SyncChannel {
    send: SendRequest,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
}

impl tower::Service<http::Request<tonic::body::BoxBody>> for SyncChannel {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = Pin<
        Box<
            dyn std::future::Future<Output = std::result::Result<Self::Response, Self::Error>>
                + Send,
        >,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::BoxBody>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        // tonic's clients give the path; HTTP/2 needs the scheme and authority too.
        let path = std::mem::take(&mut parts.uri);
        let mut uri = http::uri::Parts::from(path.clone());
        uri.scheme = Some(self.scheme.clone());
        uri.authority = Some(self.authority.clone());
        // A path always forms a URI with them (hyper would refuse the bare path).
        parts.uri = http::Uri::from_parts(uri).unwrap_or(path);
        Box::pin(
            self.send
                .send_request(http::Request::from_parts(parts, body)),
        )
    }
}

fn remote(endpoint: &str, s: impl std::fmt::Display) -> DriverError {
    DriverError::Remote {
        endpoint: endpoint.to_string(),
        message: s.to_string(),
    }
}

async fn handshake<T>(endpoint: &str, io: T) -> Result<SendRequest>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| remote(endpoint, format!("HTTP/2 handshake: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "sync connection closed");
        }
    });
    Ok(send)
}

/// Connect to a source agent's sync server (`http://host:port`, or `https://` with mutual
/// TLS: the cluster CA and this agent's certificate, as tonic's client would).
pub(crate) async fn connect(
    endpoint: &str,
    tls: Option<&crate::tls::AgentTls>,
) -> Result<SyncChannel> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| DriverError::InvalidArgument(format!("endpoint {endpoint:?}: {e}")))?;
    let scheme = match uri.scheme_str() {
        Some("http") => http::uri::Scheme::HTTP,
        Some("https") => http::uri::Scheme::HTTPS,
        _ => {
            return Err(DriverError::InvalidArgument(format!(
                "endpoint {endpoint:?}: http:// or https:// expected"
            )))
        }
    };
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| DriverError::InvalidArgument(format!("endpoint {endpoint:?}: no host")))?;
    let https = scheme == http::uri::Scheme::HTTPS;
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| remote(endpoint, "connect: timed out"))?
    .map_err(|e| remote(endpoint, format!("connect: {e}")))?;
    tcp.set_nodelay(true)
        .map_err(|e| remote(endpoint, format!("TCP_NODELAY: {e}")))?;
    let send = match (https, tls) {
        (false, _) => handshake(endpoint, tcp).await?,
        (true, None) => {
            return Err(DriverError::InvalidArgument(format!(
                "endpoint {endpoint:?}: https without TLS configured"
            )))
        }
        (true, Some(tls)) => {
            let config = client_tls(tls)
                .map_err(|e| DriverError::InvalidArgument(format!("TLS for {endpoint}: {e}")))?;
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| DriverError::InvalidArgument(format!("endpoint {endpoint:?}: {e}")))?;
            let io = tokio::time::timeout(
                CONNECT_TIMEOUT,
                tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
            )
            .await
            .map_err(|_| remote(endpoint, "TLS handshake: timed out"))?
            .map_err(|e| remote(endpoint, format!("TLS handshake: {e}")))?;
            if io.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(remote(endpoint, "TLS: HTTP/2 was not negotiated"));
            }
            handshake(endpoint, io).await?
        }
    };
    Ok(SyncChannel {
        send,
        scheme,
        authority,
    })
}

/// Trust only the cluster CA, present this agent's certificate, offer HTTP/2.
fn client_tls(tls: &crate::tls::AgentTls) -> std::result::Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (ca_pem, cert_pem, key_pem) = tls.pems();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        let c = c.map_err(|e| format!("CA certificate: {e}"))?;
        roots.add(c).map_err(|e| format!("CA certificate: {e}"))?;
    }
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("private key: {e}"))?;
    // ring, as everywhere in drplane (no process-wide provider needed).
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS versions: {e}"))?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .map_err(|e| format!("certificate and key: {e}"))?;
    config.alpn_protocols.push(b"h2".to_vec());
    Ok(config)
}

// ================================================================ the Sync call

/// The source's messages, as the target reads them.
pub(crate) struct SourceStream {
    body: hyper::body::Incoming,
    reader: MessageReader,
    done: bool,
    max: usize,
}

/// Start `Sync`: the request body is what `rx` yields, ending when its sender goes.
pub(crate) async fn open_sync(
    ch: &mut SyncChannel,
    rx: mpsc::Receiver<TargetMsg>,
    max: usize,
) -> std::result::Result<SourceStream, Status> {
    let uri = http::Uri::builder()
        .scheme(ch.scheme.clone())
        .authority(ch.authority.clone())
        .path_and_query(SYNC_PATH)
        .build()
        .map_err(|e| Status::internal(format!("sync URI: {e}")))?;
    let req = http::Request::builder()
        .method(http::Method::POST)
        .uri(uri)
        .header(http::header::CONTENT_TYPE, GRPC_CONTENT_TYPE)
        .header(http::header::TE, "trailers")
        .body(tonic::body::boxed(TargetBody { rx }))
        .map_err(|e| Status::internal(format!("sync request: {e}")))?;
    ch.send
        .ready()
        .await
        .map_err(|e| Status::from_error(Box::new(e)))?;
    let resp = ch
        .send
        .send_request(req)
        .await
        .map_err(|e| Status::from_error(Box::new(e)))?;
    let (parts, body) = resp.into_parts();
    // A status in the headers: a trailers-only response (the source refused).
    let trailers_only = match Status::from_header_map(&parts.headers) {
        Some(s) if s.code() != Code::Ok => return Err(s),
        Some(_) => true,
        None => false,
    };
    if parts.status != http::StatusCode::OK {
        return Err(Status::unknown(format!(
            "HTTP status {} from the source",
            parts.status
        )));
    }
    Ok(SourceStream {
        body,
        reader: MessageReader::default(),
        done: trailers_only,
        max,
    })
}

impl SourceStream {
    /// The next message; `None` once the source ended the stream with an OK status.
    pub(crate) async fn message(&mut self) -> std::result::Result<Option<SourceMsg>, Status> {
        loop {
            if let Some(m) = self.reader.next::<SourceMsg>(self.max)? {
                return Ok(Some(m));
            }
            if self.done {
                return if self.reader.is_empty() {
                    Ok(None)
                } else {
                    Err(Status::internal("the stream ended inside a message"))
                };
            }
            match self.body.frame().await {
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => self.reader.push(d),
                    Err(f) => {
                        if let Ok(t) = f.into_trailers() {
                            self.done = true;
                            match Status::from_header_map(&t) {
                                Some(s) if s.code() == Code::Ok => {}
                                Some(s) => return Err(s),
                                None => return Err(Status::internal("trailers without a status")),
                            }
                        }
                    }
                },
                Some(Err(e)) => return Err(Status::from_error(Box::new(e))),
                None => return Err(Status::internal("the stream ended without a status")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(data: &[u8]) -> SourceMsg {
        SourceMsg {
            msg: Some(source_msg::Msg::Block(proto::Block {
                file: 7,
                offset: 3 << 30,
                data: Bytes::copy_from_slice(data),
            })),
        }
    }

    #[test]
    fn block_encoding_matches_prost() {
        for len in [1usize, 127, 128, 16383, 16384, 1 << 20] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31) as u8).collect();
            let m = block(&data);
            let (head, tail) = encode_source(m.clone());
            let tail = tail.expect("block data apart");
            assert_eq!(tail.as_ref(), &data[..]);
            let mut joined = head.to_vec();
            joined.extend_from_slice(&tail);
            assert_eq!(joined, encode(&m).to_vec(), "len {len}");
        }
        let m = SourceMsg {
            msg: Some(source_msg::Msg::Scanned(proto::Scanned { bytes_done: 9 })),
        };
        let (head, tail) = encode_source(m.clone());
        assert!(tail.is_none());
        assert_eq!(head, encode(&m));
    }

    #[test]
    fn reader_decodes_across_frames_and_slices_whole_data() {
        let data = vec![5u8; 100_000];
        let (head, tail) = encode_source(block(&data));
        let tail = tail.expect("block data apart");
        let mut r = MessageReader::default();
        // The head split anywhere, the data as one frame: data decoded without a copy.
        r.push(head.slice(..2));
        assert!(r.next::<SourceMsg>(1 << 20).expect("decode").is_none());
        r.push(head.slice(2..));
        assert!(r.next::<SourceMsg>(1 << 20).expect("decode").is_none());
        r.push(tail.clone());
        let m = r
            .next::<SourceMsg>(1 << 20)
            .expect("decode")
            .expect("whole");
        let Some(source_msg::Msg::Block(b)) = m.msg else {
            panic!("not a block")
        };
        assert_eq!((b.file, b.offset), (7, 3 << 30));
        assert_eq!(b.data.as_ptr(), tail.as_ptr(), "sliced, not copied");
        assert!(r.is_empty());

        // Everything cut into 1000-byte frames, two messages back to back.
        let mut all = encode(&block(&data)).to_vec();
        all.extend_from_slice(&encode(&block(b"xyz")));
        for c in all.chunks(1000) {
            r.push(Bytes::copy_from_slice(c));
        }
        let a = r
            .next::<SourceMsg>(1 << 20)
            .expect("decode")
            .expect("first");
        let b = r
            .next::<SourceMsg>(1 << 20)
            .expect("decode")
            .expect("second");
        assert_eq!(a, block(&data));
        assert_eq!(b, block(b"xyz"));
        assert!(r.next::<SourceMsg>(1 << 20).expect("decode").is_none());
        assert!(r.is_empty());
    }

    #[test]
    fn reader_refuses_oversized_and_compressed() {
        let mut r = MessageReader::default();
        r.push(encode(&block(&[1u8; 2000])));
        assert_eq!(
            r.next::<SourceMsg>(1000).expect_err("too big").code(),
            Code::OutOfRange
        );
        let mut r = MessageReader::default();
        r.push(Bytes::from_static(&[1, 0, 0, 0, 0]));
        assert_eq!(
            r.next::<SourceMsg>(1000).expect_err("compressed").code(),
            Code::Internal
        );
        let mut r = MessageReader::default();
        // A length-delimited field longer than the message.
        r.push(Bytes::from_static(&[0, 0, 0, 0, 2, 0x1a, 0x7f]));
        assert_eq!(
            r.next::<SourceMsg>(1000).expect_err("malformed").code(),
            Code::Internal
        );
        assert!(r.is_empty());
    }
}
