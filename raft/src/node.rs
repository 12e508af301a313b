//! [`RaftNode`]: one drplane member's Raft instance and the paths through it.
//!
//! ```text
//!  write:  caller ─► propose ─► route ─┬─ leader here: batcher ─► client_write_ff ─► commit ─► apply
//!                                      └─ elsewhere: Forward RPC ─► leader's batcher ... ─► reply
//!                                          then wait until this node applied that index
//!  read:   caller ─► read_barrier ─┬─ leader here: ensure_linearizable (quorum heartbeat)
//!                                  └─ elsewhere: Forward(ReadIndex) ─► wait applied ≥ index
//! ```
//!
//! Every proposal carries a request id (the caller's idempotency key or one made here), and
//! the state machine applies an id once: so `route` may retry a proposal after a leader change
//! or a lost reply without applying it twice. Every wait is bounded by the request deadline;
//! past it the caller gets `Unavailable` (nothing was sent) or `Unknown` (it may have been).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drplane_statemachine::{Command, CommandResult, Proposal, ProposalBatch, Store};
use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{ChangeMembers, ServerState, SnapshotPolicy};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::eager::EagerAppend;
use crate::election::{Contact, Elections, PreVoteRequest, PreVoteResponse, Timing};
use crate::forward::{ForwardRequest, ForwardResponse, MembershipChange, NodeError};
use crate::log_store::LogStore;
use crate::metrics::{counter, gauge, Metrics};
use crate::network::{Channels, Network, Urgency};
use crate::state_machine::StateMachine;
use crate::{now_ms, NodeInfo, Raft};

/// Most proposals carried by one log entry.
const MAX_BATCH: usize = 1024;
/// Log entries in flight from the batcher at once; more arrivals wait and share an entry.
const MAX_INFLIGHT_ENTRIES: usize = 4;

#[derive(Debug, Clone)]
pub struct RaftNodeConfig {
    pub id: u64,
    pub info: NodeInfo,
    pub data_dir: PathBuf,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_logs: u64,
    /// Entries kept in the log behind a snapshot (for followers slightly behind).
    pub keep_logs: u64,
    /// Deadline for a client request through the cluster.
    pub request_timeout: Duration,
    /// Mutual TLS for node-to-node RPC (this node's identity and the cluster CA); None
    /// for plain HTTP/2.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl RaftNodeConfig {
    pub fn new(id: u64, info: NodeInfo, data_dir: PathBuf) -> Self {
        RaftNodeConfig {
            id,
            info,
            data_dir,
            // The election maximum is also openraft's leader lease: a member that heard
            // from a leader within it refuses votes. `election.rs` starts a pre-vote once a
            // lease plus a random 0..min/2 passed without contact: with these values a dead
            // leader is replaced about 180-230 ms after its last heartbeat.
            heartbeat_ms: 40,
            election_timeout_min_ms: 90,
            election_timeout_max_ms: 180,
            snapshot_logs: 10_000,
            keep_logs: 1_000,
            request_timeout: Duration::from_secs(5),
            tls: None,
        }
    }
}

/// One member's view of another, for cluster status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    pub id: u64,
    pub info: NodeInfo,
    pub voter: bool,
    pub leader: bool,
    pub matched_index: Option<u64>,
    pub lag: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    pub node_id: u64,
    /// The leader as far as this node can tell: none on a follower that has not heard
    /// from its last leader for a lease (that leader may be dead or cut off).
    pub leader_id: Option<u64>,
    /// On a follower: milliseconds since it last heard from a leader.
    pub leader_contact_ms: Option<u64>,
    pub term: u64,
    pub state: String,
    pub last_log_index: Option<u64>,
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub members: Vec<MemberView>,
}

struct Pending {
    proposal: Proposal,
    tx: oneshot::Sender<Settle>,
}

/// openraft's answer to one client write.
type WriteAnswer = oneshot::Receiver<
    Result<openraft::raft::ClientWriteResponse<crate::TypeConfig>, ClientWriteError<u64, NodeInfo>>,
>;

/// What the batcher hands back to a proposer.
enum Settle {
    /// The proposal's index and result, or why it has none.
    Done(Result<(u64, CommandResult), NodeError>),
    /// The proposal went into an entry alone: its proposer awaits openraft's answer itself
    /// (one task wake-up less per write at low load), holding the in-flight permit.
    Alone(OwnedSemaphorePermit, WriteAnswer),
}

impl Settle {
    async fn into_result(self) -> Result<(u64, CommandResult), NodeError> {
        match self {
            Settle::Done(r) => r,
            Settle::Alone(permit, answer) => {
                let outcome = answer.await;
                drop(permit);
                settle(outcome, 1)
                    .pop()
                    .unwrap_or_else(|| Err(NodeError::Internal("no result".into())))
            }
        }
    }
}

