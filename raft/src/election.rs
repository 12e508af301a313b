//! Elections with a pre-vote, started by drplane rather than by openraft's own timer.
//!
//! openraft 0.9 draws a node's election timeout once per process and has no pre-vote. Two
//! survivors of a dead leader whose timeouts happen to be close split their votes again on
//! every retry, and a survivor with the shorter log bumps the term and delays the one that
//! could win: leader-kill recovery then took a second or more instead of a few hundred
//! milliseconds. So openraft's timer is off (`enable_elect = false`) and this driver decides
//! when to call `trigger().elect()`:
//!
//! ```text
//!  every tick:  leader here?                    ─► mark contact, nothing to do
//!               heard from a leader within
//!               lease + this round's jitter?    ─► nothing to do
//!               granted someone's pre-vote
//!               within one jitter?               ─► let that candidate finish
//!               else PreVote to every voter ──► majority (of each joint config) grants?
//!                                                  yes ─► trigger().elect()
//!               next round: a fresh random pause (jitter..2·jitter)
//!
//!  PreVote granted by a member iff: it is not the leader, it has not heard from a leader
//!  for a whole lease, and the candidate's last log id ≥ its own (the up-to-date rule).
//! ```
//!
//! A pre-vote changes nothing on the responder: a node with a shorter log, a partitioned
//! node or a restarted one never bumps the term, so it cannot depose a healthy leader or
//! stall the node that can win. The random pause is drawn afresh for every round, which
//! breaks ties that a per-process timeout repeats. Safety does not depend on any of this:
//! openraft still enforces the vote rules (one vote per term, up-to-date log, leader
//! lease) on the real `Vote` RPC.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::log_store::LogStore;
use crate::network::{Channels, Method};
use crate::{LogId, Raft};

/// How often the driver looks at the clock.
const TICK: Duration = Duration::from_millis(5);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreVoteRequest {
    pub candidate: u64,
    pub last_log_id: Option<LogId>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreVoteResponse {
    pub granted: bool,
    /// Why not, for the candidate's log.
    pub reason: String,
}

/// When this node last heard from a leader (or was one), and until when it holds back its
/// own candidacy because it granted someone else's pre-vote. Microseconds since `epoch`.
pub(crate) struct Contact {
    epoch: Instant,
    last_us: AtomicU64,
    yield_until_us: AtomicU64,
}

impl Contact {
    pub(crate) fn new() -> Contact {
        Contact {
            epoch: Instant::now(),
            last_us: AtomicU64::new(0),
            yield_until_us: AtomicU64::new(0),
        }
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// A leader's AppendEntries or InstallSnapshot was accepted just now.
    pub(crate) fn touch(&self) {
        self.last_us.fetch_max(self.now_us(), Ordering::Relaxed);
    }

    /// Time since the last contact with a leader (since start if none).
    pub(crate) fn quiet(&self) -> Duration {
        Duration::from_micros(
            self.now_us()
                .saturating_sub(self.last_us.load(Ordering::Relaxed)),
        )
    }

    fn hold_back(&self, d: Duration) {
        let until = self.now_us() + d.as_micros() as u64;
        self.yield_until_us.fetch_max(until, Ordering::Relaxed);
    }

    fn holding_back(&self) -> bool {
        self.now_us() < self.yield_until_us.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// openraft's leader lease (its `election_timeout_max`): a member that heard from a
    /// leader within it refuses votes, so no candidacy starts earlier.
    pub lease: Duration,
    /// Random extra wait is drawn from `0..jitter` for the first round after contact is
    /// lost and from `jitter..2·jitter` between rounds.
    pub jitter: Duration,
    /// Deadline of one PreVote RPC.
    pub rpc_timeout: Duration,
}

impl Timing {
    pub(crate) fn from_config(
        heartbeat_ms: u64,
        election_min_ms: u64,
        election_max_ms: u64,
    ) -> Timing {
        Timing {
            lease: Duration::from_millis(election_max_ms),
            jitter: Duration::from_millis((election_min_ms / 2).max(10)),
            rpc_timeout: Duration::from_millis((heartbeat_ms * 2).clamp(20, 200)),
        }
    }
}

/// Everything the driver and the PreVote handler share.
pub(crate) struct Elections {
    pub id: u64,
    pub raft: Raft,
    pub log_store: LogStore,
    pub channels: Channels,
    pub contact: Contact,
    pub timing: Timing,
    pub pre_votes_granted: AtomicU64,
    pub elections_started: AtomicU64,
}

impl Elections {
    /// Answer a candidate's pre-vote. Changes nothing but this node's own hold-back timer.
    pub(crate) fn handle_pre_vote(&self, req: &PreVoteRequest) -> PreVoteResponse {
        let deny = |reason: String| PreVoteResponse {
            granted: false,
            reason,
        };
        let (state, leader) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            (m.state, m.current_leader)
        };
        if state == ServerState::Leader {
            return deny(format!("node {} is the leader", self.id));
        }
        let quiet = self.contact.quiet();
        if quiet < self.timing.lease {
            return deny(format!(
                "node {} heard from leader {leader:?} {} ms ago",
                self.id,
                quiet.as_millis()
            ));
        }
        let mine = match self.log_store.last_log_id() {
            Ok(l) => l,
            Err(e) => return deny(format!("node {} cannot read its log: {e}", self.id)),
        };
        let up_to_date = matches!(
            req.last_log_id.as_ref().partial_cmp(&mine.as_ref()),
            Some(std::cmp::Ordering::Greater | std::cmp::Ordering::Equal)
        );
        if !up_to_date {
            return deny(format!(
                "node {}'s log ({mine:?}) is ahead of the candidate's ({:?})",
                self.id, req.last_log_id
            ));
        }
        // Give this candidate one jitter to win before competing with it.
        self.contact.hold_back(self.timing.jitter);
        self.pre_votes_granted.fetch_add(1, Ordering::Relaxed);
        PreVoteResponse {
            granted: true,
            reason: String::new(),
        }
    }

    /// Ask every other voter for a pre-vote; true when each config of the (possibly joint)
    /// membership has a majority of grants, counting this node's own.
    async fn pre_vote(&self, configs: &[BTreeSet<u64>], peers: Vec<(u64, String)>) -> bool {
        let last_log_id = match self.log_store.last_log_id() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "pre-vote: cannot read the log");
                return false;
            }
        };
        let req = PreVoteRequest {
            candidate: self.id,
            last_log_id,
        };
        let calls = peers.into_iter().map(|(id, addr)| {
            let req = req.clone();
            async move {
                let res: Result<PreVoteResponse, _> = self
                    .channels
                    .call(&addr, Method::PreVote, &req, self.timing.rpc_timeout)
                    .await;
                (id, res)
            }
        });
        let mut granted = BTreeSet::from([self.id]);
        for (id, res) in futures::future::join_all(calls).await {
            match res {
                Ok(r) if r.granted => {
                    granted.insert(id);
                }
                Ok(r) => tracing::debug!(peer = id, reason = %r.reason, "pre-vote refused"),
                Err(e) => tracing::debug!(peer = id, error = %e, "pre-vote unanswered"),
            }
        }
        configs
            .iter()
            .all(|c| c.iter().filter(|v| granted.contains(v)).count() * 2 > c.len())
    }
}

