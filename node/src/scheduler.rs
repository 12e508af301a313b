//! The leader's scheduler: places ready tasks on connected agents, keeps their leases
//! alive, notices silent hosts, and turns agents' reports into commands.
//!
//! ```text
//!  supervise (every node): watch raft metrics ──► leader of term T? ──► begin(T)
//!                                              └► no longer (or new term) ──► stop: sessions
//!                                                 get Redirect, the loop ends
//!  leadership loop (leader only), after a linearizable barrier, every ~100 ms or when woken:
//!    1. reports   Progress/Result from agents ──► ReportProgress / ReportResult
//!                 (a refused stale report is logged and dropped, never retried)
//!    2. heartbeat per connected host, at most every `heartbeat_every` ──► Heartbeat
//!    3. offline   online hosts silent > `offline_after` ──► MarkHostOffline (if no newer beat)
//!    4. renew     leases of tasks held by connected, live agents ──► RenewLease
//!    5. expire    after the grace period, due leases ──► ExpireLeases
//!    6. dispatch  ready tasks ──► AssignTask{term, lease} ──► Assign on the host's stream
//!    7. sweep     tasks an agent holds that ended or moved ──► Cancel
//! ```
//!
//! Nothing here is the source of truth: a new leader rebuilds from the replicated state
//! (tasks, leases, hosts) plus the agents that connect to it. Because agents need a moment
//! to find the new leader, a new leader expires no lease during its first lease period
//! (the grace period) and starts the offline clock of every host at its election; an agent
//! that connects gets `Assign` again for every task its host holds, so it re-reports what
//! a dead leader never recorded. Every change goes through [`RaftNode::propose_as_leader`]
//! (`propose`'s request ids and leader time, but never forwarded: a deposed leader's
//! decision cannot land in its successor's term, e.g. an `ExpireLeases` that would cut the
//! new leader's grace period short), and only while this node still leads the term the
//! loop started in.

// tonic::Status is large by its authors' design and is what the stream speaks.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use drplane_agent::control::pb::ControlFrame;
use drplane_agent::control::{Assignment, ControlMessage, Hello};
use drplane_raft::metrics::{counter, gauge, Histogram};
use drplane_raft::{now_ms, NodeError, RaftNode};
use drplane_statemachine::command::Outcome;
use drplane_statemachine::inventory::{
    Driver as HostDriver, Host, HostRegistration, HostState, InventoryCommand, StoragePool,
    WORKLOADS_PER_COMMAND_MAX,
};
use drplane_statemachine::jobs::{
    FencingToken, JobsCommand, Progress, Task, TaskKind, TaskOutcome, TaskStatus, EXPIRE_LIMIT_MAX,
};
use drplane_statemachine::replication::{ReplicationCommand, DUE_SYNCS_MAX};
use drplane_statemachine::{Command, CommandError, CommandResult, Proposal};
use openraft::ServerState;
use tokio::sync::{mpsc, watch, Notify};

/// Ready tasks looked at per dispatch round.
const DISPATCH_SCAN: usize = 4096;
/// Assignments proposed per dispatch round.
const DISPATCH_MAX: usize = 1024;
/// Leases renewed per round.
const RENEW_MAX: usize = 4096;
/// Reports proposed per round.
const REPORTS_MAX: usize = 4096;
/// Reports waiting for the loop before agents feel back-pressure.
const REPORT_QUEUE: usize = 65_536;
/// A report whose proposal failed (not refused) is tried this many times.
const REPORT_TRIES: u32 = 3;
/// How often hosts are re-read and checked for silence.
const HOSTS_EVERY: Duration = Duration::from_secs(1);
/// How often held tasks are checked for having ended or moved.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// Dispatch latency buckets, seconds.
const DISPATCH_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// How the scheduler runs.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// A task's lease: renewed while its agent is connected and alive.
    pub lease: Duration,
    /// A host whose agent is silent this long is marked offline.
    pub offline_after: Duration,
    /// The loop's period when nothing wakes it.
    pub tick: Duration,
    /// Heartbeats of a connected host are proposed at most this often.
    pub heartbeat_every: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            lease: Duration::from_secs(10),
            offline_after: Duration::from_secs(10),
            tick: Duration::from_millis(100),
            heartbeat_every: Duration::from_secs(3),
        }
    }
}

impl SchedulerConfig {
    /// An agent heard from within this window counts as alive (its leases are renewed and
    /// it gets new tasks). Agents heartbeat every second.
    fn alive_window(&self) -> Duration {
        (self.lease.min(self.offline_after) / 2).max(Duration::from_secs(2))
    }
}

#[derive(Default)]
struct SchedulerMetrics {
    dispatched: AtomicU64,
    reports: AtomicU64,
    reports_refused: AtomicU64,
    renewals: AtomicU64,
    leases_expired: AtomicU64,
    hosts_offline: AtomicU64,
    syncs_started: AtomicU64,
    dispatch_seconds: Option<Histogram>,
}

/// Frames towards one agent's session.
pub type AgentTx = mpsc::Sender<Result<ControlFrame, tonic::Status>>;

/// A report from an agent, waiting for the loop.
#[derive(Debug, Clone)]
pub struct Report {
    pub host: String,
    pub task_id: String,
    pub token: FencingToken,
    pub kind: ReportKind,
    tries: u32,
}

