//! Linearizability checking of a recorded [`History`] (Wing & Gong's search with Lowe's
//! memoization, as in Knossos and Porcupine), key by key.
//!
//! Per key the model is `Option<description>`. An operation that ended `Fail` never took
//! effect and is left out. An operation that ended `Unknown` may have taken effect at any
//! instant after its invocation, or never: it is given a completion at infinity and any
//! result; linearizing it after everything else is the same as "never". A read whose
//! outcome is unknown constrains nothing and is left out.
//!
//! The search walks the operations in time order, linearizing a pending operation when the
//! model gives the result it returned, backtracking when it meets the completion of an
//! operation it has not placed; a cache of (set of placed operations, model state) cuts
//! every branch it has already explored.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use crate::history::{Call, History, Op, Outcome, Ret};

/// The model's step: the new state and the result a correct system returns.
pub fn step(state: &Option<String>, call: &Call) -> (Option<String>, Ret) {
    match (call, state) {
        (Call::Create { description }, None) => (Some(description.clone()), Ret::Created),
        (Call::Create { .. }, Some(_)) => (state.clone(), Ret::AlreadyExists),
        (Call::Delete, Some(_)) => (None, Ret::Deleted),
        (Call::Delete, None) => (None, Ret::NotFound),
        (Call::Read, Some(d)) => (
            state.clone(),
            Ret::Found {
                description: d.clone(),
            },
        ),
        (Call::Read, None) => (None, Ret::NotFound),
    }
}

/// The verdict on one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    Linearizable,
    /// No order of the operations explains their results; `explanation` names the
    /// operations the longest explainable prefix could not place.
    NotLinearizable {
        explanation: String,
    },
    /// The search ran out of its step budget.
    Inconclusive {
        steps: u64,
    },
}

/// What the checker found in a whole history.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub keys: usize,
    pub ops_checked: usize,
    /// Keys that are not linearizable, with the explanation.
    pub violations: BTreeMap<String, String>,
    /// Keys whose search ran out of budget.
    pub inconclusive: Vec<String>,
}

/// Steps the search may take per key before it gives up (the verdict is then
/// [`Verdict::Inconclusive`]).
pub const DEFAULT_BUDGET: u64 = 20_000_000;

/// Check every key of `history`.
pub fn check(history: &History, budget: u64) -> Report {
    let mut report = Report::default();
    for (key, ops) in history.by_key() {
        report.keys += 1;
        report.ops_checked += ops.len();
        match check_key(&ops, budget) {
            Verdict::Linearizable => {}
            Verdict::NotLinearizable { explanation } => {
                report.violations.insert(key.to_string(), explanation);
            }
            Verdict::Inconclusive { .. } => report.inconclusive.push(key.to_string()),
        }
    }
    report
}

/// One operation as the search sees it.
struct SearchOp<'a> {
    op: &'a Op,
    call: Call,
    /// None: unknown outcome, any result will do.
    ret: Option<Ret>,
}

#[derive(Clone, Copy)]
struct Entry {
    /// Index into the search ops.
    op: usize,
    is_call: bool,
    /// For a call: the index of its return entry.
    ret_entry: usize,
    prev: usize,
    next: usize,
}

const NIL: usize = usize::MAX;