/// openraft's answer to an entry of `n` proposals, as one result per proposal.
fn settle(
    outcome: Result<
        Result<
            openraft::raft::ClientWriteResponse<crate::TypeConfig>,
            ClientWriteError<u64, NodeInfo>,
        >,
        impl std::fmt::Debug,
    >,
    n: usize,
) -> Vec<Result<(u64, CommandResult), NodeError>> {
    let all = |e: NodeError| (0..n).map(|_| Err(e.clone())).collect();
    match outcome {
        Ok(Ok(resp)) => {
            let index = resp.log_id.index;
            if resp.data.0.len() != n {
                return all(NodeError::Internal("result count mismatch".into()));
            }
            resp.data.0.into_iter().map(|r| Ok((index, r))).collect()
        }
        Ok(Err(ClientWriteError::ForwardToLeader(f))) => all(NodeError::NotLeader {
            leader: f.leader_id,
        }),
        Ok(Err(e)) => all(NodeError::Internal(e.to_string())),
        Err(_) => all(NodeError::Unknown(
            "leadership ended before the entry's fate was known".into(),
        )),
    }
}

pub struct RaftNode {
    pub id: u64,
    pub info: NodeInfo,
    pub raft: Raft,
    pub metrics: Arc<Metrics>,
    store: Store,
    log_store: LogStore,
    channels: Channels,
    /// Marks writes whose commit must reach followers at once (see `network::Urgency`).
    urgency: Arc<Urgency>,
    /// Entries sent to followers before the leader's own sync (`eager.rs`).
    eager: Option<Arc<EagerAppend>>,
    batcher: mpsc::Sender<Pending>,
    request_timeout: Duration,
    election_timeout_max_ms: u64,
    boot_ms: u64,
    next_request: AtomicU64,
    elections: Arc<Elections>,
}