#[derive(Debug, Clone)]
pub enum ReportKind {
    Progress(Progress),
    Result(TaskOutcome),
}

impl Report {
    pub fn new(host: String, task_id: String, token: FencingToken, kind: ReportKind) -> Self {
        Report {
            host,
            task_id,
            token,
            kind,
            tries: 0,
        }
    }
}

/// One connected agent.
struct AgentConn {
    session: u64,
    tx: AgentTx,
    kick: Arc<Notify>,
    last_seen: Instant,
    last_seen_ms: u64,
    pools: Option<Vec<StoragePool>>,
    pools_proposed: Option<Vec<StoragePool>>,
    heartbeat_proposed: Option<Instant>,
    /// Tasks sent to this agent, with the token sent.
    held: HashMap<String, FencingToken>,
}

/// The scheduler's state for one term of leadership on this node.
pub struct Leadership {
    pub term: u64,
    stop: watch::Sender<bool>,
    agents: Mutex<HashMap<String, AgentConn>>,
    hosts: Mutex<HashMap<String, Host>>,
    reports: mpsc::Sender<Report>,
    wake: Notify,
    next_session: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Leadership {
    /// Resolves once this leadership ended (step-down, new term, shutdown).
    pub async fn stopped(&self) {
        let mut rx = self.stop.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    pub fn is_stopped(&self) -> bool {
        *self.stop.borrow()
    }

    fn end(&self) {
        self.stop.send_replace(true);
    }

    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Makes `host`'s session the one tasks go to; an older session of the same host is
    /// closed. Returns the session's number.
    pub fn attach(&self, host: &str, tx: AgentTx, kick: Arc<Notify>) -> u64 {
        let session = self.next_session.fetch_add(1, Ordering::Relaxed) + 1;
        let conn = AgentConn {
            session,
            tx,
            kick,
            last_seen: Instant::now(),
            last_seen_ms: now_ms(),
            pools: None,
            pools_proposed: None,
            heartbeat_proposed: None,
            held: HashMap::new(),
        };
        if let Some(old) = lock(&self.agents).insert(host.to_string(), conn) {
            tracing::info!(
                host,
                old_session = old.session,
                "a new session replaces the host's previous one"
            );
            old.kick.notify_one();
        }
        session
    }

    /// Forgets `host`'s session if it still is `session`.
    pub fn detach(&self, host: &str, session: u64) {
        let mut agents = lock(&self.agents);
        if agents.get(host).is_some_and(|c| c.session == session) {
            agents.remove(host);
        }
    }

    /// The agent was heard from (any frame); `pools` from a heartbeat.
    pub fn seen(&self, host: &str, session: u64, pools: Option<Vec<StoragePool>>) {
        let mut agents = lock(&self.agents);
        if let Some(c) = agents.get_mut(host).filter(|c| c.session == session) {
            c.last_seen = Instant::now();
            c.last_seen_ms = now_ms();
            if pools.is_some() {
                c.pools = pools;
            }
        }
    }

    /// Hands a report to the loop (waits when the queue is full: back-pressure).
    pub async fn report(&self, r: Report) {
        if self.reports.send(r).await.is_ok() {
            self.wake();
        }
    }

    pub fn connected(&self) -> usize {
        lock(&self.agents).len()
    }

    /// Sends `msg` on `host`'s session; a session that cannot take it is closed (its agent
    /// reconnects and is re-synchronized).
    fn send(&self, host: &str, msg: &ControlMessage) -> bool {
        let frame = match msg.to_frame() {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(host, error = %e, "cannot encode a control frame");
                return false;
            }
        };
        let mut agents = lock(&self.agents);
        let Some(conn) = agents.get(host) else {
            return false;
        };
        match conn.tx.try_send(Ok(frame)) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(host, error = %e, "the agent's session cannot take more frames; closing it");
                conn.kick.notify_one();
                agents.remove(host);
                false
            }
        }
    }

    /// [`Leadership::send`] to an agent heard from within `window` only. A silent agent
    /// is not told (it may be gone); if it comes back, the refusal of its next report
    /// answers with `Cancel`.
    fn send_if_live(&self, host: &str, msg: &ControlMessage, window: Duration) -> bool {
        let live = lock(&self.agents)
            .get(host)
            .is_some_and(|c| c.last_seen.elapsed() <= window);
        live && self.send(host, msg)
    }

    fn hold(&self, host: &str, task_id: &str, token: FencingToken) {
        if let Some(c) = lock(&self.agents).get_mut(host) {
            c.held.insert(task_id.to_string(), token);
        }
    }

    fn release(&self, host: &str, task_id: &str) {
        if let Some(c) = lock(&self.agents).get_mut(host) {
            c.held.remove(task_id);
        }
    }

    /// Connected agents heard from within `window`, with how many tasks each holds.
    fn live_agents(&self, window: Duration) -> Vec<(String, usize)> {
        lock(&self.agents)
            .iter()
            .filter(|(_, c)| c.last_seen.elapsed() <= window)
            .map(|(h, c)| (h.clone(), c.held.len()))
            .collect()
    }
}

/// The scheduler of one node; it works only while the node leads.
pub struct Scheduler {
    node: Arc<RaftNode>,
    cfg: SchedulerConfig,
    metrics: SchedulerMetrics,
    active: watch::Sender<Option<Arc<Leadership>>>,
    shutdown: watch::Sender<bool>,
}