/// Check the operations of one key.
pub fn check_key(ops: &[&Op], budget: u64) -> Verdict {
    let search: Vec<SearchOp> = ops
        .iter()
        .filter_map(|o| match &o.outcome {
            Outcome::Ok(r) => Some(SearchOp {
                op: o,
                call: o.call.clone(),
                ret: Some(r.clone()),
            }),
            Outcome::Unknown { .. } if o.call.is_write() => Some(SearchOp {
                op: o,
                call: o.call.clone(),
                ret: None,
            }),
            _ => None,
        })
        .collect();
    if search.is_empty() {
        return Verdict::Linearizable;
    }
    // Time-ordered entries; on equal times calls go first (the more permissive order).
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(search.len() * 2);
    for (i, s) in search.iter().enumerate() {
        let ret_time = if s.ret.is_some() {
            s.op.complete_us.max(s.op.invoke_us)
        } else {
            u64::MAX
        };
        events.push((s.op.invoke_us, true, i));
        events.push((ret_time, false, i));
    }
    events.sort_by_key(|(t, is_call, i)| (*t, !*is_call, *i));
    // entries[0] is the list head.
    let mut entries: Vec<Entry> = Vec::with_capacity(events.len() + 1);
    entries.push(Entry {
        op: NIL,
        is_call: false,
        ret_entry: NIL,
        prev: NIL,
        next: 1,
    });
    let mut ret_of = vec![NIL; search.len()];
    for (k, (_, is_call, i)) in events.iter().enumerate() {
        let idx = k + 1;
        if !is_call {
            ret_of[*i] = idx;
        }
        entries.push(Entry {
            op: *i,
            is_call: *is_call,
            ret_entry: NIL,
            prev: k,
            next: if k + 1 < events.len() { idx + 1 } else { NIL },
        });
    }
    for e in entries.iter_mut().skip(1) {
        if e.is_call {
            e.ret_entry = ret_of[e.op];
        }
    }

    // Descriptions interned, so that a state is a small number.
    let mut names: Vec<String> = Vec::new();
    let mut intern = |d: &str| -> u32 {
        match names.iter().position(|n| n == d) {
            Some(p) => p as u32,
            None => {
                names.push(d.to_string());
                (names.len() - 1) as u32
            }
        }
    };
    let interned: Vec<(Call, Option<Ret>)> = search
        .iter()
        .map(|s| (s.call.clone(), s.ret.clone()))
        .collect();
    for (c, r) in &interned {
        if let Call::Create { description } = c {
            intern(description);
        }
        if let Some(Ret::Found { description }) = r {
            intern(description);
        }
    }
    let desc_id = |d: &str| names.iter().position(|n| n == d).map(|p| p as u32);
    // Step over interned states: Some(id) present with description id.
    let istep = |state: Option<u32>, call: &Call| -> (Option<u32>, Ret) {
        match (call, state) {
            (Call::Create { description }, None) => (desc_id(description), Ret::Created),
            (Call::Create { .. }, Some(_)) => (state, Ret::AlreadyExists),
            (Call::Delete, Some(_)) => (None, Ret::Deleted),
            (Call::Delete, None) => (None, Ret::NotFound),
            (Call::Read, Some(d)) => (
                state,
                Ret::Found {
                    description: names[d as usize].clone(),
                },
            ),
            (Call::Read, None) => (None, Ret::NotFound),
        }
    };

    let lift = |entries: &mut Vec<Entry>, e: usize| {
        let (p, n) = (entries[e].prev, entries[e].next);
        entries[p].next = n;
        if n != NIL {
            entries[n].prev = p;
        }
        let r = entries[e].ret_entry;
        let (rp, rn) = (entries[r].prev, entries[r].next);
        entries[rp].next = rn;
        if rn != NIL {
            entries[rn].prev = rp;
        }
    };
    let unlift = |entries: &mut Vec<Entry>, e: usize| {
        let r = entries[e].ret_entry;
        let (rp, rn) = (entries[r].prev, entries[r].next);
        entries[rp].next = r;
        if rn != NIL {
            entries[rn].prev = r;
        }
        let (p, n) = (entries[e].prev, entries[e].next);
        entries[p].next = e;
        if n != NIL {
            entries[n].prev = e;
        }
    };

    let words = search.len().div_ceil(64);
    let mut placed = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, Option<u32>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<u32>)> = Vec::new();
    let mut state: Option<u32> = None;
    let mut definite_left = search.iter().filter(|s| s.ret.is_some()).count();
    let mut best: (usize, Vec<u64>) = (0, placed.clone());
    let mut steps = 0u64;
    let mut entry = entries[0].next;
    loop {
        if definite_left == 0 {
            return Verdict::Linearizable;
        }
        steps += 1;
        if steps > budget {
            return Verdict::Inconclusive { steps };
        }
        if entry == NIL {
            // Only returns at infinity are left after definite ops: cannot happen while
            // definite ops remain, but be safe.
            return Verdict::Linearizable;
        }
        let e = entries[entry];
        if e.is_call {
            let (call, want) = &interned[e.op];
            let (next_state, got) = istep(state, call);
            let fits = want.as_ref().is_none_or(|w| *w == got);
            if fits {
                placed[e.op / 64] |= 1 << (e.op % 64);
                if cache.insert((placed.clone(), next_state)) {
                    stack.push((entry, state));
                    state = next_state;
                    lift(&mut entries, entry);
                    if want.is_some() {
                        definite_left -= 1;
                    }
                    if stack.len() > best.0 {
                        best = (stack.len(), placed.clone());
                    }
                    entry = entries[0].next;
                    continue;
                }
                placed[e.op / 64] &= !(1 << (e.op % 64));
            }
            entry = e.next;
        } else {
            // The completion of an op not yet placed: backtrack.
            let Some((top, old_state)) = stack.pop() else {
                return Verdict::NotLinearizable {
                    explanation: explain(&search, &best.1),
                };
            };
            let op = entries[top].op;
            state = old_state;
            placed[op / 64] &= !(1 << (op % 64));
            if interned[op].1.is_some() {
                definite_left += 1;
            }
            unlift(&mut entries, top);
            entry = entries[top].next;
        }
    }
}