impl RaftNode {
    /// Open the stores under `cfg.data_dir` and start Raft. The node serves RPCs once its
    /// [`crate::service::raft_service`] is mounted.
    pub async fn start(cfg: RaftNodeConfig) -> anyhow::Result<Arc<RaftNode>> {
        use anyhow::Context;
        let log_dir = cfg.data_dir.join("raft-log");
        let sm_dir = cfg.data_dir.join("state");
        for d in [&log_dir, &sm_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let metrics = Arc::new(Metrics::default());
        let log_store = LogStore::open(&log_dir, metrics.clone())
            .with_context(|| format!("opening raft log in {}", log_dir.display()))?;
        let store = Store::open(&sm_dir)
            .with_context(|| format!("opening state in {}", sm_dir.display()))?;
        let sm = StateMachine::new(store.clone()).context("opening state machine")?;
        // Earlier builds kept a copy of the state in `snapshot/snapshot.bin`; snapshots
        // are exported from the store now, so the copy is only wasted disk.
        let legacy = cfg.data_dir.join("snapshot");
        if legacy.exists() {
            match std::fs::remove_dir_all(&legacy) {
                Ok(()) => tracing::info!(dir = %legacy.display(), "removed the old snapshot copy"),
                Err(e) => {
                    tracing::warn!(dir = %legacy.display(), error = %e, "could not remove the old snapshot copy")
                }
            }
        }

        let config = openraft::Config {
            cluster_name: "drplane".into(),
            heartbeat_interval: cfg.heartbeat_ms,
            election_timeout_min: cfg.election_timeout_min_ms,
            election_timeout_max: cfg.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_logs),
            max_in_snapshot_log_to_keep: cfg.keep_logs,
            max_payload_entries: 512,
            snapshot_max_chunk_size: 1 << 20,
            install_snapshot_timeout: 2000,
            // Elections are started by `election.rs` after a pre-vote, not by openraft's
            // per-process timer.
            enable_elect: false,
            ..Default::default()
        }
        .validate()
        .context("raft configuration")?;
        let channels = Channels::new(cfg.tls.clone());
        // `DRPLANE_EAGER_APPEND=0` turns eager appends off (for comparisons).
        let eager = (std::env::var("DRPLANE_EAGER_APPEND").as_deref() != Ok("0")).then(|| {
            Arc::new(EagerAppend::new(
                cfg.id,
                channels.clone(),
                Duration::from_millis(cfg.heartbeat_ms),
            ))
        });
        if let Some(e) = &eager {
            log_store.set_eager(e.clone());
        }
        let network = Network {
            eager: eager.clone(),
            channels,
            commit_hold: Duration::from_millis(cfg.heartbeat_ms),
            urgency: Arc::new(Urgency::new(Duration::from_millis(cfg.heartbeat_ms))),
        };
        let urgency = network.urgency.clone();
        let channels = network.channels.clone();
        let raft = Raft::new(cfg.id, Arc::new(config), network, log_store.clone(), sm)
            .await
            .context("starting raft")?;

        let elections = Arc::new(Elections {
            id: cfg.id,
            raft: raft.clone(),
            log_store: log_store.clone(),
            channels: channels.clone(),
            contact: Contact::new(),
            timing: Timing::from_config(
                cfg.heartbeat_ms,
                cfg.election_timeout_min_ms,
                cfg.election_timeout_max_ms,
            ),
            pre_votes_granted: AtomicU64::new(0),
            elections_started: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel(MAX_BATCH * 8);
        let node = Arc::new(RaftNode {
            id: cfg.id,
            info: cfg.info.clone(),
            raft: raft.clone(),
            metrics: metrics.clone(),
            store,
            log_store,
            channels,
            urgency,
            eager,
            batcher: tx,
            request_timeout: cfg.request_timeout,
            election_timeout_max_ms: cfg.election_timeout_max_ms,
            boot_ms: now_ms(),
            next_request: AtomicU64::new(0),
            elections: elections.clone(),
        });
        tokio::spawn(crate::election::drive(elections));
        tokio::spawn(run_batcher(raft.clone(), rx, metrics.clone()));
        tokio::spawn(watch_leader(raft, metrics));
        Ok(node)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The leader's AppendEntries or InstallSnapshot was just accepted (see `election.rs`).
    pub fn leader_contact(&self) {
        self.elections.contact.touch();
    }

    /// Answer another member's pre-vote.
    pub fn handle_pre_vote(&self, req: &PreVoteRequest) -> PreVoteResponse {
        self.elections.handle_pre_vote(req)
    }

    fn metrics_now(&self) -> openraft::RaftMetrics<u64, NodeInfo> {
        self.raft.metrics().borrow().clone()
    }

    /// Replicate one proposal and return its result once applied on this node.
    pub async fn propose(&self, mut proposal: Proposal) -> Result<CommandResult, NodeError> {
        if proposal.request_id.is_none() {
            let n = self.next_request.fetch_add(1, Ordering::Relaxed);
            proposal.request_id = Some(format!("n{}-{}-{}", self.id, self.boot_ms, n));
        }
        let deadline = Instant::now() + self.request_timeout;
        match self
            .route(ForwardRequest::Propose(vec![proposal]), deadline)
            .await?
        {
            (ForwardResponse::Proposed { index, mut results }, local) => {
                if !local {
                    // Answer after this node applied it too, so the caller reads its write here.
                    let wait = deadline
                        .saturating_duration_since(Instant::now())
                        .min(Duration::from_secs(1));
                    let _ = self
                        .raft
                        .wait(Some(wait))
                        .applied_index_at_least(Some(index), "read your write")
                        .await;
                }
                results
                    .pop()
                    .ok_or_else(|| NodeError::Internal("leader returned no result".into()))
            }
            (other, _) => Err(NodeError::Internal(format!("unexpected answer {other:?}"))),
        }
    }

    /// [`RaftNode::propose`] for decisions only the current leader may make (the
    /// scheduler's): handled on this node or not at all, never forwarded. A deposed leader
    /// that does not know it yet cannot commit it (no quorum acknowledges its term), and it
    /// cannot slip it into its successor's term through `route`. Same request ids and
    /// deadline as `propose`; `NotLeader` when this node does not lead.
    pub async fn propose_as_leader(
        &self,
        mut proposal: Proposal,
    ) -> Result<CommandResult, NodeError> {
        if proposal.request_id.is_none() {
            let n = self.next_request.fetch_add(1, Ordering::Relaxed);
            proposal.request_id = Some(format!("n{}-{}-{}", self.id, self.boot_ms, n));
        }
        let req = ForwardRequest::Propose(vec![proposal]);
        match tokio::time::timeout(self.request_timeout, self.handle_forward(req)).await {
            Ok(Ok(ForwardResponse::Proposed { mut results, .. })) => results
                .pop()
                .ok_or_else(|| NodeError::Internal("the batcher returned no result".into())),
            Ok(Ok(other)) => Err(NodeError::Internal(format!("unexpected answer {other:?}"))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(NodeError::Unknown(format!(
                "not committed within {:?}; it may still be applied",
                self.request_timeout
            ))),
        }
    }

    /// Wait until this node's store reflects everything committed before the call.
    pub async fn read_barrier(&self) -> Result<(), NodeError> {
        let deadline = Instant::now() + self.request_timeout;
        match self.route(ForwardRequest::ReadIndex, deadline).await? {
            (ForwardResponse::ReadIndex(index), true) => {
                // Local leader: handle_forward already waited for the apply.
                let _ = index;
                Ok(())
            }
            (ForwardResponse::ReadIndex(index), false) => {
                let wait = deadline.saturating_duration_since(Instant::now());
                self.raft
                    .wait(Some(wait))
                    .applied_index_at_least(index, "linearizable read")
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        NodeError::Unavailable(format!("this node did not catch up in time: {e}"))
                    })
            }
            (other, _) => Err(NodeError::Internal(format!("unexpected answer {other:?}"))),
        }
    }

    /// Wait until this node has applied every entry it knows to be committed: a local
    /// wait, no network. Bounded by a second; a node whose state machine cannot keep up
    /// for that long is unavailable rather than answering from older state.
    pub async fn apply_known_commits(&self) -> Result<(), NodeError> {
        let Some(committed) = self.log_store.committed_index() else {
            return Ok(());
        };
        let applied = self.raft.metrics().borrow().last_applied.map(|l| l.index);
        if applied >= Some(committed) {
            return Ok(());
        }
        self.raft
            .wait(Some(Duration::from_secs(1)))
            .applied_index_at_least(Some(committed), "apply known commits")
            .await
            .map(|_| ())
            .map_err(|e| {
                NodeError::Unavailable(format!(
                    "this node has not applied index {committed}, which it knows is committed: {e}"
                ))
            })
    }

    /// Make a one-node cluster of this node, then record its site.
    pub async fn initialize(&self) -> Result<(), NodeError> {
        let members = BTreeMap::from([(self.id, self.info.clone())]);
        match self.raft.initialize(members).await {
            Ok(()) => {}
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                return Err(NodeError::Refused(
                    "this node already belongs to an initialized cluster".into(),
                ))
            }
            Err(e) => return Err(NodeError::Internal(e.to_string())),
        }
        let _ = self
            .raft
            .wait(Some(self.request_timeout))
            .current_leader(self.id, "initialize")
            .await;
        self.ensure_site(&self.info.site).await
    }

    /// Record `site` as a site if it is not one yet.
    async fn ensure_site(&self, site: &str) -> Result<(), NodeError> {
        let cmd = drplane_statemachine::Command::CreateSite {
            name: site.to_string(),
            description: String::new(),
        };
        match self
            .propose(Proposal {
                request_id: None,
                command: cmd,
            })
            .await?
        {
            Ok(_) | Err(drplane_statemachine::CommandError::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(NodeError::BadRequest(format!("site '{site}': {e}"))),
        }
    }

    pub async fn add_learner(&self, id: u64, node: NodeInfo) -> Result<(), NodeError> {
        let deadline = Instant::now() + self.request_timeout;
        let site = node.site.clone();
        self.route(ForwardRequest::AddLearner { id, node }, deadline)
            .await?;
        self.ensure_site(&site).await
    }

    pub async fn change_membership(
        &self,
        change: MembershipChange,
        force: bool,
    ) -> Result<(), NodeError> {
        let deadline = Instant::now() + self.request_timeout;
        self.route(ForwardRequest::ChangeMembership { change, force }, deadline)
            .await
            .map(|_| ())
    }

    /// Send `req` to wherever the leader is, retrying through leader changes until
    /// `deadline`. Returns the answer and whether it was handled on this node.
    async fn route(
        &self,
        req: ForwardRequest,
        deadline: Instant,
    ) -> Result<(ForwardResponse, bool), NodeError> {
        let retry_unknown = matches!(req, ForwardRequest::Propose(_) | ForwardRequest::ReadIndex);
        let is_write = matches!(req, ForwardRequest::Propose(_));
        // Whether a leader may have received this proposal: then running out of time is
        // "outcome unknown", never "not applied" (a forward that timed out or broke after
        // sending may still commit; a retry with the same request id is applied once).
        let mut maybe_sent = false;
        let mut rx = self.raft.metrics();
        let mut last_err = String::from("no leader is known");
        loop {
            let (leader, leader_addr) = {
                let m = rx.borrow_and_update();
                let leader = m.current_leader;
                let addr = leader.and_then(|l| {
                    m.membership_config
                        .membership()
                        .get_node(&l)
                        .map(|n| n.raft.clone())
                });
                (leader, addr)
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                if maybe_sent {
                    return Err(NodeError::Unknown(format!(
                        "no answer from a leader within {:?}, after the proposal may have \
                         reached one: {last_err}",
                        self.request_timeout
                    )));
                }
                return Err(NodeError::Unavailable(format!(
                    "no answer from a leader within {:?}: {last_err}",
                    self.request_timeout
                )));
            }
            match (leader, leader_addr) {
                (Some(l), _) if l == self.id => {
                    match tokio::time::timeout(remaining, self.handle_forward(req.clone())).await {
                        Ok(Ok(resp)) => return Ok((resp, true)),
                        Ok(Err(NodeError::NotLeader { .. })) => {
                            last_err = "leadership moved".into()
                        }
                        Ok(Err(NodeError::Unknown(e))) if retry_unknown => {
                            maybe_sent |= is_write;
                            last_err = e
                        }
                        Ok(Err(e)) => return Err(e),
                        Err(_) => {
                            return Err(NodeError::Unknown(format!(
                                "not committed within {:?}; it may still be applied",
                                self.request_timeout
                            )))
                        }
                    }
                }
                (Some(l), Some(addr)) => {
                    self.metrics.forwarded.fetch_add(1, Ordering::Relaxed);
                    match self.channels.forward(&addr, &req, remaining).await {
                        Ok(Ok(resp)) => return Ok((resp, false)),
                        Ok(Err(NodeError::NotLeader { .. })) => {
                            last_err = format!("node {l} is no longer leader")
                        }
                        Ok(Err(NodeError::Unknown(e))) if retry_unknown => {
                            maybe_sent |= is_write;
                            last_err = e
                        }
                        Ok(Err(e)) => return Err(e),
                        Err(e) => {
                            if !retry_unknown && Instant::now() >= deadline {
                                return Err(NodeError::Unknown(e.to_string()));
                            }
                            maybe_sent |= is_write;
                            last_err = e.to_string();
                        }
                    }
                }
                _ => {}
            }
            // Wait for a leader change, a short pause, or the deadline.
            let pause = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(20));
            let _ = tokio::time::timeout(pause, rx.changed()).await;
        }
    }

    /// [`RaftNode::handle_forward`] for a request forwarded by another node. Its writes
    /// are urgent: the forwarding node answers its caller only once it applied the write
    /// itself, so the commit must reach it at once (`network::Urgency`).
    pub async fn handle_forward_from_peer(
        &self,
        req: ForwardRequest,
    ) -> Result<ForwardResponse, NodeError> {
        let _urgent = matches!(req, ForwardRequest::Propose(_)).then(|| self.urgency.begin());
        self.handle_forward(req).await
    }

    /// Handle a request as the leader (from this node or forwarded by another).
    pub async fn handle_forward(&self, req: ForwardRequest) -> Result<ForwardResponse, NodeError> {
        match req {
            ForwardRequest::Propose(proposals) => self.propose_local(proposals).await,
            ForwardRequest::ReadIndex => match self.raft.ensure_linearizable().await {
                Ok(log_id) => Ok(ForwardResponse::ReadIndex(log_id.map(|l| l.index))),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    Err(NodeError::NotLeader {
                        leader: f.leader_id,
                    })
                }
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
                    Err(NodeError::Unknown(format!("no quorum: {q}")))
                }
                Err(e) => Err(NodeError::Internal(e.to_string())),
            },
            ForwardRequest::AddLearner { id, node } => self.add_learner_local(id, node).await,
            ForwardRequest::ChangeMembership { change, force } => {
                self.change_membership_local(change, force).await
            }
            ForwardRequest::Replication => {
                let m = self.metrics_now();
                if m.current_leader != Some(self.id) {
                    return Err(NodeError::NotLeader {
                        leader: m.current_leader,
                    });
                }
                let matched = m
                    .replication
                    .as_ref()
                    .map(|r| r.iter().map(|(id, l)| (*id, l.map(|l| l.index))).collect())
                    .unwrap_or_default();
                Ok(ForwardResponse::Replication {
                    matched,
                    last_log_index: m.last_log_index,
                })
            }
        }
    }

    async fn propose_local(&self, proposals: Vec<Proposal>) -> Result<ForwardResponse, NodeError> {
        let started = Instant::now();
        // Every node checks credentials against its own copy of the identity store.
        let _urgent = proposals
            .iter()
            .any(|p| matches!(p.command, Command::Identity(_)))
            .then(|| self.urgency.begin());
        let mut waits = Vec::with_capacity(proposals.len());
        for proposal in proposals {
            let (tx, rx) = oneshot::channel();
            self.batcher
                .send(Pending { proposal, tx })
                .await
                .map_err(|_| NodeError::Internal("proposal batcher stopped".into()))?;
            waits.push(rx);
        }
        let mut index = 0;
        let mut results = Vec::with_capacity(waits.len());
        for rx in waits {
            let (i, r) = rx
                .await
                .map_err(|_| {
                    NodeError::Unknown(
                        "the proposal was dropped before its result was known".into(),
                    )
                })?
                .into_result()
                .await?;
            index = index.max(i);
            results.push(r);
        }
        self.metrics
            .proposal_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(ForwardResponse::Proposed { index, results })
    }

    async fn add_learner_local(
        &self,
        id: u64,
        node: NodeInfo,
    ) -> Result<ForwardResponse, NodeError> {
        let m = self.metrics_now();
        if m.current_leader != Some(self.id) {
            return Err(NodeError::NotLeader {
                leader: m.current_leader,
            });
        }
        let membership = m.membership_config.membership();
        if let Some(existing) = membership.get_node(&id) {
            if *existing == node {
                return Ok(ForwardResponse::Done);
            }
            return Err(NodeError::Refused(format!(
                "node {id} is already a member as {existing}; remove it first to change its addresses"
            )));
        }
        if let Some((other, _)) = membership
            .nodes()
            .find(|(_, n)| n.raft == node.raft || n.http == node.http)
        {
            return Err(NodeError::Refused(format!(
                "node {other} already uses one of these addresses ({node})"
            )));
        }
        match self.raft.add_learner(id, node, false).await {
            Ok(_) => Ok(ForwardResponse::Done),
            Err(e) => Err(map_write_error(e)),
        }
    }

    async fn change_membership_local(
        &self,
        change: MembershipChange,
        force: bool,
    ) -> Result<ForwardResponse, NodeError> {
        let m = self.metrics_now();
        if m.current_leader != Some(self.id) {
            return Err(NodeError::NotLeader {
                leader: m.current_leader,
            });
        }
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let nodes: BTreeMap<u64, NodeInfo> =
            membership.nodes().map(|(k, v)| (*k, v.clone())).collect();
        let id = match change {
            MembershipChange::Promote(id)
            | MembershipChange::Demote(id)
            | MembershipChange::Remove(id) => id,
        };
        if !nodes.contains_key(&id) {
            return Err(NodeError::NotFound(format!(
                "node {id} is not a member of this cluster"
            )));
        }
        let is_voter = voters.contains(&id);
        let (new_voters, request, retain) = match change {
            MembershipChange::Promote(_) if is_voter => return Ok(ForwardResponse::Done),
            MembershipChange::Promote(_) => {
                let mut v = voters.clone();
                v.insert(id);
                (v, ChangeMembers::AddVoterIds(BTreeSet::from([id])), true)
            }
            MembershipChange::Demote(_) if !is_voter => return Ok(ForwardResponse::Done),
            MembershipChange::Demote(_) => {
                let mut v = voters.clone();
                v.remove(&id);
                (v, ChangeMembers::RemoveVoters(BTreeSet::from([id])), true)
            }
            MembershipChange::Remove(_) if !is_voter => (
                voters.clone(),
                ChangeMembers::RemoveNodes(BTreeSet::from([id])),
                false,
            ),
            MembershipChange::Remove(_) => {
                let mut v = voters.clone();
                v.remove(&id);
                (v, ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
            }
        };
        if new_voters.is_empty() {
            return Err(NodeError::Refused(format!(
                "node {id} is the last voter; a cluster needs at least one"
            )));
        }
        if !force {
            if let Some((site, count)) = site_majority(&new_voters, &nodes) {
                return Err(NodeError::Refused(format!(
                    "after this change site '{site}' would hold {count} of {} voters, a majority: losing that \
                     site would stop the cluster. Add voters in other sites first, or pass --force",
                    new_voters.len()
                )));
            }
        }
        match self.raft.change_membership(request, retain).await {
            Ok(_) => Ok(ForwardResponse::Done),
            Err(e) => Err(map_write_error(e)),
        }
    }

    /// The cluster as this node sees it, with the leader's replication progress when the
    /// leader can be asked.
    pub async fn cluster_view(&self) -> ClusterView {
        let m = self.metrics_now();
        let is_leader = m.current_leader == Some(self.id);
        let quiet = self.elections.contact.quiet();
        // openraft keeps naming the last leader until another one wins, which pre-vote
        // delays for as long as no quorum can elect one; a follower cut off from it for
        // a lease says it knows none rather than name a leader that may be dead.
        let leader_id = m
            .current_leader
            .filter(|_| is_leader || quiet <= self.elections.timing.lease);
        let leader_contact_ms = (!is_leader).then_some(quiet.as_millis() as u64);
        let (matched, leader_last) = if leader_id.is_some() {
            let deadline = Instant::now() + Duration::from_millis(800);
            match self.route(ForwardRequest::Replication, deadline).await {
                Ok((
                    ForwardResponse::Replication {
                        matched,
                        last_log_index,
                    },
                    _,
                )) => (
                    matched.into_iter().collect::<BTreeMap<_, _>>(),
                    last_log_index,
                ),
                _ => (BTreeMap::new(), None),
            }
        } else {
            (BTreeMap::new(), None)
        };
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, info)| {
                let matched_index = matched.get(id).copied().flatten();
                let lag = match (leader_last, matched.get(id)) {
                    (Some(last), Some(mi)) => Some(last.saturating_sub(mi.unwrap_or(0))),
                    _ => None,
                };
                MemberView {
                    id: *id,
                    info: info.clone(),
                    voter: voters.contains(id),
                    leader: leader_id == Some(*id),
                    matched_index,
                    lag,
                }
            })
            .collect();
        ClusterView {
            node_id: self.id,
            leader_id,
            leader_contact_ms,
            term: m.current_term,
            state: format!("{:?}", m.state),
            last_log_index: m.last_log_index,
            commit_index: self.log_store.committed_index(),
            applied_index: m.last_applied.map(|l| l.index),
            members,
        }
    }

    /// Ready = a leader is known and this node applied up to the commit index it learned.
    /// Resolves when openraft's core has stopped (a storage failure such as a full disk
    /// is fatal to it): this node can no longer take part and should be restarted.
    pub async fn core_stopped(&self) {
        // The server metrics change only with the vote, role, leader or membership; the
        // full metrics change several times per write, and each change woke this waiter
        // (on the runtime's main thread) for nothing.
        let mut rx = self.raft.server_metrics();
        while rx.changed().await.is_ok() {}
    }

    /// Whether openraft's core has stopped.
    pub fn is_core_stopped(&self) -> bool {
        self.raft.metrics().has_changed().is_err()
    }

    pub fn readiness(&self) -> (bool, String) {
        if self.is_core_stopped() {
            return (
                false,
                "the raft core stopped after a fatal storage error; the node is exiting".into(),
            );
        }
        let m = self.metrics_now();
        if m.membership_config.membership().nodes().next().is_none() {
            return (
                false,
                "not initialized: run `drplane cluster init` or add this node".into(),
            );
        }
        let Some(leader) = m.current_leader else {
            return (false, "no leader is known".into());
        };
        if leader == self.id {
            // A leader restarted from disk believes in its old term until a quorum answers;
            // only a leader that heard from a quorum recently is ready.
            let fresh = m
                .millis_since_quorum_ack
                .is_some_and(|ms| ms <= self.election_timeout_max_ms);
            if !fresh {
                return (
                    false,
                    "leader without a recent quorum acknowledgment".into(),
                );
            }
        } else {
            // A follower keeps naming its last leader until another one wins, which
            // pre-vote delays for as long as no quorum can elect one.
            let quiet = self.elections.contact.quiet();
            if quiet > self.elections.timing.lease {
                return (
                    false,
                    format!(
                        "no contact with leader node {leader} for {} ms",
                        quiet.as_millis()
                    ),
                );
            }
        }
        let applied = m.last_applied.map(|l| l.index);
        let committed = self.log_store.committed_index();
        if committed.is_some() && applied < committed {
            return (
                false,
                format!("catching up: applied {applied:?} of committed {committed:?}"),
            );
        }
        (true, format!("leader is node {leader}"))
    }

    /// `drplane_*` metrics of this node in Prometheus text format.
    pub fn metrics_text(&self) -> String {
        let m = self.metrics_now();
        let mut out = String::new();
        gauge(
            &mut out,
            "drplane_raft_term",
            "Current Raft term.",
            m.current_term as f64,
        );
        gauge(
            &mut out,
            "drplane_raft_leader_id",
            "Id of the leader this node knows, -1 if none.",
            m.current_leader.map(|l| l as f64).unwrap_or(-1.0),
        );
        gauge(
            &mut out,
            "drplane_raft_is_leader",
            "1 if this node is the leader.",
            if m.state == ServerState::Leader {
                1.0
            } else {
                0.0
            },
        );
        gauge(
            &mut out,
            "drplane_raft_last_log_index",
            "Index of the last entry in this node's log.",
            m.last_log_index.unwrap_or(0) as f64,
        );
        gauge(
            &mut out,
            "drplane_raft_commit_index",
            "Highest log index this node knows committed.",
            self.log_store.committed_index().unwrap_or(0) as f64,
        );
        gauge(
            &mut out,
            "drplane_raft_applied_index",
            "Highest log index applied to this node's state machine.",
            m.last_applied.map(|l| l.index).unwrap_or(0) as f64,
        );
        counter(
            &mut out,
            "drplane_raft_leader_changes_total",
            "Leader changes observed by this node.",
            self.metrics.leader_changes.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "drplane_raft_forwarded_total",
            "Requests this node forwarded to the leader.",
            self.metrics.forwarded.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "drplane_raft_commit_only_held_total",
            "AppendEntries carrying only a new commit index that this leader answered itself \
             because the follower had acknowledged the rest (the next message carries it).",
            self.urgency.held_back.load(Ordering::Relaxed),
        );
        let (sent, used) = self.eager.as_ref().map_or((0, 0), |e| {
            (
                e.sent.load(Ordering::Relaxed),
                e.used.load(Ordering::Relaxed),
            )
        });
        counter(
            &mut out,
            "drplane_raft_eager_appends_total",
            "Appends whose entries this leader sent to caught-up followers before its own log \
             sync.",
            sent,
        );
        counter(
            &mut out,
            "drplane_raft_eager_answers_used_total",
            "Follower answers to eager appends that replaced a send of the replication stream.",
            used,
        );
        counter(
            &mut out,
            "drplane_raft_elections_started_total",
            "Elections this node started after a granted pre-vote.",
            self.elections.elections_started.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "drplane_raft_pre_votes_granted_total",
            "Pre-votes this node granted to another member.",
            self.elections.pre_votes_granted.load(Ordering::Relaxed),
        );
        self.metrics.proposal_seconds.render(
            &mut out,
            "drplane_raft_proposal_duration_seconds",
            "Time from a proposal reaching the leader to its applied result.",
        );
        self.metrics.log_sync_seconds.render(
            &mut out,
            "drplane_raft_log_sync_duration_seconds",
            "Duration of one synced Raft log append (write and WAL fsync).",
        );
        self.metrics.log_sync_batch.render(
            &mut out,
            "drplane_raft_log_sync_entries",
            "Log entries made durable by one Raft log sync.",
        );
        self.metrics.proposals_per_entry.render(
            &mut out,
            "drplane_raft_proposals_per_entry",
            "Client proposals carried by one Raft log entry.",
        );
        out
    }

    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}

