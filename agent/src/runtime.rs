//! The agent's runtime: find the leader, hold one control session with it, run the tasks it
//! assigns through the [`Driver`], and report their progress and results.
//!
//! ```text
//!  run ──► Discovery::members() (raft addresses, leader first)
//!   └─► session(addr): Connect ─► Hello ─► Welcome ─┬─ every second: Heartbeat{pools}
//!        │                                          ├─ Assign ─► on_assign (idempotent by task id)
//!        │                                          ├─ Cancel ─► stop the task
//!        │                                          └─ Redirect / end / error ─► back to run
//!        └─ Redirect{leader} before Welcome: connect there next
//!       reconnect with exponential backoff (jittered) through leader changes
//! ```
//!
//! Tasks are kept by id: an `Assign` for a task this agent already runs adopts the newer
//! fencing token, one for a finished task re-reports the result (a success under the newer
//! token; a failed attempt runs again). Results that could not be sent (no session) wait
//! in a small queue and go out on the next session; the leader also re-sends `Assign` for
//! every task it believes this host holds when a session starts, which makes the agent
//! re-report whatever was lost with a dead leader.
//!
//! Every attempt that ends is appended to `<state_dir>/completions.jsonl` (one JSON object
//! per line: task, job, kind, token, outcome, start and end times), before its result is
//! sent: an audit trail of what this agent executed, which tests use to check that no task
//! ran to completion twice.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use drplane_statemachine::inventory::{Capacity, Driver as HostDriver, StoragePool, Workload};
use drplane_statemachine::jobs::{
    FencingToken, Progress, TaskKind, TaskOutcome, VolumeLayout, WorkloadAction,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::control::pb::agent_control_client::AgentControlClient;
use crate::control::pb::AgentFrame;
use crate::control::{
    AgentMessage, Assignment, ControlMessage, Hello, HostInfo, ProtocolError, MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
};
use crate::driver::{
    Driver, DriverError, MigrateRequest, ProgressFn, SyncProgress, SyncRequest, SyncSource,
    VolumeKind, VolumeSpec, WriteOp,
};
use crate::sim::SplitMix64;

/// Frames queued towards the leader before a session counts as congested.
const OUTBOUND_QUEUE: usize = 4096;
/// Results kept for the next session when none is open.
const UNDELIVERED_MAX: usize = 10_000;
/// Rounds over the known members between two discoveries.
const REDISCOVER_ROUNDS: u32 = 3;
/// How often the pools' free bytes are read from the driver.
const POOLS_REFRESH: Duration = Duration::from_secs(10);

/// How the agent runs. [`RuntimeConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub host: String,
    pub site: String,
    pub vcpus: u32,
    pub ram_mb: u64,
    /// The agent's own files (`completions.jsonl`).
    pub state_dir: PathBuf,
    /// Where other agents reach this one's data service (the driver's sync endpoint).
    pub data_address: String,
    /// Workloads reported in `Hello`.
    pub workloads: Vec<Workload>,
    pub heartbeat_every: Duration,
    /// Opening a connection and getting the first answer.
    pub connect_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// At most one progress report per task in this interval.
    pub progress_every: Duration,
    /// Finished tasks remembered (to answer a re-sent `Assign` without running again).
    pub finished_kept: usize,
    /// Mutual TLS towards the nodes' gRPC port (`https://`), when the cluster uses it.
    pub tls: Option<crate::tls::AgentTls>,
}

impl RuntimeConfig {
    pub fn new(host: impl Into<String>, site: impl Into<String>, state_dir: PathBuf) -> Self {
        RuntimeConfig {
            host: host.into(),
            site: site.into(),
            vcpus: 1,
            ram_mb: 1024,
            state_dir,
            data_address: String::new(),
            workloads: Vec::new(),
            heartbeat_every: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(3),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            progress_every: Duration::from_secs(1),
            finished_kept: 10_000,
            tls: None,
        }
    }
}

/// Errors of the runtime; `run` itself only fails to start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot find the cluster's members: {0}")]
    Discovery(String),
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Driver(#[from] DriverError),
}

/// Where the cluster's members are.
#[async_trait]
pub trait Discovery: Send + Sync {
    /// Raft (gRPC) addresses, `host:port`, of the cluster's members; the leader's first
    /// when it is known.
    async fn members(&self) -> Result<Vec<String>, RuntimeError>;
}

/// A fixed list of raft addresses.
pub struct StaticDiscovery(pub Vec<String>);

#[async_trait]
impl Discovery for StaticDiscovery {
    async fn members(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(self.0.clone())
    }
}

/// One line of `completions.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletionRecord {
    pub task_id: String,
    pub job_id: String,
    pub kind: String,
    pub host: String,
    pub term: u64,
    pub attempt: u32,
    /// `succeeded` or `failed`.
    pub outcome: String,
    pub reason: Option<String>,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
}

enum EntryState {
    Running {
        cancel: CancellationToken,
        /// Tells this execution apart from a later one of the same task.
        run: u64,
        progress: Progress,
    },
    Finished {
        outcome: TaskOutcome,
    },
}

struct TaskEntry {
    job_id: String,
    /// The newest token this agent was given for the task.
    token: FencingToken,
    state: EntryState,
}

#[derive(Default)]
struct State {
    tasks: HashMap<String, TaskEntry>,
    /// Finished task ids, oldest first (for forgetting them).
    finished: VecDeque<String>,
    /// The open session's outbound queue.
    outbound: Option<(u64, mpsc::Sender<AgentFrame>)>,
    /// Results produced while no session could take them.
    undelivered: VecDeque<AgentMessage>,
    pools: Vec<StoragePool>,
    next_session: u64,
    next_run: u64,
}

/// One agent: its driver, its tasks and its connection to the leader.
pub struct Agent {
    cfg: RuntimeConfig,
    driver: Arc<dyn Driver>,
    discovery: Arc<dyn Discovery>,
    state: Mutex<State>,
    completions: PathBuf,
    log_lock: Mutex<()>,
}

