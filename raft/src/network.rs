//! The gRPC client side of node-to-node RPC.
//!
//! One tonic `Channel` per peer address, created lazily and kept for the life of the
//! process: HTTP/2 multiplexes every RPC to that peer over one persistent connection, and
//! tonic reconnects it after a failure. Each RPC carries a deadline (openraft's TTL for its
//! own RPCs). An unreachable peer is reported as `Unreachable`, on which openraft backs off
//! exponentially (50 ms doubling to 2 s) before trying again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drplane_statemachine::codec::{decode, encode};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tower::Service;

use crate::eager::EagerAppend;
use crate::forward::{ForwardRequest, ForwardResponse, NodeError};
use crate::pb::raft_client::RaftClient;
use crate::pb::Blob;
use crate::{NodeInfo, TypeConfig};

/// Cached channels to peers, by raft address. Cheap to clone.
///
/// With a TLS configuration every channel is `https` with mutual TLS: the peer must present
/// a certificate for its address signed by the cluster CA, and this node presents its own.
#[derive(Clone, Default)]
pub struct Channels {
    inner: Arc<Mutex<HashMap<String, OneFrame>>>,
    tls: Option<ClientTlsConfig>,
}

/// A transport failure (not an answer from the peer).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("peer {addr} unreachable: {msg}")]
    Unreachable { addr: String, msg: String },
    #[error("rpc to {addr} failed: {msg}")]
    Failed { addr: String, msg: String },
    #[error("codec: {0}")]
    Codec(String),
}

impl Channels {
    /// Channels that use mutual TLS when `tls` is given, plain HTTP/2 otherwise.
    pub fn new(tls: Option<ClientTlsConfig>) -> Channels {
        Channels {
            inner: Arc::default(),
            tls,
        }
    }

    fn channel(&self, addr: &str) -> Result<OneFrame, TransportError> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|e| {
            TransportError::Failed {
                addr: addr.to_string(),
                msg: format!("bad address: {e}"),
            }
        })?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| TransportError::Failed {
                    addr: addr.to_string(),
                    msg: format!("TLS configuration: {e}"),
                })?;
        }
        let endpoint = endpoint
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true);
        let channel = OneFrame(endpoint.connect_lazy());
        map.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// One unary call with a deadline; `method` picks the RPC.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: &str,
        method: Method,
        req: &Req,
        deadline: Duration,
    ) -> Result<Resp, TransportError> {
        let data = encode(req).map_err(|e| TransportError::Codec(e.to_string()))?;
        let mut client = RaftClient::new(self.channel(addr)?)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20);
        let mut request = tonic::Request::new(Blob { data });
        request.set_timeout(deadline);
        let result = match method {
            Method::AppendEntries => client.append_entries(request).await,
            Method::Vote => client.vote(request).await,
            Method::InstallSnapshot => client.install_snapshot(request).await,
            Method::Forward => client.forward(request).await,
            Method::PreVote => client.pre_vote(request).await,
        };
        match result {
            Ok(resp) => {
                decode(&resp.into_inner().data).map_err(|e| TransportError::Codec(e.to_string()))
            }
            Err(status) => {
                let msg = status.message().to_string();
                let addr = addr.to_string();
                Err(match status.code() {
                    tonic::Code::Unavailable => TransportError::Unreachable { addr, msg },
                    _ => TransportError::Failed { addr, msg },
                })
            }
        }
    }

    /// Send a request to the leader at `addr`.
    pub async fn forward(
        &self,
        addr: &str,
        req: &ForwardRequest,
        deadline: Duration,
    ) -> Result<Result<ForwardResponse, NodeError>, TransportError> {
        self.call(addr, Method::Forward, req, deadline).await
    }
}