/// The site holding a strict majority of `voters`, if any (only for two or more voters).
pub fn site_majority(
    voters: &BTreeSet<u64>,
    nodes: &BTreeMap<u64, NodeInfo>,
) -> Option<(String, usize)> {
    if voters.len() < 2 {
        return None;
    }
    let mut per_site: BTreeMap<&str, usize> = BTreeMap::new();
    for v in voters {
        let site = nodes.get(v).map(|n| n.site.as_str()).unwrap_or("");
        *per_site.entry(site).or_default() += 1;
    }
    per_site
        .into_iter()
        .find(|(_, c)| c * 2 > voters.len())
        .map(|(s, c)| (s.to_string(), c))
}

fn map_write_error(e: RaftError<u64, ClientWriteError<u64, NodeInfo>>) -> NodeError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => NodeError::NotLeader {
            leader: f.leader_id,
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            NodeError::Refused(c.to_string())
        }
        RaftError::Fatal(f) => NodeError::Internal(f.to_string()),
    }
}

/// Group proposals into log entries: at most [`MAX_INFLIGHT_ENTRIES`] entries are in flight;
/// whatever arrives meanwhile rides in the next entry.
async fn run_batcher(raft: Raft, mut rx: mpsc::Receiver<Pending>, metrics: Arc<Metrics>) {
    let permits = Arc::new(Semaphore::new(MAX_INFLIGHT_ENTRIES));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else { return };
        let mut pending = vec![first];
        while pending.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => pending.push(p),
                Err(_) => break,
            }
        }
        let (proposals, txs): (Vec<_>, Vec<_>) =
            pending.into_iter().map(|p| (p.proposal, p.tx)).unzip();
        metrics.proposals_per_entry.observe(proposals.len() as f64);
        let batch = ProposalBatch {
            time_ms: now_ms(),
            proposals,
        };
        match raft.client_write_ff(batch).await {
            Ok(resp_rx) if txs.len() == 1 => {
                if let Some(tx) = txs.into_iter().next() {
                    // A proposer that is gone no longer needs the answer.
                    let _ = tx.send(Settle::Alone(permit, resp_rx));
                }
            }
            Ok(resp_rx) => {
                tokio::spawn(async move {
                    let outcome = resp_rx.await;
                    drop(permit);
                    let n = txs.len();
                    for (tx, r) in txs.into_iter().zip(settle(outcome, n)) {
                        let _ = tx.send(Settle::Done(r));
                    }
                });
            }
            Err(fatal) => {
                for tx in txs {
                    let _ = tx.send(Settle::Done(Err(NodeError::Internal(fatal.to_string()))));
                }
                return;
            }
        }
    }
}