/// The definite operations the longest explainable prefix left unplaced, earliest
/// completion first.
fn explain(search: &[SearchOp], placed: &[u64]) -> String {
    let mut left: Vec<&SearchOp> = search
        .iter()
        .enumerate()
        .filter(|(i, s)| s.ret.is_some() && placed[i / 64] & (1 << (i % 64)) == 0)
        .map(|(_, s)| s)
        .collect();
    left.sort_by_key(|s| s.op.complete_us);
    let placed_n: u32 = placed.iter().map(|w| w.count_ones()).sum();
    let mut out = format!(
        "at most {placed_n} of {} operations can be ordered; the first that cannot:",
        search.len()
    );
    for s in left.iter().take(6) {
        out.push_str(&format!(
            "\n  op {} client {} {:?} -> {:?} [{} us .. {} us] via nodes {:?}",
            s.op.id, s.op.client, s.op.call, s.ret, s.op.invoke_us, s.op.complete_us, s.op.nodes
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{History, Op};
    use rand::{Rng, SeedableRng};

    fn create(d: &str) -> Call {
        Call::Create {
            description: d.into(),
        }
    }

    fn found(d: &str) -> Outcome {
        Outcome::Ok(Ret::Found {
            description: d.into(),
        })
    }

    fn op(client: usize, call: Call, t: (u64, u64), outcome: Outcome) -> Op {
        Op {
            id: 0,
            client,
            key: "k".into(),
            call,
            invoke_us: t.0,
            complete_us: t.1,
            outcome,
            nodes: vec![1],
        }
    }

    fn ok(r: Ret) -> Outcome {
        Outcome::Ok(r)
    }

    fn unknown() -> Outcome {
        Outcome::Unknown {
            why: "timeout".into(),
        }
    }

    fn verdict(ops: Vec<Op>) -> Verdict {
        let h = History::from_ops(ops);
        let refs: Vec<&Op> = h.ops.iter().collect();
        check_key(&refs, DEFAULT_BUDGET)
    }

    fn assert_lin(ops: Vec<Op>) {
        assert_eq!(verdict(ops), Verdict::Linearizable);
    }

    fn assert_not_lin(ops: Vec<Op>) {
        match verdict(ops) {
            Verdict::NotLinearizable { explanation } => assert!(!explanation.is_empty()),
            v => panic!("expected a violation, got {v:?}"),
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        assert_lin(vec![
            op(0, Call::Read, (0, 10), ok(Ret::NotFound)),
            op(0, create("a"), (20, 30), ok(Ret::Created)),
            op(1, create("b"), (40, 50), ok(Ret::AlreadyExists)),
            op(1, Call::Read, (60, 70), found("a")),
            op(0, Call::Delete, (80, 90), ok(Ret::Deleted)),
            op(1, Call::Delete, (100, 110), ok(Ret::NotFound)),
            op(0, Call::Read, (120, 130), ok(Ret::NotFound)),
        ]);
    }

    #[test]
    fn concurrent_ops_may_take_effect_in_either_order() {
        // The read overlaps the create: it may see the site or not.
        for seen in [found("a"), ok(Ret::NotFound)] {
            assert_lin(vec![
                op(0, create("a"), (0, 100), ok(Ret::Created)),
                op(1, Call::Read, (10, 90), seen),
            ]);
        }
        // Two overlapping creates: exactly one wins, whichever it is.
        assert_lin(vec![
            op(0, create("a"), (0, 100), ok(Ret::AlreadyExists)),
            op(1, create("b"), (10, 90), ok(Ret::Created)),
            op(2, Call::Read, (200, 210), found("b")),
        ]);
    }

    #[test]
    fn two_winning_creates_are_not_linearizable() {
        assert_not_lin(vec![
            op(0, create("a"), (0, 100), ok(Ret::Created)),
            op(1, create("b"), (10, 90), ok(Ret::Created)),
        ]);
    }

    #[test]
    fn a_stale_read_after_a_completed_delete_is_not_linearizable() {
        assert_not_lin(vec![
            op(0, create("a"), (0, 10), ok(Ret::Created)),
            op(0, Call::Delete, (20, 30), ok(Ret::Deleted)),
            op(1, Call::Read, (40, 50), found("a")),
        ]);
    }

    #[test]
    fn a_lost_acknowledged_create_is_not_linearizable() {
        assert_not_lin(vec![
            op(0, create("a"), (0, 10), ok(Ret::Created)),
            op(1, Call::Read, (20, 30), ok(Ret::NotFound)),
        ]);
    }

    #[test]
    fn reading_a_value_nobody_wrote_is_not_linearizable() {
        assert_not_lin(vec![
            op(0, create("a"), (0, 10), ok(Ret::Created)),
            op(1, Call::Read, (20, 30), found("z")),
        ]);
    }

    #[test]
    fn unknown_writes_may_apply_late_or_never() {
        // Seen by a read long after it was invoked.
        assert_lin(vec![
            op(0, create("a"), (0, 10), unknown()),
            op(1, Call::Read, (100, 110), ok(Ret::NotFound)),
            op(1, Call::Read, (200, 210), found("a")),
        ]);
        // Never seen at all.
        assert_lin(vec![
            op(0, create("a"), (0, 10), unknown()),
            op(1, Call::Read, (100, 110), ok(Ret::NotFound)),
        ]);
        // But not before it was invoked.
        assert_not_lin(vec![
            op(1, Call::Read, (0, 10), found("a")),
            op(0, create("a"), (20, 30), unknown()),
        ]);
        // And not applied twice: seen, deleted, then seen again.
        assert_not_lin(vec![
            op(0, create("a"), (0, 10), unknown()),
            op(1, Call::Read, (20, 30), found("a")),
            op(1, Call::Delete, (40, 50), ok(Ret::Deleted)),
            op(1, Call::Read, (60, 70), found("a")),
        ]);
    }

    #[test]
    fn failed_writes_never_take_effect() {
        assert_not_lin(vec![
            op(
                0,
                create("a"),
                (0, 10),
                Outcome::Fail {
                    why: "DRP-4001".into(),
                },
            ),
            op(1, Call::Read, (20, 30), found("a")),
        ]);
    }

    #[test]
    fn check_reports_per_key_and_counts() {
        let mut ops = vec![
            op(0, create("a"), (0, 10), ok(Ret::Created)),
            op(1, create("b"), (5, 15), ok(Ret::Created)),
        ];
        ops[1].key = "other".into();
        let mut bad = op(2, Call::Read, (20, 30), ok(Ret::NotFound));
        bad.key = "other".into();
        ops.push(bad);
        let r = check(&History::from_ops(ops), DEFAULT_BUDGET);
        assert_eq!(r.keys, 2);
        assert_eq!(r.ops_checked, 3);
        assert_eq!(r.violations.keys().collect::<Vec<_>>(), vec!["other"]);
        assert!(r.inconclusive.is_empty());
    }

    /// Histories made by a correct (atomic) register with random real-time intervals
    /// around each linearization point, some outcomes lost: always linearizable; the same
    /// histories with one read's answer changed to a description never written: never.
    #[test]
    fn simulated_atomic_histories_pass_and_corrupted_ones_fail() {
        for seed in 0..40u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut state: Option<String> = None;
            let mut ops = Vec::new();
            for i in 0..60u64 {
                let point = i * 100 + 500;
                let call = match rng.gen_range(0..3) {
                    0 => create(&format!("d{i}")),
                    1 => Call::Delete,
                    _ => Call::Read,
                };
                let (next, ret) = step(&state, &call);
                state = next;
                let invoke = point - rng.gen_range(1..400);
                let complete = point + rng.gen_range(1..400);
                let outcome = if call.is_write() && rng.gen_bool(0.15) {
                    unknown()
                } else {
                    ok(ret)
                };
                ops.push(op(rng.gen_range(0..8), call, (invoke, complete), outcome));
            }
            let h = History::from_ops(ops.clone());
            let r = check(&h, DEFAULT_BUDGET);
            assert!(
                r.violations.is_empty() && r.inconclusive.is_empty(),
                "seed {seed}: {r:?}"
            );
            let reads: Vec<usize> = (0..ops.len())
                .filter(|i| matches!(ops[*i].outcome, Outcome::Ok(Ret::Found { .. })))
                .collect();
            if let Some(&i) = reads.first() {
                ops[i].outcome = found("never-written");
                let r = check(&History::from_ops(ops), DEFAULT_BUDGET);
                assert_eq!(r.violations.len(), 1, "seed {seed}");
            }
        }
    }
}