/// How a session ended.
#[derive(Debug)]
enum SessionEnd {
    /// Before or after Welcome, the node pointed elsewhere (or nowhere yet).
    Redirect(Option<String>),
    /// A welcomed session ended.
    Ended { reason: String },
    /// No session could be opened.
    Failed { reason: String },
    /// The node refused this agent (bad registration): retrying soon will not help.
    Refused { reason: String },
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Agent {
    /// An agent over `driver`, finding the cluster through `discovery`. Creates
    /// `cfg.state_dir`.
    pub fn new(
        cfg: RuntimeConfig,
        driver: Arc<dyn Driver>,
        discovery: Arc<dyn Discovery>,
    ) -> Result<Arc<Agent>, RuntimeError> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(|e| RuntimeError::Io {
            context: format!("creating {}", cfg.state_dir.display()),
            source: e,
        })?;
        let completions = cfg.state_dir.join("completions.jsonl");
        Ok(Arc::new(Agent {
            cfg,
            driver,
            discovery,
            state: Mutex::new(State::default()),
            completions,
            log_lock: Mutex::new(()),
        }))
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.cfg
    }

    /// The file every ended attempt is appended to.
    pub fn completions_path(&self) -> &Path {
        &self.completions
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave `State` half-updated in a way that
        // matters more than stopping the agent would; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn host_driver(&self) -> HostDriver {
        match self.driver.name() {
            "fs" => HostDriver::Fs,
            "sim" => HostDriver::Sim,
            _ => HostDriver::None,
        }
    }

    async fn refresh_pools(&self) {
        match self.driver.inventory().await {
            Ok(inv) => {
                let pools = inv
                    .pools
                    .into_iter()
                    .map(|p| StoragePool {
                        name: p.name,
                        total_bytes: p.capacity_bytes,
                        free_bytes: p.free_bytes,
                    })
                    .collect();
                self.lock().pools = pools;
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the driver's inventory"),
        }
    }

    fn hello(&self) -> AgentMessage {
        let pools = self.lock().pools.clone();
        AgentMessage::Hello(Box::new(Hello {
            protocol: PROTOCOL_VERSION,
            host: HostInfo {
                name: self.cfg.host.clone(),
                site: self.cfg.site.clone(),
                driver: self.host_driver(),
                capacity: Capacity {
                    vcpus: self.cfg.vcpus,
                    ram_mb: self.cfg.ram_mb,
                    pools,
                },
                data_address: self.cfg.data_address.clone(),
            },
            workloads: self.cfg.workloads.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    /// Runs until `shutdown` is cancelled: connects to the leader, follows it through
    /// leader changes, runs its tasks. Tasks still running at shutdown are abandoned (their
    /// leases expire and the leader reassigns them).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), RuntimeError> {
        self.refresh_pools().await;
        let pools_task = {
            let me = self.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(POOLS_REFRESH);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => me.refresh_pools().await,
                    }
                }
            })
        };
        let mut rng = SplitMix64::new(now_ms() ^ u64::from(std::process::id()));
        let mut members: Vec<String> = Vec::new();
        let mut next: VecDeque<String> = VecDeque::new();
        let mut backoff = self.cfg.backoff_min;
        let mut redirects = 0u32;
        let mut rounds = 0u32;
        while !shutdown.is_cancelled() {
            if next.is_empty() {
                // Ask the cluster again every few rounds; in between, the members already
                // known answer with a Redirect to the leader.
                if members.is_empty() || rounds >= REDISCOVER_ROUNDS {
                    rounds = 0;
                    match self.discovery.members().await {
                        Ok(m) if !m.is_empty() => members = m,
                        Ok(_) => tracing::warn!("the cluster lists no members"),
                        Err(e) => tracing::warn!(error = %e, "cannot discover the cluster"),
                    }
                }
                rounds += 1;
                next.extend(members.iter().cloned());
                if next.is_empty() {
                    self.pause(&mut backoff, &mut rng, &shutdown).await;
                    continue;
                }
            }
            let Some(addr) = next.pop_front() else {
                continue;
            };
            let started = Instant::now();
            let end = tokio::select! {
                end = self.session(&addr) => end,
                _ = shutdown.cancelled() => break,
            };
            match end {
                SessionEnd::Redirect(Some(leader)) => {
                    tracing::info!(from = %addr, to = %leader, "redirected to the leader");
                    redirects += 1;
                    next.clear();
                    next.push_back(leader);
                    if redirects > 3 {
                        // Nodes disagree about the leader (an election is settling).
                        redirects = 0;
                        self.pause(&mut backoff, &mut rng, &shutdown).await;
                    }
                }
                SessionEnd::Redirect(None) => {
                    tracing::info!(from = %addr, "no leader known yet; waiting for the election");
                    next.clear();
                    self.pause(&mut backoff, &mut rng, &shutdown).await;
                }
                SessionEnd::Ended { reason } => {
                    tracing::warn!(leader = %addr, reason = %reason, "control session ended");
                    redirects = 0;
                    if started.elapsed() > Duration::from_secs(10) {
                        backoff = self.cfg.backoff_min;
                    }
                    // The others first: a leader that stopped answering (paused, cut off)
                    // would hold a connection attempt until its timeout, while a live
                    // follower redirects at once. The same node last.
                    next.clear();
                    next.extend(members.iter().filter(|m| **m != addr).cloned());
                    next.push_back(addr.clone());
                    self.pause(&mut backoff, &mut rng, &shutdown).await;
                }
                SessionEnd::Failed { reason } => {
                    tracing::debug!(node = %addr, reason = %reason, "no session");
                    if next.is_empty() {
                        tracing::warn!(reason = %reason, "no cluster member accepted a session; retrying");
                        self.pause(&mut backoff, &mut rng, &shutdown).await;
                    }
                }
                SessionEnd::Refused { reason } => {
                    tracing::error!(node = %addr, reason = %reason, "the cluster refused this agent");
                    next.clear();
                    backoff = self.cfg.backoff_max;
                    self.pause(&mut backoff, &mut rng, &shutdown).await;
                }
            }
        }
        pools_task.abort();
        let running: Vec<CancellationToken> = self
            .lock()
            .tasks
            .values()
            .filter_map(|e| match &e.state {
                EntryState::Running { cancel, .. } => Some(cancel.clone()),
                EntryState::Finished { .. } => None,
            })
            .collect();
        for c in running {
            c.cancel();
        }
        Ok(())
    }