async fn watch_leader(raft: Raft, metrics: Arc<Metrics>) {
    // Server metrics: they change with the leader, not with every write.
    let mut rx = raft.server_metrics();
    let mut leader = rx.borrow().current_leader;
    while rx.changed().await.is_ok() {
        let (now, term) = {
            let m = rx.borrow();
            (m.current_leader, m.vote.leader_id.term)
        };
        if now != leader {
            metrics.leader_changes.fetch_add(1, Ordering::Relaxed);
            tracing::info!(old = ?leader, new = ?now, term, "leader changed");
            leader = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(sites: &[(u64, &str)]) -> BTreeMap<u64, NodeInfo> {
        sites
            .iter()
            .map(|(id, s)| {
                (
                    *id,
                    NodeInfo {
                        site: s.to_string(),
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    #[test]
    fn site_majority_rule() {
        let n = nodes(&[(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "a")]);
        assert_eq!(
            site_majority(&BTreeSet::from([1]), &n),
            None,
            "one voter is exempt"
        );
        assert_eq!(site_majority(&BTreeSet::from([1, 2, 3]), &n), None);
        assert_eq!(
            site_majority(&BTreeSet::from([1, 2, 3, 4]), &n),
            None,
            "2 of 4 is no majority"
        );
        assert_eq!(
            site_majority(&BTreeSet::from([1, 4, 3]), &n),
            Some(("a".into(), 2))
        );
        assert_eq!(
            site_majority(&BTreeSet::from([1, 4]), &n),
            Some(("a".into(), 2))
        );
    }
}