/// Where agents should go instead of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderHint {
    pub leader_id: Option<u64>,
    /// The leader's raft address.
    pub leader: Option<String>,
}

impl Scheduler {
    /// Creates the scheduler and starts watching for this node's leadership.
    pub fn start(node: Arc<RaftNode>, cfg: SchedulerConfig) -> Arc<Scheduler> {
        let (active, _) = watch::channel(None);
        let (shutdown, _) = watch::channel(false);
        let sched = Arc::new(Scheduler {
            node,
            cfg,
            metrics: SchedulerMetrics {
                dispatch_seconds: Some(Histogram::new(DISPATCH_BOUNDS)),
                ..Default::default()
            },
            active,
            shutdown,
        });
        tokio::spawn(sched.clone().supervise());
        sched
    }

    pub fn node_id(&self) -> u64 {
        self.node.id
    }

    /// Stops the scheduler for good (node shutdown).
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// The running leadership, if this node leads and its scheduler is up.
    pub fn active(&self) -> Option<Arc<Leadership>> {
        self.active.borrow().clone().filter(|l| !l.is_stopped())
    }

    /// [`Scheduler::active`], waiting up to `timeout` for a just-elected leader's
    /// scheduler to start.
    pub async fn wait_active(&self, timeout: Duration) -> Option<Arc<Leadership>> {
        let mut rx = self.active.subscribe();
        let _ = tokio::time::timeout(
            timeout,
            rx.wait_for(|a| a.as_ref().is_some_and(|l| !l.is_stopped())),
        )
        .await;
        self.active()
    }