    /// Sleeps `backoff` with ±25% jitter, then doubles it (up to the maximum).
    async fn pause(
        &self,
        backoff: &mut Duration,
        rng: &mut SplitMix64,
        shutdown: &CancellationToken,
    ) {
        let jitter = 0.75 + rng.next_f64() * 0.5;
        let wait = backoff.mul_f64(jitter);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => {}
        }
        *backoff = (*backoff * 2).min(self.cfg.backoff_max);
    }

    async fn session(self: &Arc<Self>, addr: &str) -> SessionEnd {
        let failed = |reason: String| SessionEnd::Failed { reason };
        let scheme = if self.cfg.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let mut endpoint =
            match tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}")) {
                Ok(e) => e,
                Err(e) => return failed(format!("bad address {addr}: {e}")),
            };
        if let Some(tls) = &self.cfg.tls {
            endpoint = match endpoint.tls_config(tls.client()) {
                Ok(e) => e,
                Err(e) => return failed(format!("TLS for {addr}: {e}")),
            };
        }
        let endpoint = endpoint
            .connect_timeout(self.cfg.connect_timeout)
            .tcp_nodelay(true)
            // A leader that stops answering (paused, partitioned) is left within ~4 s.
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true);
        let channel = match tokio::time::timeout(self.cfg.connect_timeout, endpoint.connect()).await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return failed(format!("connect: {e}")),
            Err(_) => return failed("connect: timed out".into()),
        };
        let mut client = AgentControlClient::new(channel)
            .max_decoding_message_size(MAX_FRAME_BYTES)
            .max_encoding_message_size(MAX_FRAME_BYTES);
        let (tx, rx) = mpsc::channel::<AgentFrame>(OUTBOUND_QUEUE);
        match self.hello().to_frame() {
            Ok(f) => {
                if tx.send(f).await.is_err() {
                    return failed("outbound queue closed".into());
                }
            }
            Err(e) => {
                return SessionEnd::Refused {
                    reason: e.to_string(),
                }
            }
        }
        let opened = tokio::time::timeout(
            self.cfg.connect_timeout,
            client.connect(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await;
        let mut inbound = match opened {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => return status_end(status, false),
            Err(_) => return failed("no answer to Connect".into()),
        };
        let first = match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None)) => return failed("the node closed the stream before welcoming".into()),
            Ok(Err(status)) => return status_end(status, false),
            Err(_) => return failed("no Welcome within 10 s".into()),
        };
        match ControlMessage::from_frame(&first) {
            Ok(ControlMessage::Welcome {
                leader_id,
                term,
                warnings,
            }) => {
                tracing::info!(leader = %addr, leader_id, term, "connected to the leader");
                for w in warnings {
                    tracing::warn!(warning = %w, "the leader could not record part of this agent's inventory");
                }
            }
            Ok(ControlMessage::Redirect { leader, .. }) => return SessionEnd::Redirect(leader),
            Ok(other) => {
                return failed(format!(
                    "protocol violation: {} before Welcome",
                    other.kind()
                ))
            }
            Err(e) => return failed(e.to_string()),
        }

        let session = {
            let mut st = self.lock();
            st.next_session += 1;
            let id = st.next_session;
            st.outbound = Some((id, tx.clone()));
            id
        };
        let mut heartbeat = tokio::time::interval(self.cfg.heartbeat_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let end = loop {
            tokio::select! {
                _ = heartbeat.tick() => {
                    if let Err(reason) = self.flush_and_heartbeat(&tx).await {
                        break SessionEnd::Ended { reason };
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(frame)) => match ControlMessage::from_frame(&frame) {
                        Ok(ControlMessage::Assign(a)) => self.on_assign(*a),
                        Ok(ControlMessage::Cancel { task_id }) => self.on_cancel(&task_id),
                        Ok(ControlMessage::Redirect { leader, .. }) => break SessionEnd::Redirect(leader),
                        Ok(ControlMessage::Welcome { .. }) => {}
                        Err(e) => break SessionEnd::Ended { reason: e.to_string() },
                    },
                    Ok(None) => break SessionEnd::Ended { reason: "the leader closed the stream".into() },
                    Err(status) => break status_end(status, true),
                },
            }
        };
        let mut st = self.lock();
        if st.outbound.as_ref().is_some_and(|(id, _)| *id == session) {
            st.outbound = None;
        }
        end
    }

    /// Sends what waits in the undelivered queue, then one heartbeat.
    async fn flush_and_heartbeat(&self, tx: &mpsc::Sender<AgentFrame>) -> Result<(), String> {
        loop {
            let Some(msg) = self.lock().undelivered.pop_front() else {
                break;
            };
            let frame = match msg.to_frame() {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(error = %e, "dropping a report that cannot be encoded");
                    continue;
                }
            };
            if tx.send(frame).await.is_err() {
                self.lock().undelivered.push_front(msg);
                return Err("outbound queue closed".into());
            }
        }
        let pools = self.lock().pools.clone();
        let frame = AgentMessage::Heartbeat { pools }
            .to_frame()
            .map_err(|e| e.to_string())?;
        tx.send(frame)
            .await
            .map_err(|_| "outbound queue closed".to_string())
    }

    /// Queues a report on the open session; a result that cannot go now waits for the
    /// next session (progress is dropped: the next one supersedes it).
    fn send(&self, msg: AgentMessage) {
        let mut st = self.lock();
        let keep = matches!(msg, AgentMessage::Result { .. });
        let sent = match &st.outbound {
            Some((_, tx)) => match msg.to_frame() {
                Ok(frame) => tx.try_send(frame).is_ok(),
                Err(e) => {
                    tracing::error!(error = %e, "dropping a report that cannot be encoded");
                    return;
                }
            },
            None => false,
        };
        if !sent && keep {
            if st.undelivered.len() >= UNDELIVERED_MAX {
                st.undelivered.pop_front();
            }
            st.undelivered.push_back(msg);
        }
    }

    fn on_assign(self: &Arc<Self>, a: Assignment) {
        let span = tracing::info_span!(
            "task",
            task = %a.task_id,
            job = %a.job_id,
            host = %self.cfg.host,
            kind = a.kind.name(),
            term = a.token.term,
            attempt = a.token.attempt,
        );
        let _g = span.enter();
        let mut st = self.lock();
        let resend = match st.tasks.get_mut(&a.task_id) {
            None => None,
            Some(e) if a.token < e.token => {
                tracing::debug!(current = %e.token, "ignoring an assignment older than the one held");
                return;
            }
            Some(e) => match &e.state {
                EntryState::Running { progress, .. } => {
                    if a.token > e.token {
                        tracing::info!(old = %e.token, "task already running here: adopting the newer token");
                        e.token = a.token;
                    }
                    Some(AgentMessage::Progress {
                        task_id: a.task_id.clone(),
                        token: e.token,
                        progress: *progress,
                    })
                }
                EntryState::Finished { outcome } => {
                    let rerun = a.token > e.token && matches!(outcome, TaskOutcome::Failed { .. });
                    if rerun {
                        None
                    } else {
                        if a.token > e.token {
                            tracing::info!(old = %e.token, "task already done here: reporting it under the newer token");
                            e.token = a.token;
                        } else {
                            tracing::info!("re-reporting a finished task");
                        }
                        Some(AgentMessage::Result {
                            task_id: a.task_id.clone(),
                            token: e.token,
                            outcome: outcome.clone(),
                        })
                    }
                }
            },
        };
        if let Some(msg) = resend {
            drop(st);
            self.send(msg);
            return;
        }
        // A new task, or a failed one to run again.
        st.finished.retain(|id| id != &a.task_id);
        st.next_run += 1;
        let run = st.next_run;
        let cancel = CancellationToken::new();
        st.tasks.insert(
            a.task_id.clone(),
            TaskEntry {
                job_id: a.job_id.clone(),
                token: a.token,
                state: EntryState::Running {
                    cancel: cancel.clone(),
                    run,
                    progress: Progress::default(),
                },
            },
        );
        drop(st);
        tracing::info!("task assigned; starting");
        let me = self.clone();
        tokio::spawn(me.execute(a, run, cancel).instrument(span.clone()));
    }

    fn on_cancel(&self, task_id: &str) {
        let mut st = self.lock();
        let running = matches!(
            st.tasks.get(task_id).map(|e| &e.state),
            Some(EntryState::Running { .. })
        );
        if running {
            if let Some(TaskEntry {
                state: EntryState::Running { cancel, .. },
                job_id,
                ..
            }) = st.tasks.remove(task_id)
            {
                cancel.cancel();
                tracing::info!(task = %task_id, job = %job_id, host = %self.cfg.host, "task cancelled by the leader");
            }
        }
    }

    /// The token the task's reports must carry now (it may have been adopted).
    fn current_token(&self, task_id: &str, run: u64) -> Option<FencingToken> {
        let st = self.lock();
        match st.tasks.get(task_id) {
            Some(e) => match &e.state {
                EntryState::Running { run: r, .. } if *r == run => Some(e.token),
                _ => None,
            },
            None => None,
        }
    }

    fn report_progress(&self, task_id: &str, run: u64, progress: Progress) {
        let token = {
            let mut st = self.lock();
            match st.tasks.get_mut(task_id) {
                Some(TaskEntry {
                    token,
                    state:
                        EntryState::Running {
                            run: r,
                            progress: p,
                            ..
                        },
                    ..
                }) if *r == run => {
                    *p = progress;
                    *token
                }
                _ => return,
            }
        };
        self.send(AgentMessage::Progress {
            task_id: task_id.to_string(),
            token,
            progress,
        });
    }

    async fn execute(self: Arc<Self>, a: Assignment, run: u64, cancel: CancellationToken) {
        let started_at_ms = now_ms();
        self.report_progress(&a.task_id, run, Progress::default());
        let outcome = tokio::select! {
            o = self.run_kind(&a, run) => o,
            _ = cancel.cancelled() => {
                tracing::info!("task stopped");
                return;
            }
        };
        // Record the end unless the task was cancelled or replaced meanwhile.
        let token = {
            let mut st = self.lock();
            let Some(entry) = st.tasks.get_mut(&a.task_id) else {
                return;
            };
            match &entry.state {
                EntryState::Running { run: r, .. } if *r == run => {}
                _ => return,
            }
            entry.state = EntryState::Finished {
                outcome: outcome.clone(),
            };
            let token = entry.token;
            st.finished.push_back(a.task_id.clone());
            while st.finished.len() > self.cfg.finished_kept {
                if let Some(old) = st.finished.pop_front() {
                    st.tasks.remove(&old);
                }
            }
            token
        };
        let (label, reason) = match &outcome {
            TaskOutcome::Succeeded { .. } => ("succeeded", None),
            TaskOutcome::Failed { reason, .. } => ("failed", Some(reason.clone())),
        };
        match &reason {
            None => tracing::info!(token = %token, "task succeeded"),
            Some(r) => tracing::warn!(token = %token, reason = %r, "task failed"),
        }
        self.record(&CompletionRecord {
            task_id: a.task_id.clone(),
            job_id: a.job_id.clone(),
            kind: a.kind.name().to_string(),
            host: self.cfg.host.clone(),
            term: token.term,
            attempt: token.attempt,
            outcome: label.to_string(),
            reason,
            started_at_ms,
            finished_at_ms: now_ms(),
        });
        self.send(AgentMessage::Result {
            task_id: a.task_id,
            token,
            outcome,
        });
    }

    fn record(&self, rec: &CompletionRecord) {
        let line = match serde_json::to_string(rec) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a completion record");
                return;
            }
        };
        let _g = self.log_lock.lock().unwrap_or_else(|p| p.into_inner());
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.completions)
            .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
        if let Err(e) = written {
            tracing::warn!(error = %e, path = %self.completions.display(), "cannot append a completion record");
        }
    }

    async fn run_kind(self: &Arc<Self>, a: &Assignment, run: u64) -> TaskOutcome {
        match self.run_kind_inner(a, run).await {
            Ok(output) => TaskOutcome::Succeeded { output },
            Err(TaskFailure { reason, retryable }) => TaskOutcome::Failed { reason, retryable },
        }
    }

    async fn run_kind_inner(
        self: &Arc<Self>,
        a: &Assignment,
        run: u64,
    ) -> Result<BTreeMap<String, String>, TaskFailure> {
        let mut output = BTreeMap::new();
        match &a.kind {
            TaskKind::Sleep {
                duration_ms,
                fail_attempts,
            } => {
                let total = Duration::from_millis(*duration_ms);
                let start = Instant::now();
                loop {
                    let left = total.saturating_sub(start.elapsed());
                    if left.is_zero() {
                        break;
                    }
                    tokio::time::sleep(left.min(self.cfg.progress_every)).await;
                    let done = start.elapsed().min(total);
                    if done < total {
                        let percent = (done.as_millis() * 100 / total.as_millis().max(1)) as u8;
                        self.report_progress(
                            &a.task_id,
                            run,
                            Progress {
                                percent: percent.min(99),
                                bytes_done: 0,
                                bytes_total: 0,
                            },
                        );
                    }
                }
                let attempt = self
                    .current_token(&a.task_id, run)
                    .unwrap_or(a.token)
                    .attempt;
                if attempt <= *fail_attempts {
                    return Err(TaskFailure {
                        reason: format!(
                            "injected failure: this sleep task fails its first {fail_attempts} attempt(s) and this was attempt {attempt}"
                        ),
                        retryable: true,
                    });
                }
                output.insert("slept_ms".into(), duration_ms.to_string());
                output.insert("host".into(), self.cfg.host.clone());
            }
            TaskKind::CreateTarget {
                pair_id, target, ..
            } => {
                self.check_host(&target.host)?;
                let spec = VolumeSpec {
                    id: target.volume_id.clone(),
                    kind: match target.layout {
                        VolumeLayout::Block => VolumeKind::Disk,
                        VolumeLayout::Tree => VolumeKind::Share,
                    },
                    pool: target.pool.clone(),
                    size_bytes: target.size_bytes,
                    reserve: false,
                    read_only: true,
                };
                let info = self.driver.create_volume(&spec).await?;
                output.insert("pair_id".into(), pair_id.clone());
                output.insert("volume_id".into(), info.id);
                output.insert("pool".into(), info.pool);
                output.insert("size_bytes".into(), info.size_bytes.to_string());
                output.insert("fenced".into(), info.fenced.to_string());
            }
            TaskKind::Promote { pair_id, volume } => {
                self.check_host(&volume.host)?;
                self.driver.promote(&volume.volume_id).await?;
                output.insert("pair_id".into(), pair_id.clone());
                output.insert("volume_id".into(), volume.volume_id.clone());
            }
            TaskKind::Fence { pair_id, volume } => {
                self.check_host(&volume.host)?;
                self.driver.fence(&volume.volume_id).await?;
                output.insert("pair_id".into(), pair_id.clone());
                output.insert("volume_id".into(), volume.volume_id.clone());
            }
            TaskKind::DeleteVolume { pair_id, volume } => {
                self.check_host(&volume.host)?;
                self.driver.delete_volume(&volume.volume_id).await?;
                output.insert("pair_id".into(), pair_id.clone());
                output.insert("volume_id".into(), volume.volume_id.clone());
            }
            TaskKind::Sync {
                pair_id,
                source,
                target,
                bwlimit_bytes_per_sec,
                full: _,
            } => {
                // The driver compares block hashes, so a full and an incremental sync differ
                // only in how much is found equal.
                self.check_host(&target.host)?;
                let endpoint = self.peer(a, &source.host)?;
                let mut req = SyncRequest::new(endpoint, &source.volume_id, &target.volume_id);
                req.bwlimit = *bwlimit_bytes_per_sec;
                req.task_id = Some(a.task_id.clone());
                let stats = self
                    .driver
                    .sync_from(
                        &req,
                        Some(self.progress_fn(a, run)),
                        CancellationToken::new(),
                    )
                    .await?;
                output.insert("pair_id".into(), pair_id.clone());
                output.insert("bytes_total".into(), stats.bytes_total.to_string());
                output.insert("bytes_sent".into(), stats.bytes_sent.to_string());
                output.insert("data_bytes".into(), stats.data_bytes.to_string());
                output.insert("blocks_sent".into(), stats.blocks_sent.to_string());
                output.insert("blocks_total".into(), stats.blocks_total.to_string());
                output.insert("digest".into(), stats.digest.to_string());
            }
            TaskKind::Migrate {
                server_id,
                source_host,
                target_host,
                disks,
            } => {
                self.check_host(target_host)?;
                let endpoint = self.peer(a, source_host)?;
                let mut sent = 0u64;
                for d in disks {
                    let req = MigrateRequest {
                        source: SyncSource {
                            endpoint: endpoint.clone(),
                            volume: d.source.volume_id.clone(),
                        },
                        target: VolumeSpec {
                            id: d.target.volume_id.clone(),
                            kind: match d.target.layout {
                                VolumeLayout::Block => VolumeKind::Disk,
                                VolumeLayout::Tree => VolumeKind::Share,
                            },
                            pool: d.target.pool.clone(),
                            size_bytes: d.target.size_bytes,
                            reserve: false,
                            read_only: true,
                        },
                        bwlimit: None,
                        task_id: Some(a.task_id.clone()),
                    };
                    let stats = self
                        .driver
                        .migrate(
                            &req,
                            Some(self.progress_fn(a, run)),
                            CancellationToken::new(),
                        )
                        .await?;
                    sent = sent.saturating_add(stats.bytes_sent);
                }
                output.insert("server_id".into(), server_id.clone());
                output.insert("disks".into(), disks.len().to_string());
                output.insert("bytes_sent".into(), sent.to_string());
            }
            TaskKind::Workload {
                host,
                workload_kind,
                workload_id,
                action,
            } => {
                self.check_host(host)?;
                match action {
                    WorkloadAction::Start | WorkloadAction::Stop | WorkloadAction::Restart => {
                        // Neither driver runs guests: the action is recorded, and the
                        // workload's status lives in the replicated inventory.
                    }
                    WorkloadAction::CreateVolume { volume } => {
                        let spec = VolumeSpec {
                            id: volume.volume_id.clone(),
                            kind: match (volume.layout, workload_kind.as_str()) {
                                (VolumeLayout::Tree, _) => VolumeKind::Share,
                                (VolumeLayout::Block, "database") => VolumeKind::Database,
                                (VolumeLayout::Block, _) => VolumeKind::Disk,
                            },
                            pool: volume.pool.clone(),
                            size_bytes: volume.size_bytes,
                            reserve: false,
                            read_only: false,
                        };
                        let info = self.driver.create_volume(&spec).await?;
                        output.insert("volume_id".into(), info.id);
                        output.insert("size_bytes".into(), info.size_bytes.to_string());
                    }
                    WorkloadAction::ResizeVolume { volume, size_bytes } => {
                        let info = self.driver.volume(&volume.volume_id).await?;
                        if info.kind.is_file() && *size_bytes > info.size_bytes && !info.fenced {
                            // Growing an image: a zero byte at the new end (a replica grows
                            // with its next sync).
                            self.driver
                                .write(
                                    &volume.volume_id,
                                    WriteOp::At {
                                        offset: size_bytes - 1,
                                        data: &[0],
                                    },
                                )
                                .await?;
                        }
                        output.insert("size_bytes".into(), size_bytes.to_string());
                    }
                    WorkloadAction::DeleteVolume { volume } => {
                        self.driver.delete_volume(&volume.volume_id).await?;
                    }
                }
                output.insert("workload_id".into(), workload_id.clone());
                output.insert("action".into(), action.name().to_string());
            }
        }
        Ok(output)
    }

    /// The data address of `host`'s agent, as the leader sent it with the assignment.
    fn peer(&self, a: &Assignment, host: &str) -> Result<String, TaskFailure> {
        match a.peers.get(host) {
            Some(addr) if !addr.is_empty() => Ok(addr.clone()),
            _ => Err(TaskFailure {
                reason: format!(
                    "the address of host '{host}''s agent is unknown (is its agent running?)"
                ),
                retryable: true,
            }),
        }
    }

    /// Progress of a sync or migration, reported as the task's progress.
    fn progress_fn(self: &Arc<Self>, a: &Assignment, run: u64) -> ProgressFn {
        let me = Arc::clone(self);
        let task_id = a.task_id.clone();
        Arc::new(move |p: SyncProgress| {
            let percent = (p.bytes_done.saturating_mul(100) / p.bytes_total.max(1)).min(99) as u8;
            me.report_progress(
                &task_id,
                run,
                Progress {
                    percent,
                    bytes_done: p.bytes_done,
                    bytes_total: p.bytes_total,
                },
            );
        })
    }

    fn check_host(&self, host: &str) -> Result<(), TaskFailure> {
        if host != self.cfg.host {
            return Err(TaskFailure {
                reason: format!(
                    "the task's volume is on host '{host}', but it was given to agent '{}'",
                    self.cfg.host
                ),
                retryable: false,
            });
        }
        Ok(())
    }
}