/// Runs until openraft's core stops.
pub(crate) async fn drive(el: Arc<Elections>) {
    let mut rng = rand::rngs::StdRng::from_entropy();
    let jitter_ms = el.timing.jitter.as_millis().max(1) as u64;
    let mut extra = Duration::from_millis(rng.gen_range(0..jitter_ms));
    let mut not_before = Instant::now();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rx = el.raft.metrics();
    loop {
        ticker.tick().await;
        if rx.has_changed().is_err() {
            return; // the core stopped
        }
        let (state, configs, peers) = {
            let m = rx.borrow_and_update();
            let membership = m.membership_config.membership();
            let configs = membership.get_joint_config().clone();
            let peers: Vec<(u64, String)> = membership
                .voter_ids()
                .filter(|v| *v != el.id)
                .filter_map(|v| membership.get_node(&v).map(|n| (v, n.raft.clone())))
                .collect();
            (m.state, configs, peers)
        };
        if state == ServerState::Leader {
            el.contact.touch();
            continue;
        }
        if !configs.iter().any(|c| c.contains(&el.id)) {
            continue; // a learner, or not a member at all
        }
        if el.contact.quiet() < el.timing.lease + extra
            || Instant::now() < not_before
            || el.contact.holding_back()
        {
            continue;
        }
        let started = Instant::now();
        if el.pre_vote(&configs, peers).await {
            // The core may have seen a leader meanwhile; elect() is a no-op on a leader and
            // a vote with a higher term on anyone else, which the up-to-date rule guards.
            if el.contact.quiet() >= el.timing.lease {
                tracing::info!(
                    quiet_ms = el.contact.quiet().as_millis() as u64,
                    pre_vote_ms = started.elapsed().as_millis() as u64,
                    "no leader for a lease and a majority granted the pre-vote: starting an election"
                );
                el.elections_started.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = el.raft.trigger().elect().await {
                    tracing::warn!(error = %e, "could not start an election");
                    return;
                }
            }
        }
        extra = Duration::from_millis(rng.gen_range(0..jitter_ms));
        not_before =
            Instant::now() + Duration::from_millis(rng.gen_range(jitter_ms..2 * jitter_ms));
    }
}
