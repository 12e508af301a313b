//! Eager append: the leader sends its new entries to caught-up followers while its own
//! log sync runs, instead of after it.
//!
//! openraft 0.9 awaits the leader's log flush inside its core loop and starts replication
//! only after it, so one write costs the leader's fsync, then the follower's round trip
//! with the follower's fsync, in series. Here the log store, just before it syncs entries
//! this node proposed as leader, hands them to [`EagerAppend::send`]: for every follower
//! whose replication stream has acknowledged everything up to the entry before them
//! (under the same vote), it sends the very AppendEntries openraft's replication will
//! send next. When openraft's replication stream then asks the network for that
//! AppendEntries, [`EagerAppend::take`] gives it the answer of the eager one instead of
//! sending it again (`network.rs`, `PeerClient::append_entries`).
//!
//! Why it is safe:
//! - An eager AppendEntries is an ordinary message of the current leader: its entries are
//!   in the leader's log, its `prev_log_id` is what the follower acknowledged under this
//!   vote. A follower can receive it before, after or instead of openraft's copy: the same
//!   entries under the same leader never conflict, so nothing is truncated.
//! - An eager answer counts toward a commit only through openraft: it is used only for
//!   the request openraft itself built, with the same vote, `prev_log_id` and entries, and
//!   only after the leader's own sync returned (openraft asks only then). A follower's
//!   answer says its log holds those entries durably, which is all openraft learns from
//!   sending them itself.
//! - Anything else (no answer, a refusal, a different range) falls back to a real send.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use openraft::error::RaftError;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use openraft::Vote;
use tokio::sync::oneshot;

use crate::network::{Channels, Method};
use crate::{LogId, TypeConfig};

type Entry = openraft::Entry<TypeConfig>;
type Answer = Option<AppendEntriesResponse<u64>>;

/// Shared by the log store (which sends) and the leader's replication streams (which
/// record what followers acknowledged and pick up the answers).
pub struct EagerAppend {
    id: u64,
    channels: Channels,
    deadline: Duration,
    peers: Mutex<HashMap<u64, Peer>>,
    /// Eager AppendEntries sent.
    pub sent: AtomicU64,
    /// Eager answers that replaced a send of openraft's replication.
    pub used: AtomicU64,
}

struct Peer {
    addr: String,
    /// The vote and log id of this stream's last acknowledgement.
    vote: Vote<u64>,
    matching: Option<LogId>,
    inflight: Option<Inflight>,
}

/// An eager AppendEntries on its way.
pub struct Inflight {
    vote: Vote<u64>,
    prev: Option<LogId>,
    last: LogId,
    answer: oneshot::Receiver<Answer>,
}

impl Inflight {
    /// Where the eager entries end in `rpc`'s entries, when `rpc` starts with exactly
    /// the eager request (same vote and `prev_log_id`).
    fn covers(&self, rpc: &AppendEntriesRequest<TypeConfig>) -> Option<usize> {
        if rpc.vote != self.vote || rpc.prev_log_id != self.prev {
            return None;
        }
        rpc.entries.iter().position(|e| e.log_id == self.last)
    }

    /// The follower's answer, `None` if the send failed.
    pub async fn answer(self) -> Answer {
        self.answer.await.ok().flatten()
    }

    /// The last log id the eager request carried.
    pub fn last(&self) -> LogId {
        self.last
    }
}

impl EagerAppend {
    /// `id`: this node; `deadline`: of each eager request (openraft's own AppendEntries
    /// timeout, the heartbeat interval).
    pub fn new(id: u64, channels: Channels, deadline: Duration) -> EagerAppend {
        EagerAppend {
            id,
            channels,
            deadline,
            peers: Mutex::new(HashMap::new()),
            sent: AtomicU64::new(0),
            used: AtomicU64::new(0),
        }
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Peer>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A replication stream's follower acknowledged its log up to `matching` under `vote`.
    pub fn acknowledged(&self, target: u64, addr: &str, vote: Vote<u64>, matching: Option<LogId>) {
        let mut peers = self.peers();
        let peer = peers.entry(target).or_insert_with(|| Peer {
            addr: addr.to_string(),
            vote,
            matching,
            inflight: None,
        });
        if peer.vote != vote || peer.matching < matching || peer.addr != addr {
            peer.addr = addr.to_string();
            peer.vote = vote;
            peer.matching = matching;
        }
    }

    /// A replication stream failed or ended: send nothing eagerly to `target` until it
    /// acknowledges again.
    pub fn forget(&self, target: u64) {
        self.peers().remove(&target);
    }

    /// Called by the log store with entries it is about to sync. Sends them to every
    /// follower whose stream acknowledged the entry just before them under this node's
    /// leadership of their term; returns whether anything was sent.
    pub fn send(&self, entries: &[Entry], leader_commit: Option<LogId>) -> bool {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return false;
        };
        let mut any = false;
        for peer in self.peers().values_mut() {
            let leader = peer.vote.leader_id();
            let next = peer.matching.map_or(0, |m| m.index + 1);
            if !peer.vote.is_committed()
                || leader.voted_for() != Some(self.id)
                || leader.term != first.log_id.leader_id.term
                || next != first.log_id.index
            {
                continue;
            }
            let request = AppendEntriesRequest::<TypeConfig> {
                vote: peer.vote,
                prev_log_id: peer.matching,
                leader_commit,
                entries: entries.to_vec(),
            };
            let (tx, rx) = oneshot::channel();
            let channels = self.channels.clone();
            let addr = peer.addr.clone();
            let deadline = self.deadline;
            tokio::spawn(async move {
                let answer: Result<Result<AppendEntriesResponse<u64>, RaftError<u64>>, _> =
                    channels
                        .call(&addr, Method::AppendEntries, &request, deadline)
                        .await;
                let _ = tx.send(answer.ok().and_then(Result::ok));
            });
            peer.inflight = Some(Inflight {
                vote: peer.vote,
                prev: peer.matching,
                last: last.log_id,
                answer: rx,
            });
            any = true;
        }
        if any {
            self.sent.fetch_add(1, Ordering::Relaxed);
        }
        any
    }