    /// Whether this node leads right now (by its own Raft metrics).
    pub fn is_leader(&self) -> bool {
        let m = self.node.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.node.id)
    }

    fn is_leader_in(&self, term: u64) -> bool {
        let m = self.node.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader
            && m.current_leader == Some(self.node.id)
            && m.current_term == term
    }

    /// The leader this node knows, with its raft address.
    pub fn leader_hint(&self) -> LeaderHint {
        let m = self.node.raft.metrics();
        let m = m.borrow();
        let leader_id = m.current_leader;
        let leader = leader_id.and_then(|l| {
            m.membership_config
                .membership()
                .get_node(&l)
                .map(|n| n.raft.clone())
        });
        LeaderHint { leader_id, leader }
    }

    async fn supervise(self: Arc<Self>) {
        // Server metrics change with the role, leader, vote or membership only, not with
        // every write (the full metrics woke this loop several times per write).
        let mut metrics = self.node.raft.server_metrics();
        let mut shutdown = self.shutdown.subscribe();
        let mut current: Option<Arc<Leadership>> = None;
        loop {
            let (leads, term) = {
                let m = metrics.borrow_and_update();
                (
                    m.state == ServerState::Leader && m.current_leader == Some(self.node.id),
                    m.vote.leader_id.term,
                )
            };
            if let Some(l) = &current {
                if !leads || l.term != term {
                    tracing::info!(term = l.term, "no longer the leader: scheduler stopped");
                    self.retire(l);
                    current = None;
                } else if l.is_stopped() {
                    // Its loop ended on its own (it saw a passing doubt about leadership);
                    // still the leader: start again.
                    current = None;
                }
            }
            if leads && current.is_none() {
                current = Some(self.clone().begin(term));
            }
            // A leadership loop may also end on its own (see above): wake for that too, a
            // little later, so a loop that keeps ending is not restarted in a tight spin.
            let running = current.clone();
            let ended = async move {
                match running {
                    Some(l) => {
                        l.stopped().await;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { break },
                _ = ended => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        if let Some(l) = current {
            self.retire(&l);
        }
    }

    /// Ends a leadership and unpublishes it.
    fn retire(&self, l: &Arc<Leadership>) {
        l.end();
        self.active.send_if_modified(|cur| {
            if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, l)) {
                *cur = None;
                true
            } else {
                false
            }
        });
    }

    fn begin(self: Arc<Self>, term: u64) -> Arc<Leadership> {
        let (stop, _) = watch::channel(false);
        let (tx, rx) = mpsc::channel(REPORT_QUEUE);
        let lead = Arc::new(Leadership {
            term,
            stop,
            agents: Mutex::new(HashMap::new()),
            hosts: Mutex::new(HashMap::new()),
            reports: tx,
            wake: Notify::new(),
            next_session: AtomicU64::new(0),
        });
        let l = lead.clone();
        tokio::spawn(async move {
            let span = tracing::info_span!("scheduler", term);
            let _ = tracing::Instrument::instrument(self.clone().lead(l.clone(), rx), span).await;
            self.retire(&l);
        });
        lead
    }

    async fn lead(self: Arc<Self>, lead: Arc<Leadership>, mut reports: mpsc::Receiver<Report>) {
        // Catch up with everything committed before this term and confirm leadership with
        // a quorum, so the rebuild below reads the whole replicated state.
        loop {
            if lead.is_stopped() || !self.is_leader_in(lead.term) {
                return;
            }
            match self.node.raft.ensure_linearizable().await {
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "leadership not confirmed yet");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        if lead.is_stopped() || !self.is_leader_in(lead.term) {
            return;
        }
        let started_ms = now_ms();
        let mut ctx = LoopCtx {
            started_ms,
            grace_until_ms: started_ms + self.cfg.lease.as_millis() as u64,
            last_hosts: None,
            last_sweep: Instant::now(),
            rr: 0,
        };
        self.refresh_hosts(&lead);
        let in_flight = self
            .node
            .store()
            .leased_tasks(u64::MAX, usize::MAX)
            .map(|t| t.len())
            .unwrap_or(0);
        let ready = self
            .node
            .store()
            .ready_tasks(u64::MAX, usize::MAX)
            .map(|t| t.len())
            .unwrap_or(0);
        tracing::info!(
            in_flight,
            ready,
            grace_ms = self.cfg.lease.as_millis() as u64,
            "scheduler started on the new leader: in-flight tasks keep their agents for a grace period"
        );
        self.active.send_replace(Some(lead.clone()));

        let mut stop = lead.stop.subscribe();
        loop {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                _ = lead.wake.notified() => {}
                _ = tokio::time::sleep(self.cfg.tick) => {}
            }
            if lead.is_stopped() || !self.is_leader_in(lead.term) {
                break;
            }
            self.round(&lead, &mut ctx, &mut reports).await;
        }
        tracing::info!("scheduler loop ended");
    }

    async fn round(
        &self,
        lead: &Arc<Leadership>,
        ctx: &mut LoopCtx,
        reports: &mut mpsc::Receiver<Report>,
    ) {
        let mut batch = Vec::new();
        while batch.len() < REPORTS_MAX {
            match reports.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            self.process_reports(lead, batch).await;
        }
        self.heartbeats(lead).await;
        if ctx.last_hosts.is_none_or(|t| t.elapsed() >= HOSTS_EVERY) {
            ctx.last_hosts = Some(Instant::now());
            self.refresh_hosts(lead);
            self.mark_silent_hosts_offline(lead, ctx).await;
        }
        self.renew_leases(lead).await;
        if now_ms() >= ctx.grace_until_ms {
            self.expire_leases(lead).await;
        }
        self.start_due_syncs(lead).await;
        self.dispatch(lead, ctx).await;
        if ctx.last_sweep.elapsed() >= SWEEP_EVERY {
            ctx.last_sweep = Instant::now();
            self.sweep(lead);
        }
    }

    /// Proposes `commands` (concurrently: they share log entries) while this node still
    /// leads `lead`'s term; never forwarded to another leader (`propose_as_leader`).
    async fn propose_all(
        &self,
        lead: &Leadership,
        commands: Vec<Command>,
    ) -> Vec<Result<CommandResult, NodeError>> {
        if !self.is_leader_in(lead.term) || lead.is_stopped() {
            return commands
                .iter()
                .map(|_| Err(NodeError::NotLeader { leader: None }))
                .collect();
        }
        futures::future::join_all(commands.into_iter().map(|command| {
            self.node.propose_as_leader(Proposal {
                request_id: None,
                command,
            })
        }))
        .await
    }

    async fn propose_one(
        &self,
        lead: &Leadership,
        command: Command,
    ) -> Result<CommandResult, NodeError> {
        self.propose_all(lead, vec![command])
            .await
            .pop()
            .unwrap_or(Err(NodeError::Internal("no result".into())))
    }

    fn refresh_hosts(&self, lead: &Leadership) {
        match self.node.store().list_hosts() {
            Ok(list) => {
                *lock(&lead.hosts) = list.into_iter().map(|h| (h.name.clone(), h)).collect();
            }
            Err(e) => tracing::warn!(error = %e, "cannot read hosts"),
        }
    }

    fn host_online(&self, lead: &Leadership, host: &str) -> bool {
        lock(&lead.hosts).get(host).is_some_and(Host::is_online)
    }

    // ---- sessions (called by the agent service) ----

    /// Records the agent's host (online) and workloads. Returns warnings about what could
    /// not be recorded; a refused host is an error status for the agent.
    pub async fn register_agent(
        &self,
        lead: &Leadership,
        hello: &Hello,
    ) -> Result<Vec<String>, tonic::Status> {
        let h = &hello.host;
        let reg = HostRegistration {
            name: h.name.clone(),
            site: h.site.clone(),
            driver: h.driver,
            agent_address: h.data_address.clone(),
            capacity: h.capacity.clone(),
            state: Some(HostState::Online),
        };
        match self
            .propose_one(
                lead,
                Command::Inventory(InventoryCommand::RegisterHost(Box::new(reg))),
            )
            .await
        {
            Ok(Ok(Outcome::Host(host))) => {
                lock(&lead.hosts).insert(host.name.clone(), *host);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(refusal_status(&h.name, e)),
            Err(e) => {
                return Err(tonic::Status::unavailable(format!(
                    "cannot record host '{}' now: {e}",
                    h.name
                )))
            }
        }
        let mut warnings = Vec::new();
        for chunk in hello.workloads.chunks(WORKLOADS_PER_COMMAND_MAX) {
            let cmd = Command::Inventory(InventoryCommand::ReportWorkloads {
                workloads: chunk.to_vec(),
            });
            match self.propose_one(lead, cmd).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warnings.push(format!("workloads not recorded: {e}")),
                Err(e) => warnings.push(format!("workloads not recorded now: {e}")),
            }
        }
        for w in &warnings {
            tracing::warn!(host = %h.name, warning = %w, "agent inventory");
        }
        Ok(warnings)
    }

    /// Sends `Assign` again for every task the replicated state says `host` holds (with
    /// their current tokens): the agent resumes, adopts or re-reports them.
    pub fn resync(&self, lead: &Leadership, host: &str) {
        let tasks = match self.node.store().tasks_on_host(host) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(host, error = %e, "cannot read the host's tasks");
                return;
            }
        };
        if !tasks.is_empty() {
            tracing::info!(
                host,
                tasks = tasks.len(),
                "re-sending the host's assignments"
            );
        }
        for t in tasks {
            if let Some(token) = t.token {
                let msg = assign_message(&t, token, &lock(&lead.hosts));
                if lead.send(host, &msg) {
                    lead.hold(host, &t.id, token);
                }
            }
        }
    }

    // ---- the loop's steps ----

    async fn process_reports(&self, lead: &Leadership, batch: Vec<Report>) {
        let lease_until = now_ms() + self.cfg.lease.as_millis() as u64;
        let commands = batch
            .iter()
            .map(|r| {
                Command::Jobs(match &r.kind {
                    ReportKind::Progress(p) => JobsCommand::ReportProgress {
                        task_id: r.task_id.clone(),
                        token: r.token,
                        progress: *p,
                        lease_until_ms: Some(lease_until),
                    },
                    ReportKind::Result(o) => JobsCommand::ReportResult {
                        task_id: r.task_id.clone(),
                        token: r.token,
                        outcome: o.clone(),
                    },
                })
            })
            .collect();
        let results = self.propose_all(lead, commands).await;
        for (r, res) in batch.into_iter().zip(results) {
            let is_result = matches!(r.kind, ReportKind::Result(_));
            let span =
                tracing::info_span!("report", task = %r.task_id, host = %r.host, token = %r.token);
            let _g = span.enter();
            match res {
                Ok(Ok(Outcome::Task(t))) => {
                    self.metrics.reports.fetch_add(1, Ordering::Relaxed);
                    if is_result {
                        lead.release(&r.host, &r.task_id);
                        tracing::info!(job = %t.job_id, status = t.status.as_str(), "task result recorded");
                        lead.wake();
                    }
                }
                Ok(Ok(other)) => {
                    tracing::warn!(outcome = ?other, "unexpected answer to a report")
                }
                Ok(Err(e @ (CommandError::Conflict(_) | CommandError::NotFound { .. }))) => {
                    self.metrics.reports_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        report = if is_result { "result" } else { "progress" },
                        reason = %e,
                        "refused a stale report; dropped"
                    );
                    self.after_refusal(lead, &r);
                }
                Ok(Err(e)) => tracing::warn!(reason = %e, "report refused; dropped"),
                Err(e) => {
                    if r.tries + 1 < REPORT_TRIES && self.is_leader_in(lead.term) {
                        tracing::info!(error = %e, "report not recorded; trying again");
                        let mut again = r.clone();
                        again.tries += 1;
                        let _ = lead.reports.try_send(again);
                    } else {
                        tracing::warn!(error = %e, "report not recorded; the agent re-reports when re-synchronized");
                    }
                }
            }
        }
    }

    /// After a refused report: a task that moved on or went elsewhere is cancelled on the
    /// reporting agent; one that the host holds under a newer token is re-sent to it.
    fn after_refusal(&self, lead: &Leadership, r: &Report) {
        match self.node.store().get_task(&r.task_id) {
            Ok(Some(t))
                if t.status.is_active() && t.assigned_host.as_deref() == Some(r.host.as_str()) =>
            {
                if let Some(token) = t.token {
                    let msg = assign_message(&t, token, &lock(&lead.hosts));
                    if lead.send(&r.host, &msg) {
                        lead.hold(&r.host, &t.id, token);
                    }
                }
            }
            Ok(Some(t))
                if t.status == TaskStatus::Succeeded
                    && t.assigned_host.as_deref() == Some(r.host.as_str()) =>
            {
                lead.release(&r.host, &r.task_id);
            }
            Ok(_) => {
                lead.release(&r.host, &r.task_id);
                lead.send(
                    &r.host,
                    &ControlMessage::Cancel {
                        task_id: r.task_id.clone(),
                    },
                );
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the task"),
        }
    }

    async fn heartbeats(&self, lead: &Leadership) {
        let window = self.cfg.alive_window();
        let due: Vec<(String, Option<Vec<StoragePool>>)> = {
            let hosts = lock(&lead.hosts);
            let mut agents = lock(&lead.agents);
            agents
                .iter_mut()
                .filter_map(|(name, c)| {
                    let heard_since = c.heartbeat_proposed.is_none_or(|t| c.last_seen > t);
                    let interval_due = c
                        .heartbeat_proposed
                        .is_none_or(|t| t.elapsed() >= self.cfg.heartbeat_every);
                    let offline = hosts.get(name).is_some_and(|h| !h.is_online());
                    let alive = c.last_seen.elapsed() <= window;
                    if !(heard_since && (interval_due || (offline && alive))) {
                        return None;
                    }
                    c.heartbeat_proposed = Some(Instant::now());
                    let pools = match &c.pools {
                        Some(p) if c.pools_proposed.as_ref() != Some(p) => {
                            c.pools_proposed = Some(p.clone());
                            Some(p.clone())
                        }
                        _ => None,
                    };
                    Some((name.clone(), pools))
                })
                .collect()
        };
        if due.is_empty() {
            return;
        }
        let commands = due
            .iter()
            .map(|(name, pools)| {
                Command::Inventory(InventoryCommand::Heartbeat {
                    name: name.clone(),
                    pools: pools.clone(),
                })
            })
            .collect();
        let results = self.propose_all(lead, commands).await;
        for ((name, _), res) in due.into_iter().zip(results) {
            match res {
                Ok(Ok(Outcome::Host(h))) => {
                    lock(&lead.hosts).insert(name, *h);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(host = %name, reason = %e, "heartbeat refused; closing the agent's session so it registers again");
                    if let Some(c) = lock(&lead.agents).remove(&name) {
                        c.kick.notify_one();
                    }
                }
                Err(e) => {
                    tracing::debug!(host = %name, error = %e, "heartbeat not recorded");
                    if let Some(c) = lock(&lead.agents).get_mut(&name) {
                        c.heartbeat_proposed = None;
                        c.pools_proposed = None;
                    }
                }
            }
        }
    }

    async fn mark_silent_hosts_offline(&self, lead: &Leadership, ctx: &LoopCtx) {
        let now = now_ms();
        let after = self.cfg.offline_after.as_millis() as u64;
        let silent: Vec<String> = {
            let hosts = lock(&lead.hosts);
            let agents = lock(&lead.agents);
            hosts
                .values()
                // A host registered by hand has no agent to hear from.
                .filter(|h| h.is_online() && h.driver != HostDriver::None)
                .filter(|h| {
                    let mut last = h.last_heartbeat_ms.unwrap_or(0).max(ctx.started_ms);
                    if let Some(c) = agents.get(&h.name) {
                        last = last.max(c.last_seen_ms);
                    }
                    now.saturating_sub(last) > after
                })
                .map(|h| h.name.clone())
                .collect()
        };
        if silent.is_empty() {
            return;
        }
        let since = now.saturating_sub(after);
        let commands = silent
            .iter()
            .map(|name| {
                Command::Inventory(InventoryCommand::MarkHostOffline {
                    name: name.clone(),
                    if_no_heartbeat_since_ms: Some(since),
                })
            })
            .collect();
        let results = self.propose_all(lead, commands).await;
        for (name, res) in silent.into_iter().zip(results) {
            match res {
                Ok(Ok(Outcome::Host(h))) => {
                    self.metrics.hosts_offline.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(host = %name, silent_ms = after, "host marked offline: its agent stopped heartbeating");
                    lock(&lead.hosts).insert(name, *h);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::info!(host = %name, reason = %e, "host stays online"),
                Err(e) => tracing::debug!(host = %name, error = %e, "offline mark not recorded"),
            }
        }
    }

    async fn renew_leases(&self, lead: &Leadership) {
        let now = now_ms();
        let lease = self.cfg.lease.as_millis() as u64;
        let due = match self.node.store().leased_tasks(now + lease / 2, RENEW_MAX) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read leases");
                return;
            }
        };
        if due.is_empty() {
            return;
        }
        let live: HashMap<String, usize> = lead
            .live_agents(self.cfg.alive_window())
            .into_iter()
            .collect();
        let renew: Vec<(String, FencingToken)> = due
            .into_iter()
            .filter(|t| {
                t.assigned_host
                    .as_deref()
                    .is_some_and(|h| live.contains_key(h))
            })
            .filter_map(|t| t.token.map(|tok| (t.id, tok)))
            .collect();
        if renew.is_empty() {
            return;
        }
        let commands = renew
            .iter()
            .map(|(id, token)| {
                Command::Jobs(JobsCommand::RenewLease {
                    task_id: id.clone(),
                    token: *token,
                    lease_until_ms: now + lease,
                })
            })
            .collect();
        let results = self.propose_all(lead, commands).await;
        for ((id, _), res) in renew.into_iter().zip(results) {
            match res {
                Ok(Ok(_)) => {
                    self.metrics.renewals.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(e)) => tracing::debug!(task = %id, reason = %e, "lease not renewed"),
                Err(e) => tracing::debug!(task = %id, error = %e, "lease renewal not recorded"),
            }
        }
    }

    async fn expire_leases(&self, lead: &Leadership) {
        match self.node.store().leased_tasks(now_ms(), 1) {
            Ok(t) if t.is_empty() => return,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot read leases");
                return;
            }
        }
        let cmd = Command::Jobs(JobsCommand::ExpireLeases {
            limit: EXPIRE_LIMIT_MAX,
        });
        match self.propose_one(lead, cmd).await {
            Ok(Ok(Outcome::TaskIds(ids))) => {
                for id in &ids {
                    self.metrics.leases_expired.fetch_add(1, Ordering::Relaxed);
                    let task = self.node.store().get_task(id).ok().flatten();
                    let (job, status, host) = task
                        .as_ref()
                        .map(|t| {
                            (
                                t.job_id.clone(),
                                t.status.as_str(),
                                t.assigned_host.clone().unwrap_or_default(),
                            )
                        })
                        .unwrap_or_default();
                    tracing::warn!(task = %id, job = %job, host = %host, now = status, "lease expired: the agent stopped reporting");
                    if !host.is_empty() {
                        lead.release(&host, id);
                        lead.send_if_live(
                            &host,
                            &ControlMessage::Cancel {
                                task_id: id.clone(),
                            },
                            self.cfg.alive_window(),
                        );
                    }
                }
                if !ids.is_empty() {
                    lead.wake();
                }
            }
            Ok(Ok(other)) => tracing::warn!(outcome = ?other, "unexpected answer to ExpireLeases"),
            Ok(Err(e)) => tracing::warn!(reason = %e, "ExpireLeases refused"),
            Err(e) => tracing::debug!(error = %e, "ExpireLeases not recorded"),
        }
    }

    /// Continuous replication: a sync job for every enabled, idle pair whose interval
    /// has passed (the state machine skips any that stopped being due meanwhile).
    async fn start_due_syncs(&self, lead: &Leadership) {
        let due = match self.node.store().due_pairs(now_ms(), DUE_SYNCS_MAX) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the pairs due for a sync");
                return;
            }
        };
        if due.is_empty() {
            return;
        }
        let syncs: Vec<(String, String)> = due
            .into_iter()
            .map(|pair| (pair, uuid::Uuid::new_v4().to_string()))
            .collect();
        let cmd = Command::Replication(ReplicationCommand::StartDueSyncs { syncs });
        match self.propose_one(lead, cmd).await {
            Ok(Ok(Outcome::TaskIds(jobs))) => {
                self.metrics
                    .syncs_started
                    .fetch_add(jobs.len() as u64, Ordering::Relaxed);
                if !jobs.is_empty() {
                    tracing::debug!(started = jobs.len(), "periodic syncs started");
                    lead.wake();
                }
            }
            Ok(Ok(other)) => tracing::warn!(outcome = ?other, "unexpected answer to StartDueSyncs"),
            Ok(Err(e)) => tracing::warn!(reason = %e, "StartDueSyncs refused"),
            Err(e) => tracing::debug!(error = %e, "StartDueSyncs not recorded"),
        }
    }

    async fn dispatch(&self, lead: &Leadership, ctx: &mut LoopCtx) {
        let now = now_ms();
        let ready = match self.node.store().ready_tasks(now, DISPATCH_SCAN) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read ready tasks");
                return;
            }
        };
        if ready.is_empty() {
            return;
        }
        let mut candidates: Vec<(String, usize)> = lead
            .live_agents(self.cfg.alive_window())
            .into_iter()
            .filter(|(h, _)| self.host_online(lead, h))
            .collect();
        if candidates.is_empty() {
            return;
        }
        candidates.sort();
        let n = candidates.len();
        ctx.rr = ctx.rr.wrapping_add(1);
        let lease_until = now + self.cfg.lease.as_millis() as u64;
        let mut picks: Vec<(Task, String)> = Vec::new();
        for t in ready {
            if picks.len() >= DISPATCH_MAX {
                break;
            }
            let host = match &t.placement_host {
                Some(h) => match candidates.iter().position(|(c, _)| c == h) {
                    Some(i) => i,
                    // Its host is not connected: the task waits for it.
                    None => continue,
                },
                None => {
                    // Least loaded, ties broken round-robin.
                    let mut best = ctx.rr % n;
                    for k in 0..n {
                        let i = (ctx.rr + k) % n;
                        if candidates[i].1 < candidates[best].1 {
                            best = i;
                        }
                    }
                    best
                }
            };
            candidates[host].1 += 1;
            picks.push((t, candidates[host].0.clone()));
        }
        if picks.is_empty() {
            return;
        }
        let commands = picks
            .iter()
            .map(|(t, host)| {
                Command::Jobs(JobsCommand::AssignTask {
                    task_id: t.id.clone(),
                    host: host.clone(),
                    term: lead.term,
                    lease_until_ms: lease_until,
                })
            })
            .collect();
        let results = self.propose_all(lead, commands).await;
        let hist = self.metrics.dispatch_seconds.as_ref();
        for ((ready_task, host), res) in picks.into_iter().zip(results) {
            match res {
                Ok(Ok(Outcome::Task(t))) => {
                    let Some(token) = t.token else {
                        continue;
                    };
                    self.metrics.dispatched.fetch_add(1, Ordering::Relaxed);
                    let waited_ms = t
                        .updated_at_ms
                        .saturating_sub(ready_task.next_attempt_after_ms);
                    if let Some(h) = hist {
                        h.observe(waited_ms as f64 / 1000.0);
                    }
                    tracing::info!(
                        task = %t.id,
                        job = %t.job_id,
                        host = %host,
                        kind = t.kind.name(),
                        token = %token,
                        waited_ms,
                        "task assigned"
                    );
                    // If the session is gone, the lease runs out and the task is reassigned.
                    let msg = assign_message(&t, token, &lock(&lead.hosts));
                    if lead.send(&host, &msg) {
                        lead.hold(&host, &t.id, token);
                    }
                }
                Ok(Ok(other)) => {
                    tracing::warn!(outcome = ?other, "unexpected answer to AssignTask")
                }
                Ok(Err(e)) => {
                    tracing::debug!(task = %ready_task.id, host = %host, reason = %e, "assignment refused")
                }
                Err(e) => {
                    tracing::debug!(task = %ready_task.id, host = %host, error = %e, "assignment not recorded")
                }
            }
        }
    }

    /// Tasks sent to agents that ended or moved elsewhere: forget them, and cancel those
    /// the agent should stop working on.
    fn sweep(&self, lead: &Leadership) {
        let held: Vec<(String, String, FencingToken)> = lock(&lead.agents)
            .iter()
            .flat_map(|(h, c)| {
                c.held
                    .iter()
                    .map(move |(id, tok)| (h.clone(), id.clone(), *tok))
            })
            .collect();
        for (host, id, token) in held {
            let task = match self.node.store().get_task(&id) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(task = %id, error = %e, "cannot read the task");
                    continue;
                }
            };
            match task {
                Some(t)
                    if t.status.is_active()
                        && t.assigned_host.as_deref() == Some(host.as_str()) =>
                {
                    if t.token != Some(token) {
                        if let Some(cur) = t.token {
                            lead.hold(&host, &id, cur);
                        }
                    }
                }
                Some(t)
                    if t.status == TaskStatus::Succeeded
                        && t.assigned_host.as_deref() == Some(host.as_str()) =>
                {
                    lead.release(&host, &id);
                }
                other => {
                    let why = other.as_ref().map(|t| t.status.as_str()).unwrap_or("gone");
                    tracing::info!(task = %id, host = %host, now = why, "cancelling the task on the agent: it ended or moved");
                    lead.release(&host, &id);
                    lead.send_if_live(
                        &host,
                        &ControlMessage::Cancel { task_id: id },
                        self.cfg.alive_window(),
                    );
                }
            }
        }
    }

    /// `drplane_scheduler_*` metrics in Prometheus text format.
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        let active = self.active();
        gauge(
            &mut out,
            "drplane_scheduler_active",
            "1 if this node's scheduler is running (this node leads).",
            if active.is_some() { 1.0 } else { 0.0 },
        );
        gauge(
            &mut out,
            "drplane_scheduler_connected_agents",
            "Agents with an open control session on this node.",
            active.as_ref().map(|l| l.connected()).unwrap_or(0) as f64,
        );
        let m = &self.metrics;
        counter(
            &mut out,
            "drplane_scheduler_tasks_dispatched_total",
            "Tasks this node assigned to agents.",
            m.dispatched.load(Ordering::Relaxed),
        );
        if let Some(h) = &m.dispatch_seconds {
            h.render(
                &mut out,
                "drplane_scheduler_dispatch_latency_seconds",
                "Time from a task becoming ready to its assignment being committed.",
            );
        }
        counter(
            &mut out,
            "drplane_scheduler_reports_total",
            "Agent progress and result reports recorded.",
            m.reports.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "drplane_scheduler_reports_refused_total",
            "Agent reports refused for a stale fencing token (dropped).",
            m.reports_refused.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "drplane_scheduler_lease_renewals_total",
            "Task leases renewed for connected agents.",
            m.renewals.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "drplane_scheduler_leases_expired_total",
            "Task leases that expired (the task became ready again or failed).",
            m.leases_expired.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "drplane_scheduler_hosts_marked_offline_total",
            "Hosts marked offline because their agent fell silent.",
            m.hosts_offline.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "drplane_scheduler_periodic_syncs_started_total",
            "Periodic sync jobs this node started for replication pairs.",
            m.syncs_started.load(Ordering::Relaxed),
        );
        out
    }
}