/// Why an attempt failed.
struct TaskFailure {
    reason: String,
    retryable: bool,
}

impl From<DriverError> for TaskFailure {
    fn from(e: DriverError) -> Self {
        TaskFailure {
            retryable: e.is_retryable(),
            reason: e.to_string(),
        }
    }
}

/// A refusal that retrying soon will not fix ends as `Refused`; anything else as a failed
/// or ended session.
fn status_end(status: tonic::Status, welcomed: bool) -> SessionEnd {
    use tonic::Code;
    let reason = format!("{:?}: {}", status.code(), status.message());
    match status.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::PermissionDenied => {
            SessionEnd::Refused { reason }
        }
        _ if welcomed => SessionEnd::Ended { reason },
        _ => SessionEnd::Failed { reason },
    }
}

/// Reads `completions.jsonl` (for tests and tools): every record, skipping malformed
/// lines.
pub fn read_completions(path: &Path) -> Result<Vec<CompletionRecord>, RuntimeError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(RuntimeError::Io {
                context: format!("reading {}", path.display()),
                source: e,
            })
        }
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use drplane_statemachine::jobs::VolumeRef;
    use futures::Stream;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
    use tonic::{Request, Response, Status, Streaming};

    use super::*;
    use crate::control::pb::agent_control_server::{AgentControl, AgentControlServer};
    use crate::control::pb::ControlFrame;
    use crate::sim::{SimConfig, SimDriver, SimNetwork};

    type Out = Pin<Box<dyn Stream<Item = Result<ControlFrame, Status>> + Send + 'static>>;

    /// One session the fake leader accepted.
    struct FakeSession {
        hello: Hello,
        inbound: UnboundedReceiver<AgentMessage>,
        outbound: UnboundedSender<Result<ControlFrame, Status>>,
    }

    impl FakeSession {
        fn send(&self, msg: ControlMessage) {
            let frame = msg.to_frame().expect("encode");
            self.outbound.send(Ok(frame)).expect("session open");
        }

        /// The next progress or result (heartbeats skipped).
        async fn report(&mut self) -> AgentMessage {
            loop {
                let m = tokio::time::timeout(Duration::from_secs(5), self.inbound.recv())
                    .await
                    .expect("a report within 5 s")
                    .expect("session open");
                if !matches!(m, AgentMessage::Heartbeat { .. }) {
                    return m;
                }
            }
        }

        /// The next result (progress skipped).
        async fn result(&mut self) -> (String, FencingToken, TaskOutcome) {
            loop {
                if let AgentMessage::Result {
                    task_id,
                    token,
                    outcome,
                } = self.report().await
                {
                    return (task_id, token, outcome);
                }
            }
        }

        /// No result arrives for `d`.
        async fn no_result_for(&mut self, d: Duration) {
            let deadline = tokio::time::Instant::now() + d;
            loop {
                match tokio::time::timeout_at(deadline, self.inbound.recv()).await {
                    Err(_) => return,
                    Ok(Some(AgentMessage::Result { task_id, .. })) => {
                        panic!("unexpected result for {task_id}")
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("session closed"),
                }
            }
        }
    }

    struct Fake {
        sessions: UnboundedSender<FakeSession>,
    }

    #[tonic::async_trait]
    impl AgentControl for Fake {
        type ConnectStream = Out;

        async fn connect(
            &self,
            req: Request<Streaming<AgentFrame>>,
        ) -> Result<Response<Out>, Status> {
            let mut inbound = req.into_inner();
            let (otx, orx) = unbounded_channel();
            let (itx, irx) = unbounded_channel();
            let sessions = self.sessions.clone();
            tokio::spawn(async move {
                let Ok(Some(f)) = inbound.message().await else {
                    return;
                };
                let Ok(AgentMessage::Hello(hello)) = AgentMessage::from_frame(&f) else {
                    return;
                };
                let _ = sessions.send(FakeSession {
                    hello: *hello,
                    inbound: irx,
                    outbound: otx,
                });
                while let Ok(Some(f)) = inbound.message().await {
                    match AgentMessage::from_frame(&f) {
                        Ok(m) => {
                            if itx.send(m).is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
            });
            Ok(Response::new(Box::pin(
                tokio_stream::wrappers::UnboundedReceiverStream::new(orx),
            )))
        }
    }

    /// A follower: answers Redirect to `to`.
    struct Follower {
        to: String,
    }

    #[tonic::async_trait]
    impl AgentControl for Follower {
        type ConnectStream = Out;

        async fn connect(
            &self,
            _req: Request<Streaming<AgentFrame>>,
        ) -> Result<Response<Out>, Status> {
            let msg = ControlMessage::Redirect {
                leader_id: Some(1),
                leader: Some(self.to.clone()),
            };
            let frame = msg
                .to_frame()
                .map_err(|e| Status::internal(e.to_string()))?;
            Ok(Response::new(Box::pin(futures::stream::iter(vec![Ok(
                frame,
            )]))))
        }
    }

    async fn serve<S: AgentControl>(svc: S) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AgentControlServer::new(svc))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    }

    fn assign(task: &str, kind: TaskKind, term: u64, attempt: u32) -> ControlMessage {
        ControlMessage::Assign(Box::new(Assignment {
            peers: Default::default(),
            task_id: task.into(),
            job_id: "job-1".into(),
            kind,
            token: FencingToken { term, attempt },
            lease_until_ms: now_ms() + 10_000,
        }))
    }

    fn sleep(ms: u64, fail_attempts: u32) -> TaskKind {
        TaskKind::Sleep {
            duration_ms: ms,
            fail_attempts,
        }
    }

    fn tok(term: u64, attempt: u32) -> FencingToken {
        FencingToken { term, attempt }
    }

    fn succeeded(o: &TaskOutcome) -> bool {
        matches!(o, TaskOutcome::Succeeded { .. })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn follows_redirects_and_runs_tasks_once_by_id() {
        let (stx, mut srx) = unbounded_channel();
        let leader = serve(Fake { sessions: stx }).await;
        let follower = serve(Follower { to: leader.clone() }).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = RuntimeConfig::new("h1", "s1", dir.path().join("agent"));
        cfg.heartbeat_every = Duration::from_millis(100);
        cfg.progress_every = Duration::from_millis(50);
        cfg.backoff_min = Duration::from_millis(20);
        cfg.backoff_max = Duration::from_millis(200);
        cfg.data_address = "sim://h1".into();
        let driver = Arc::new(SimDriver::new(
            SimConfig {
                host: "h1".into(),
                ..Default::default()
            },
            SimNetwork::new(),
        ));
        let agent =
            Agent::new(cfg, driver, Arc::new(StaticDiscovery(vec![follower]))).expect("agent");
        let stop = CancellationToken::new();
        let run = tokio::spawn(agent.clone().run(stop.clone()));

        // The follower redirected the agent to the leader.
        let mut s = tokio::time::timeout(Duration::from_secs(5), srx.recv())
            .await
            .expect("a session within 5 s")
            .expect("session");
        assert_eq!(s.hello.host.name, "h1");
        assert_eq!(s.hello.host.site, "s1");
        assert_eq!(s.hello.protocol, PROTOCOL_VERSION);
        assert_eq!(s.hello.host.capacity.pools.len(), 1);
        s.send(ControlMessage::Welcome {
            leader_id: 1,
            term: 1,
            warnings: vec!["a warning".into()],
        });

        // A task runs: progress (assigned -> running), then its result.
        s.send(assign("t1", sleep(100, 0), 1, 1));
        match s.report().await {
            AgentMessage::Progress { task_id, token, .. } => {
                assert_eq!((task_id.as_str(), token), ("t1", tok(1, 1)))
            }
            other => panic!("expected progress, got {other:?}"),
        }
        let (id, token, outcome) = s.result().await;
        assert_eq!((id.as_str(), token), ("t1", tok(1, 1)));
        assert!(succeeded(&outcome), "{outcome:?}");

        // The same assignment again: the result is re-reported, the task not re-run.
        s.send(assign("t1", sleep(100, 0), 1, 1));
        let (id, token, outcome) = s.result().await;
        assert_eq!((id.as_str(), token), ("t1", tok(1, 1)));
        assert!(succeeded(&outcome));
        // A newer token for a finished success: reported under it, still not re-run.
        s.send(assign("t1", sleep(100, 0), 2, 2));
        let (_, token, outcome) = s.result().await;
        assert_eq!(token, tok(2, 2));
        assert!(succeeded(&outcome));
        // An older token is ignored.
        s.send(assign("t1", sleep(100, 0), 1, 1));
        s.no_result_for(Duration::from_millis(300)).await;

        // A failed attempt runs again under the next token.
        s.send(assign("t2", sleep(50, 1), 1, 1));
        let (_, token, outcome) = s.result().await;
        assert_eq!(token, tok(1, 1));
        assert!(
            matches!(&outcome, TaskOutcome::Failed { retryable: true, reason } if reason.contains("injected")),
            "{outcome:?}"
        );
        s.send(assign("t2", sleep(50, 1), 1, 2));
        let (_, token, outcome) = s.result().await;
        assert_eq!(token, tok(1, 2));
        assert!(succeeded(&outcome));

        // A running task adopts a newer token and reports under it.
        s.send(assign("t3", sleep(400, 0), 1, 1));
        s.send(assign("t3", sleep(400, 0), 3, 2));
        let (_, token, outcome) = s.result().await;
        assert_eq!(token, tok(3, 2));
        assert!(succeeded(&outcome));

        // Cancel stops a task; assigned again later, it starts afresh.
        s.send(assign("t4", sleep(60_000, 0), 1, 1));
        match s.report().await {
            AgentMessage::Progress { task_id, .. } => assert_eq!(task_id, "t4"),
            other => panic!("expected progress, got {other:?}"),
        }
        s.send(ControlMessage::Cancel {
            task_id: "t4".into(),
        });
        s.no_result_for(Duration::from_millis(300)).await;
        s.send(assign("t4", sleep(50, 0), 1, 2));
        let (id, token, outcome) = s.result().await;
        assert_eq!((id.as_str(), token), ("t4", tok(1, 2)));
        assert!(succeeded(&outcome));

        // Kinds the agent cannot run yet fail with a reason, not retryable.
        let vol = VolumeRef {
            host: "h1".into(),
            pool: "default".into(),
            volume_id: "v1".into(),
            path: String::new(),
            size_bytes: 1 << 20,
            layout: VolumeLayout::Block,
        };
        s.send(assign(
            "t5",
            TaskKind::Sync {
                pair_id: "p1".into(),
                source: vol.clone(),
                target: vol.clone(),
                bwlimit_bytes_per_sec: None,
                full: false,
            },
            1,
            1,
        ));
        // A sync pulls from the source's agent: without its address (the leader sends it
        // in `peers`) the attempt fails, retryably, saying so.
        let (_, _, outcome) = s.result().await;
        assert!(
            matches!(&outcome, TaskOutcome::Failed { retryable: true, reason } if reason.contains("address of host 'h1'")),
            "{outcome:?}"
        );
        // Driver-backed kinds run through the driver.
        s.send(assign(
            "t6",
            TaskKind::CreateTarget {
                pair_id: "p1".into(),
                source: vol.clone(),
                target: vol.clone(),
            },
            1,
            1,
        ));
        let (_, _, outcome) = s.result().await;
        match &outcome {
            TaskOutcome::Succeeded { output } => {
                assert_eq!(output.get("volume_id").map(String::as_str), Some("v1"));
                assert_eq!(output.get("fenced").map(String::as_str), Some("true"));
            }
            other => panic!("create target: {other:?}"),
        }
        let mut other_host = vol.clone();
        other_host.host = "h2".into();
        s.send(assign(
            "t7",
            TaskKind::Fence {
                pair_id: "p1".into(),
                volume: other_host,
            },
            1,
            1,
        ));
        let (_, _, outcome) = s.result().await;
        assert!(
            matches!(&outcome, TaskOutcome::Failed { retryable: false, reason } if reason.contains("h2")),
            "{outcome:?}"
        );

        // The session ends while a task runs: its result goes out on the next session.
        s.send(assign("t8", sleep(300, 0), 1, 1));
        match s.report().await {
            AgentMessage::Progress { task_id, .. } => assert_eq!(task_id, "t8"),
            other => panic!("expected progress, got {other:?}"),
        }
        drop(s);
        let mut s = tokio::time::timeout(Duration::from_secs(5), srx.recv())
            .await
            .expect("a new session within 5 s")
            .expect("session");
        s.send(ControlMessage::Welcome {
            leader_id: 1,
            term: 2,
            warnings: Vec::new(),
        });
        let (id, token, outcome) = s.result().await;
        assert_eq!((id.as_str(), token), ("t8", tok(1, 1)));
        assert!(succeeded(&outcome));

        // Every attempt that ended is recorded once: t1 once, t2 twice, t4 once (the
        // cancelled run is not), …
        let recs = read_completions(agent.completions_path()).expect("completions");
        let count = |id: &str| recs.iter().filter(|r| r.task_id == id).count();
        assert_eq!(count("t1"), 1);
        assert_eq!(count("t2"), 2);
        assert_eq!(count("t3"), 1);
        assert_eq!(count("t4"), 1);
        assert_eq!(count("t8"), 1);

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("the agent stops")
            .expect("join")
            .expect("run");
    }
}