/// A tonic channel that sends each request as one HTTP/2 DATA frame carrying END_STREAM.
///
/// tonic's own request body ends only when polled again after the message, so hyper sent
/// every RPC as three writes (HEADERS, DATA, then an empty DATA with END_STREAM), and the
/// receiving tonic server, which waits for the end of the stream before it calls the
/// handler, woke up for each (seen in `perf trace`: 44 + 353 + 9 bytes per AppendEntries).
/// The message is already encoded in memory, so collecting it costs nothing; as a
/// complete body it goes out with its headers in one write.
#[derive(Clone)]
struct OneFrame(Channel);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Service<http::Request<tonic::body::BoxBody>> for OneFrame {
    type Response = http::Response<tonic::body::BoxBody>;
    type Error = BoxError;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<tonic::body::BoxBody>) -> Self::Future {
        // The channel that was polled ready must make the call.
        let fresh = self.0.clone();
        let mut ready = std::mem::replace(&mut self.0, fresh);
        Box::pin(async move {
            use http_body_util::BodyExt;
            let (parts, body) = req.into_parts();
            let bytes = body.collect().await?.to_bytes();
            let body = http_body_util::Full::new(bytes)
                .map_err(|never| match never {})
                .boxed_unsync();
            ready
                .call(http::Request::from_parts(parts, body))
                .await
                .map_err(Into::into)
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Method {
    AppendEntries,
    Vote,
    InstallSnapshot,
    Forward,
    PreVote,
}

/// openraft's network factory: one [`PeerClient`] per target.
#[derive(Clone, Default)]
pub struct Network {
    pub channels: Channels,
    /// How long after a real acknowledgement a commit-only AppendEntries may be held
    /// back (see [`CommitRelay`]); zero sends every one. The heartbeat interval.
    pub commit_hold: Duration,
    /// Writes whose commit must reach the followers at once (see [`Urgency`]).
    pub urgency: Arc<Urgency>,
    /// Entries sent before the leader's own sync (`eager.rs`); None sends nothing eagerly.
    pub eager: Option<Arc<EagerAppend>>,
}

/// Writes whose commit index must reach every follower without waiting for the next
/// message, so [`CommitRelay`] holds nothing back while one is in flight and for a
/// hold interval after it was answered:
/// - writes forwarded by a follower, which waits until it has applied the write itself
///   before it answers its caller (read your write on the node you called);
/// - identity writes, because every node checks tokens and credentials against its own
///   copy (a revoked token must stop working on every node, not at the next heartbeat).
///
/// It also counts the messages the relays held back, for `/metrics`.
#[derive(Debug)]
pub struct Urgency {
    /// Commit-only AppendEntries answered without being sent, all streams.
    pub held_back: AtomicU64,
    in_flight: AtomicUsize,
    /// Milliseconds after `epoch` until which commits still travel at once.
    until_ms: AtomicU64,
    epoch: Instant,
    grace: Duration,
}

impl Default for Urgency {
    fn default() -> Urgency {
        Urgency::new(Duration::ZERO)
    }
}

impl Urgency {
    /// `grace`: how long after an urgent write was answered its commit still travels
    /// at once (its commit-only message follows the commit by microseconds).
    pub fn new(grace: Duration) -> Urgency {
        Urgency {
            held_back: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            grace,
        }
    }

    /// Marks an urgent write in flight until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> UrgentWrite {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        UrgentWrite(self.clone())
    }

    fn active(&self, now: Instant) -> bool {
        self.in_flight.load(Ordering::SeqCst) > 0
            || (now.saturating_duration_since(self.epoch).as_millis() as u64)
                < self.until_ms.load(Ordering::SeqCst)
    }
}

/// An urgent write in flight; see [`Urgency`].
pub struct UrgentWrite(Arc<Urgency>);

impl Drop for UrgentWrite {
    fn drop(&mut self) {
        let u = &self.0;
        let until = (Instant::now() + u.grace).saturating_duration_since(u.epoch);
        u.until_ms
            .fetch_max(until.as_millis() as u64 + 1, Ordering::SeqCst);
        u.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &NodeInfo) -> Self::Network {
        PeerClient {
            target,
            addr: node.raft.clone(),
            channels: self.channels.clone(),
            relay: CommitRelay::new(self.commit_hold, self.urgency.clone()),
            eager: self.eager.clone(),
            stream: false,
        }
    }
}

pub struct PeerClient {
    target: u64,
    addr: String,
    channels: Channels,
    relay: CommitRelay,
    eager: Option<Arc<EagerAppend>>,
    /// Whether this client carried entries: it is a replication stream (openraft also
    /// makes short-lived clients for votes and leadership checks).
    stream: bool,
}

impl PeerClient {
    /// One AppendEntries, answered by the eager copy of its first entries when there is
    /// one (`eager.rs`): the rest, if any, is sent after it; anything but a success of the
    /// eager copy sends the whole request.
    async fn append(
        &self,
        rpc: &AppendEntriesRequest<TypeConfig>,
        option: &RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, NodeInfo, RaftError<u64>>> {
        let Some((inflight, at)) = self.eager.as_ref().and_then(|e| e.take(self.target, rpc))
        else {
            return self.rpc(Method::AppendEntries, rpc, option).await;
        };
        let eager_last = inflight.last();
        match inflight.answer().await {
            Some(AppendEntriesResponse::Success) => {}
            Some(AppendEntriesResponse::HigherVote(v)) => {
                return Ok(AppendEntriesResponse::HigherVote(v))
            }
            _ => return self.rpc(Method::AppendEntries, rpc, option).await,
        }
        if let Some(e) = &self.eager {
            e.used.fetch_add(1, Ordering::Relaxed);
        }
        if at + 1 == rpc.entries.len() {
            return Ok(AppendEntriesResponse::Success);
        }
        let rest = AppendEntriesRequest::<TypeConfig> {
            vote: rpc.vote,
            prev_log_id: Some(eager_last),
            leader_commit: rpc.leader_commit,
            entries: rpc.entries[at + 1..].to_vec(),
        };
        let sent: Result<AppendEntriesResponse<u64>, RPCError<u64, NodeInfo, RaftError<u64>>> =
            self.rpc(Method::AppendEntries, &rest, option).await;
        match sent {
            Ok(AppendEntriesResponse::Success) => Ok(AppendEntriesResponse::Success),
            Ok(AppendEntriesResponse::HigherVote(v)) => Ok(AppendEntriesResponse::HigherVote(v)),
            Ok(AppendEntriesResponse::PartialSuccess(m)) if m > Some(eager_last) => {
                Ok(AppendEntriesResponse::PartialSuccess(m))
            }
            // The follower holds the eager part: report that much.
            _ => Ok(AppendEntriesResponse::PartialSuccess(Some(eager_last))),
        }
    }
}

/// Holds back AppendEntries whose only news is a higher commit index.
///
/// After every commit openraft 0.9 sends each follower an AppendEntries with no entries
/// that carries only the new `leader_commit`. At one client that is two more RPCs per
/// write, each waking the follower (and its state machine) and the leader again while the
/// next write is in flight; on this project's two-core machines that cost 0.1 ms of
/// every write's latency (BENCHMARKS.md).
///
/// Such a message is answered here, without sending it, only when all of this holds on
/// this replication stream (one `PeerClient`, i.e. one leader term and target):
/// - it has no entries;
/// - its `prev_log_id` is exactly the log id the follower acknowledged in this client's
///   last real, successful AppendEntries, under the same vote, less than `hold` ago;
/// - its `leader_commit` is higher than any this client has sent or held back.
///
/// The answer, `Success`, tells the leader only what the follower already told it: that
/// its log matches up to `prev_log_id`. Commit progress on the leader needs real
/// acknowledgements of new entries, which always travel. The follower learns the commit
/// index from the next message that does travel: the next write's entries, or the
/// periodic heartbeat (its `leader_commit` is not higher than one already held back, so it
/// is sent), so a follower's applied index trails by at most one heartbeat interval when
/// writes stop. Reads on followers are not delayed by that: their read index comes from
/// the leader's quorum heartbeat (`ensure_linearizable`), which openraft sends through a
/// fresh client with no history here, and that heartbeat carries the commit index.
/// Votes and a higher term are found by the next real message, within `hold`.
/// Nothing is held back while an [`Urgency`] write is in flight or just answered.
struct CommitRelay {
    hold: Duration,
    urgency: Arc<Urgency>,
    acked: Option<Acked>,
}

struct Acked {
    vote: openraft::Vote<u64>,
    matching: Option<crate::LogId>,
    leader_commit: Option<crate::LogId>,
    at: Instant,
}

impl CommitRelay {
    fn new(hold: Duration, urgency: Arc<Urgency>) -> CommitRelay {
        CommitRelay {
            hold,
            urgency,
            acked: None,
        }
    }

    /// True when `rpc` may be answered `Success` without being sent.
    fn hold_back(&mut self, rpc: &AppendEntriesRequest<TypeConfig>, now: Instant) -> bool {
        let Some(acked) = self.acked.as_mut() else {
            return false;
        };
        let held = rpc.entries.is_empty()
            && rpc.vote == acked.vote
            && rpc.prev_log_id == acked.matching
            && rpc.leader_commit > acked.leader_commit
            && now.saturating_duration_since(acked.at) < self.hold
            && !self.urgency.active(now);
        if held {
            acked.leader_commit = rpc.leader_commit;
            self.urgency.held_back.fetch_add(1, Ordering::Relaxed);
        }
        held
    }

    /// Records the outcome of an AppendEntries that was sent at `sent`.
    fn sent(
        &mut self,
        rpc: &AppendEntriesRequest<TypeConfig>,
        sent: Instant,
        outcome: Option<&AppendEntriesResponse<u64>>,
    ) {
        let matching = match outcome {
            Some(AppendEntriesResponse::Success) => {
                rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id)
            }
            Some(AppendEntriesResponse::PartialSuccess(m)) => *m,
            _ => {
                self.acked = None;
                return;
            }
        };
        self.acked = Some(Acked {
            vote: rpc.vote,
            matching,
            leader_commit: rpc.leader_commit,
            at: sent,
        });
    }
}

impl PeerClient {
    async fn rpc<Req, Resp, E>(
        &self,
        method: Method,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, NodeInfo, RaftError<u64, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let result: Result<Resp, RaftError<u64, E>> = self
            .channels
            .call(&self.addr, method, req, option.hard_ttl())
            .await
            .map_err(|e| match e {
                TransportError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&e)),
                _ => RPCError::Network(NetworkError::new(&e)),
            })?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, NodeInfo, RaftError<u64>>> {
        let now = Instant::now();
        if self.relay.hold_back(&rpc, now) {
            return Ok(AppendEntriesResponse::Success);
        }
        self.stream |= !rpc.entries.is_empty();
        let result = self.append(&rpc, &option).await;
        self.relay.sent(&rpc, now, result.as_ref().ok());
        if let (Some(eager), true) = (&self.eager, self.stream) {
            let matching = match &result {
                Ok(AppendEntriesResponse::Success) => {
                    Some(rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id))
                }
                Ok(AppendEntriesResponse::PartialSuccess(m)) => Some(*m),
                _ => None,
            };
            match matching {
                Some(m) => eager.acknowledged(self.target, &self.addr, rpc.vote, m),
                None => eager.forget(self.target),
            }
        }
        result
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, NodeInfo, RaftError<u64, InstallSnapshotError>>,
    > {
        self.rpc(Method::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, NodeInfo, RaftError<u64>>> {
        self.rpc(Method::Vote, &rpc, &option).await
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(
            (0..)
                .map(|i: u32| Duration::from_millis(50u64.saturating_mul(1 << i.min(6)).min(2000))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, Vote};

    const HOLD: Duration = Duration::from_millis(40);

    fn id(term: u64, index: u64) -> crate::LogId {
        openraft::LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn vote(term: u64) -> Vote<u64> {
        Vote::new_committed(term, 1)
    }

    fn request(
        term: u64,
        prev: Option<u64>,
        entries: &[u64],
        commit: Option<u64>,
    ) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: vote(term),
            prev_log_id: prev.map(|i| id(term, i)),
            leader_commit: commit.map(|i| id(term, i)),
            entries: entries
                .iter()
                .map(|&i| Entry {
                    log_id: id(term, i),
                    payload: EntryPayload::Blank,
                })
                .collect(),
        }
    }

    /// A relay whose follower acknowledged entries 4..=5 (commit 3) at `at`.
    fn acked_at(at: Instant) -> CommitRelay {
        let mut relay = CommitRelay::new(HOLD, Arc::default());
        relay.sent(
            &request(2, Some(3), &[4, 5], Some(3)),
            at,
            Some(&AppendEntriesResponse::Success),
        );
        relay
    }

    #[test]
    fn commit_only_news_is_held_and_the_next_heartbeat_carries_it() {
        let t0 = Instant::now();
        let mut relay = acked_at(t0);
        assert!(relay.hold_back(&request(2, Some(5), &[], Some(5)), t0));
        // The periodic heartbeat has the same commit index: it travels.
        assert!(!relay.hold_back(&request(2, Some(5), &[], Some(5)), t0));
        // So does the next write's entries.
        assert!(!relay.hold_back(&request(2, Some(5), &[6], Some(5)), t0));
    }

    #[test]
    fn anything_the_follower_has_not_acknowledged_travels() {
        let t0 = Instant::now();
        // A new client (a fresh stream or a leadership check) has no history.
        assert!(!CommitRelay::new(HOLD, Arc::default())
            .hold_back(&request(2, Some(5), &[], Some(5)), t0));
        // Entries, another prev_log_id, another vote, no higher commit index.
        assert!(!acked_at(t0).hold_back(&request(2, Some(5), &[6], Some(5)), t0));
        assert!(!acked_at(t0).hold_back(&request(2, Some(4), &[], Some(5)), t0));
        assert!(!acked_at(t0).hold_back(&request(3, Some(5), &[], Some(5)), t0));
        assert!(!acked_at(t0).hold_back(&request(2, Some(5), &[], Some(3)), t0));
        // The acknowledgement is older than the hold.
        assert!(!acked_at(t0).hold_back(&request(2, Some(5), &[], Some(5)), t0 + HOLD));
        // Holding is off.
        let mut off = CommitRelay::new(Duration::ZERO, Arc::default());
        off.sent(
            &request(2, Some(3), &[4, 5], Some(3)),
            t0,
            Some(&AppendEntriesResponse::Success),
        );
        assert!(!off.hold_back(&request(2, Some(5), &[], Some(5)), t0));
    }

    #[test]
    fn nothing_is_held_during_an_urgent_write_and_its_grace() {
        let urgency = Arc::new(Urgency::new(Duration::from_secs(3600)));
        let mut relay = CommitRelay::new(Duration::from_secs(7200), urgency.clone());
        let t0 = Instant::now();
        relay.sent(
            &request(2, Some(3), &[4, 5], Some(3)),
            t0,
            Some(&AppendEntriesResponse::Success),
        );
        let write = urgency.begin();
        assert!(!relay.hold_back(&request(2, Some(5), &[], Some(4)), Instant::now()));
        drop(write);
        // Answered: its commit still travels during the grace, and is held after it.
        assert!(!relay.hold_back(&request(2, Some(5), &[], Some(5)), Instant::now()));
        let after = Instant::now() + Duration::from_secs(3601);
        assert!(relay.hold_back(&request(2, Some(5), &[], Some(6)), after));
    }

    #[test]
    fn a_failed_or_refused_append_forgets_the_acknowledgement() {
        let t0 = Instant::now();
        for outcome in [None, Some(AppendEntriesResponse::Conflict)] {
            let mut relay = acked_at(t0);
            relay.sent(&request(2, Some(5), &[6], Some(5)), t0, outcome.as_ref());
            assert!(!relay.hold_back(&request(2, Some(5), &[], Some(6)), t0));
            assert!(!relay.hold_back(&request(2, Some(6), &[], Some(6)), t0));
        }
        // A partial success acknowledges only what the follower matched.
        let mut relay = acked_at(t0);
        relay.sent(
            &request(2, Some(5), &[6, 7], Some(5)),
            t0,
            Some(&AppendEntriesResponse::PartialSuccess(Some(id(2, 6)))),
        );
        assert!(!relay.hold_back(&request(2, Some(7), &[], Some(7)), t0));
        assert!(relay.hold_back(&request(2, Some(6), &[], Some(6)), t0));
    }

    /// A follower at a real gRPC address that records every AppendEntries and answers
    /// the first with `first`, every later one with `then`.
    struct FakeFollower {
        seen: Arc<Mutex<Vec<AppendEntriesRequest<TypeConfig>>>>,
        first: fn() -> AppendEntriesResponse<u64>,
        then: fn() -> AppendEntriesResponse<u64>,
    }

    #[tonic::async_trait]
    impl crate::pb::raft_server::Raft for FakeFollower {
        async fn append_entries(
            &self,
            request: tonic::Request<Blob>,
        ) -> Result<tonic::Response<Blob>, tonic::Status> {
            let rpc: AppendEntriesRequest<TypeConfig> = decode(&request.into_inner().data)
                .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
            let n = {
                let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                seen.push(rpc.clone());
                seen.len()
            };
            let answer: Result<AppendEntriesResponse<u64>, RaftError<u64>> = Ok(if n == 1 {
                (self.first)()
            } else {
                (self.then)()
            });
            let data = encode(&answer).map_err(|e| tonic::Status::internal(e.to_string()))?;
            Ok(tonic::Response::new(Blob { data }))
        }
        async fn vote(
            &self,
            _: tonic::Request<Blob>,
        ) -> Result<tonic::Response<Blob>, tonic::Status> {
            Err(tonic::Status::unimplemented("vote"))
        }
        async fn install_snapshot(
            &self,
            _: tonic::Request<Blob>,
        ) -> Result<tonic::Response<Blob>, tonic::Status> {
            Err(tonic::Status::unimplemented("install_snapshot"))
        }
        async fn forward(
            &self,
            _: tonic::Request<Blob>,
        ) -> Result<tonic::Response<Blob>, tonic::Status> {
            Err(tonic::Status::unimplemented("forward"))
        }
        async fn pre_vote(
            &self,
            _: tonic::Request<Blob>,
        ) -> Result<tonic::Response<Blob>, tonic::Status> {
            Err(tonic::Status::unimplemented("pre_vote"))
        }
    }

    /// What one AppendEntries did: openraft's answer, the requests the follower saw as
    /// (prev index, entry indexes), and how many eager answers were used.
    type Outcome = (
        Result<AppendEntriesResponse<u64>, RPCError<u64, NodeInfo, RaftError<u64>>>,
        Vec<(Option<u64>, Vec<u64>)>,
        u64,
    );

    /// Leader 1 of term 2 sends entries 6..=8 eagerly to follower 7 (a fake on a real
    /// gRPC server that acknowledged index 5 and answers `first`, then `then`); then the
    /// replication stream sends `entries` after index 5.
    async fn replicate(
        first: fn() -> AppendEntriesResponse<u64>,
        then: fn() -> AppendEntriesResponse<u64>,
        entries: &[u64],
    ) -> anyhow::Result<Outcome> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let service = crate::pb::raft_server::RaftServer::new(FakeFollower {
            seen: seen.clone(),
            first,
            then,
        });
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming),
        );

        let channels = Channels::default();
        let eager = Arc::new(EagerAppend::new(
            1,
            channels.clone(),
            Duration::from_secs(5),
        ));
        eager.acknowledged(7, &addr, vote(2), Some(id(2, 5)));
        assert!(eager.send(&request(2, Some(5), &[6, 7, 8], None).entries, None));
        let mut client = PeerClient {
            target: 7,
            addr,
            channels,
            relay: CommitRelay::new(HOLD, Arc::default()),
            eager: Some(eager.clone()),
            stream: true,
        };
        let option = RPCOption::new(Duration::from_secs(5));
        let resp = client
            .append_entries(request(2, Some(5), entries, Some(5)), option)
            .await;
        let seen = seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|r| {
                (
                    r.prev_log_id.map(|l| l.index),
                    r.entries.iter().map(|e| e.log_id.index).collect(),
                )
            })
            .collect();
        Ok((resp, seen, eager.used.load(Ordering::Relaxed)))
    }

    fn success() -> AppendEntriesResponse<u64> {
        AppendEntriesResponse::Success
    }

    fn conflict() -> AppendEntriesResponse<u64> {
        AppendEntriesResponse::Conflict
    }

    #[tokio::test]
    async fn the_eager_answer_stands_in_and_only_the_rest_is_sent() -> anyhow::Result<()> {
        let (resp, seen, used) = replicate(success, success, &[6, 7, 8, 9]).await?;
        assert!(
            matches!(resp, Ok(AppendEntriesResponse::Success)),
            "{resp:?}"
        );
        assert_eq!(seen, vec![(Some(5), vec![6, 7, 8]), (Some(8), vec![9])]);
        assert_eq!(used, 1);
        Ok(())
    }

    #[tokio::test]
    async fn a_refused_eager_copy_sends_the_whole_request() -> anyhow::Result<()> {
        let (resp, seen, used) = replicate(conflict, success, &[6, 7, 8]).await?;
        assert!(
            matches!(resp, Ok(AppendEntriesResponse::Success)),
            "{resp:?}"
        );
        assert_eq!(
            seen,
            vec![(Some(5), vec![6, 7, 8]), (Some(5), vec![6, 7, 8])]
        );
        assert_eq!(used, 0);
        Ok(())
    }

    #[tokio::test]
    async fn a_refused_rest_reports_only_the_eager_part() -> anyhow::Result<()> {
        let (resp, seen, _) = replicate(success, conflict, &[6, 7, 8, 9, 10]).await?;
        assert!(
            matches!(resp, Ok(AppendEntriesResponse::PartialSuccess(Some(m))) if m == id(2, 8)),
            "{resp:?}"
        );
        assert_eq!(seen, vec![(Some(5), vec![6, 7, 8]), (Some(8), vec![9, 10])]);
        Ok(())
    }
}