struct LoopCtx {
    started_ms: u64,
    grace_until_ms: u64,
    last_hosts: Option<Instant>,
    last_sweep: Instant,
    rr: usize,
}

fn assign_message(t: &Task, token: FencingToken, hosts: &HashMap<String, Host>) -> ControlMessage {
    // The agent pulls a sync or a migration from the source's agent: tell it where that is.
    let source_host = match &t.kind {
        TaskKind::Sync { source, .. } => Some(source.host.as_str()),
        TaskKind::Migrate { source_host, .. } => Some(source_host.as_str()),
        _ => None,
    };
    let peers = source_host
        .and_then(|h| {
            hosts
                .get(h)
                .map(|host| (h.to_string(), host.agent_address.clone()))
        })
        .into_iter()
        .collect();
    ControlMessage::Assign(Box::new(Assignment {
        task_id: t.id.clone(),
        job_id: t.job_id.clone(),
        kind: t.kind.clone(),
        token,
        lease_until_ms: t.lease_expiry_ms.unwrap_or(0),
        peers,
    }))
}

/// A refused registration, as the agent's stream error.
fn refusal_status(host: &str, e: CommandError) -> tonic::Status {
    let msg = format!("cannot register host '{host}': {e}");
    match e {
        CommandError::Invalid { .. } => tonic::Status::invalid_argument(msg),
        CommandError::NotFound { .. }
        | CommandError::Conflict(_)
        | CommandError::AlreadyExists { .. } => tonic::Status::failed_precondition(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_window_follows_lease_and_offline_settings() {
        let cfg = SchedulerConfig::default();
        assert_eq!(cfg.alive_window(), Duration::from_secs(5));
        let short = SchedulerConfig {
            lease: Duration::from_secs(3),
            offline_after: Duration::from_secs(20),
            ..Default::default()
        };
        assert_eq!(short.alive_window(), Duration::from_secs(2));
    }
}