    /// The eager request to `target` that `rpc` starts with, and where its entries end in
    /// `rpc.entries`; the caller then owns it.
    pub fn take(
        &self,
        target: u64,
        rpc: &AppendEntriesRequest<TypeConfig>,
    ) -> Option<(Inflight, usize)> {
        let mut peers = self.peers();
        let peer = peers.get_mut(&target)?;
        let at = peer.inflight.as_ref()?.covers(rpc)?;
        peer.inflight.take().map(|i| (i, at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn id(term: u64, index: u64) -> LogId {
        openraft::LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn entries(term: u64, range: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
        range
            .map(|i| Entry {
                log_id: id(term, i),
                payload: EntryPayload::Blank,
            })
            .collect()
    }

    fn request(
        vote: Vote<u64>,
        prev: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote,
            prev_log_id: Some(id(2, prev)),
            leader_commit: None,
            entries: entries(2, range),
        }
    }

    /// Node 1 leads term 2; follower 7 (at an address nobody listens on) acknowledged
    /// index 5.
    fn leader() -> (EagerAppend, Vote<u64>) {
        let eager = EagerAppend::new(1, Channels::default(), Duration::from_millis(200));
        let vote = Vote::new_committed(2, 1);
        eager.acknowledged(7, "127.0.0.1:1", vote, Some(id(2, 5)));
        (eager, vote)
    }

    #[tokio::test]
    async fn sends_only_the_entries_right_after_what_the_follower_acknowledged() {
        let (eager, _) = leader();
        assert!(!eager.send(&entries(2, 7..=7), None), "a gap");
        assert!(!eager.send(&entries(3, 6..=6), None), "another term");
        assert!(!eager.send(&[], None));
        assert_eq!(eager.sent.load(Ordering::Relaxed), 0);
        assert!(eager.send(&entries(2, 6..=8), None));
        assert_eq!(eager.sent.load(Ordering::Relaxed), 1);

        // Not this node's leadership, or a vote not yet granted by a quorum.
        let other = EagerAppend::new(1, Channels::default(), Duration::from_millis(200));
        other.acknowledged(7, "127.0.0.1:1", Vote::new_committed(2, 3), Some(id(2, 5)));
        assert!(!other.send(&entries(2, 6..=6), None));
        other.acknowledged(7, "127.0.0.1:1", Vote::new(2, 1), Some(id(2, 5)));
        assert!(!other.send(&entries(2, 6..=6), None));
        // A failed stream is forgotten.
        let (eager, _) = leader();
        eager.forget(7);
        assert!(!eager.send(&entries(2, 6..=6), None));
    }

    #[tokio::test]
    async fn the_answer_goes_to_the_request_that_starts_with_the_eager_one() {
        let (eager, vote) = leader();
        assert!(eager.send(&entries(2, 6..=8), None));
        // Another vote, another prev_log_id, or entries that stop short: not this one.
        assert!(eager
            .take(7, &request(Vote::new_committed(3, 1), 5, 6..=8))
            .is_none());
        assert!(eager.take(7, &request(vote, 4, 5..=8)).is_none());
        assert!(eager.take(7, &request(vote, 5, 6..=7)).is_none());
        assert!(eager.take(8, &request(vote, 5, 6..=8)).is_none());
        // The same entries and more: the eager part ends at position 2.
        let (inflight, at) = eager.take(7, &request(vote, 5, 6..=9)).expect("covered");
        assert_eq!(at, 2);
        assert_eq!(inflight.last(), id(2, 8));
        // Nobody listens there: no answer, so the caller sends for real.
        assert!(inflight.answer().await.is_none());
        // Taken once.
        assert!(eager.take(7, &request(vote, 5, 6..=9)).is_none());
    }

    #[tokio::test]
    async fn acknowledgements_only_move_forward_within_a_vote() {
        let (eager, vote) = leader();
        eager.acknowledged(7, "127.0.0.1:1", vote, Some(id(2, 3)));
        assert!(eager.send(&entries(2, 6..=6), None), "still at 5");
        eager.acknowledged(7, "127.0.0.1:1", vote, Some(id(2, 6)));
        assert!(eager.send(&entries(2, 7..=7), None));
        // A new vote starts over from what the follower acknowledged under it.
        let newer = Vote::new_committed(4, 1);
        eager.acknowledged(7, "127.0.0.1:1", newer, Some(id(2, 2)));
        assert!(!eager.send(&entries(4, 7..=7), None));
        assert!(eager.send(&entries(4, 3..=3), None));
    }
}
