//! The workload: many concurrent clients (tokio tasks) creating, deleting and reading
//! sites through the public HTTP API of random nodes, recording every operation.
//!
//! Keys rotate: during epoch `e` (a few seconds) the clients use keys `c<run>-e<e>-k<j>`,
//! so each key's history stays short enough to check exhaustively while the whole run is
//! long. A write carries an `Idempotency-Key` unique to the operation; when an attempt ends
//! without a definite answer (503, timeout, lost connection) the client retries the same
//! operation, with the same key, on another node until the operation's deadline, so the
//! cluster applies it at most once and most operations end definite. A few clients
//! (`one_shot_clients`) never retry, so that unknown and failed outcomes stay in the
//! history too.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::history::{Call, Op, Outcome, Ret};

/// How the clients behave.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    pub clients: usize,
    pub keys_per_epoch: usize,
    pub epoch: Duration,
    /// One HTTP attempt's timeout.
    pub attempt_timeout: Duration,
    /// How long one operation may keep retrying.
    pub op_deadline: Duration,
    /// Clients 0..one_shot_clients send each operation once and never retry, so that
    /// timeouts and 503s stay in the history as unknown or failed outcomes.
    pub one_shot_clients: usize,
    /// Pause between a client's operations (random up to this).
    pub think: Duration,
    /// Prefix of every key (must make a valid site name).
    pub key_prefix: String,
    /// Take a write's `503 DRP-4001` (ClusterUnavailable) at its word: certainly not
    /// applied, as api/ERRORS.md documents. False treats it as unknown. Default:
    /// [`unavailable_is_definite_default`].
    pub unavailable_is_definite: bool,
    pub seed: u64,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            clients: 8,
            keys_per_epoch: 3,
            epoch: Duration::from_secs(4),
            attempt_timeout: Duration::from_millis(2500),
            op_deadline: Duration::from_secs(6),
            one_shot_clients: 3,
            think: Duration::from_millis(30),
            key_prefix: "chaos".into(),
            unavailable_is_definite: unavailable_is_definite_default(),
            seed: 1,
        }
    }
}

/// Whether a write's `DRP-4001` counts as "certainly not applied", as the API documents:
/// yes unless `CHAOS_STRICT_4001=0`. (Chaos runs once found a follower answering
/// `DRP-4001` after its forwarded proposal timed out — after it was sent — and the new
/// leader committed it; since the fix such an answer is `DRP-4002`, outcome unknown.
/// `t84_unavailable_means_not_applied` checks it.)
pub fn unavailable_is_definite_default() -> bool {
    std::env::var("CHAOS_STRICT_4001").map_or(true, |v| v != "0")
}

/// The nodes clients may talk to: (id, base URL); updated as membership changes.
pub type Endpoints = Arc<RwLock<Vec<(u64, String)>>>;

/// A running workload; [`Workload::stop`] ends it and returns the operations.
pub struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Op>>>,
    pub started: Instant,
    /// Operations finished so far (any outcome).
    pub done: Arc<AtomicU64>,
    /// Operations that ended definite (`Ok`).
    pub acknowledged: Arc<AtomicU64>,
    keys: Arc<Mutex<BTreeSet<String>>>,
}

impl Workload {
    /// Start `cfg.clients` clients against `endpoints` with `http` (which carries the
    /// credentials).
    pub fn start(http: reqwest::Client, endpoints: Endpoints, cfg: WorkloadConfig) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let done = Arc::new(AtomicU64::new(0));
        let acknowledged = Arc::new(AtomicU64::new(0));
        let keys = Arc::new(Mutex::new(BTreeSet::new()));
        let tasks = (0..cfg.clients)
            .map(|client| {
                let c = ClientCtx {
                    client,
                    http: http.clone(),
                    endpoints: endpoints.clone(),
                    cfg: cfg.clone(),
                    started,
                    stop: stop.clone(),
                    done: done.clone(),
                    acknowledged: acknowledged.clone(),
                    keys: keys.clone(),
                };
                tokio::spawn(c.run())
            })
            .collect();
        Workload {
            stop,
            tasks,
            started,
            done,
            acknowledged,
            keys,
        }
    }

    /// Microseconds since the workload started.
    pub fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// Every key used so far.
    pub fn keys(&self) -> BTreeSet<String> {
        self.keys.lock().map(|k| k.clone()).unwrap_or_default()
    }

    /// Stop the clients (each finishes its current operation) and collect the operations.
    pub async fn stop(self) -> anyhow::Result<Vec<Op>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut ops = Vec::new();
        for t in self.tasks {
            ops.extend(t.await?);
        }
        Ok(ops)
    }
}

struct ClientCtx {
    client: usize,
    http: reqwest::Client,
    endpoints: Endpoints,
    cfg: WorkloadConfig,
    started: Instant,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    acknowledged: Arc<AtomicU64>,
    keys: Arc<Mutex<BTreeSet<String>>>,
}

impl ClientCtx {
    async fn run(self) -> Vec<Op> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.cfg.seed.wrapping_mul(1_000_003) ^ self.client as u64,
        );
        let mut ops = Vec::new();
        let mut seq = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            let epoch = self.started.elapsed().as_millis() as u64
                / self.cfg.epoch.as_millis().max(1) as u64;
            let key = format!(
                "{}-e{epoch}-k{}",
                self.cfg.key_prefix,
                rng.gen_range(0..self.cfg.keys_per_epoch.max(1))
            );
            if let Ok(mut k) = self.keys.lock() {
                k.insert(key.clone());
            }
            let call = match rng.gen_range(0..100) {
                0..=39 => Call::Create {
                    description: format!("c{}-{seq}", self.client),
                },
                40..=64 => Call::Delete,
                _ => Call::Read,
            };
            seq += 1;
            let idem = format!("{}-c{}-{seq}", self.cfg.key_prefix, self.client);
            let mut cfg = self.cfg.clone();
            if self.client < self.cfg.one_shot_clients {
                cfg.op_deadline = Duration::ZERO;
            }
            let op = run_op(
                &self.http,
                &self.endpoints,
                &cfg,
                self.started,
                &mut rng,
                self.client,
                &key,
                call,
                &idem,
            )
            .await;
            self.done.fetch_add(1, Ordering::Relaxed);
            if matches!(op.outcome, Outcome::Ok(_)) {
                self.acknowledged.fetch_add(1, Ordering::Relaxed);
            }
            ops.push(op);
            let think = self.cfg.think.as_millis() as u64;
            if think > 0 {
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..=think))).await;
            }
        }
        ops
    }
}

/// One attempt's classification.
enum Attempt {
    Done(Ret),
    /// Certainly not applied.
    Refused(String),
    /// Maybe applied.
    Maybe(String),
}

/// Run one operation to a definite answer or its deadline, through random nodes.
#[allow(clippy::too_many_arguments)]
pub async fn run_op(
    http: &reqwest::Client,
    endpoints: &Endpoints,
    cfg: &WorkloadConfig,
    started: Instant,
    rng: &mut rand::rngs::StdRng,
    client: usize,
    key: &str,
    call: Call,
    idempotency_key: &str,
) -> Op {
    let now_us = || started.elapsed().as_micros() as u64;
    let invoke_us = now_us();
    let deadline = Instant::now() + cfg.op_deadline;
    let mut nodes = Vec::new();
    let mut maybe: Option<String> = None;
    let mut last_refusal = String::from("no node to ask");
    let outcome = loop {
        let target = {
            let eps = endpoints.read().map(|e| e.clone()).unwrap_or_default();
            if eps.is_empty() {
                None
            } else {
                Some(eps[rng.gen_range(0..eps.len())].clone())
            }
        };
        if let Some((id, url)) = target {
            nodes.push(id);
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = if cfg.op_deadline.is_zero() {
                cfg.attempt_timeout
            } else {
                cfg.attempt_timeout.min(left).max(Duration::from_millis(50))
            };
            let strict = cfg.unavailable_is_definite;
            match attempt(http, &url, key, &call, idempotency_key, timeout, strict).await {
                Attempt::Done(ret) => break Outcome::Ok(ret),
                Attempt::Refused(why) => last_refusal = why,
                Attempt::Maybe(why) => {
                    // A read that got no answer did nothing; a write may have.
                    if call.is_write() {
                        maybe = Some(why);
                    } else {
                        last_refusal = why;
                    }
                }
            }
        }
        if Instant::now() + Duration::from_millis(60) >= deadline {
            break match maybe.take() {
                Some(why) => Outcome::Unknown { why },
                None => Outcome::Fail { why: last_refusal },
            };
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(20..60))).await;
    };
    Op {
        id: 0,
        client,
        key: key.to_string(),
        call,
        invoke_us,
        complete_us: now_us(),
        outcome,
        nodes,
    }
}

async fn attempt(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    call: &Call,
    idempotency_key: &str,
    timeout: Duration,
    unavailable_is_definite: bool,
) -> Attempt {
    let req = match call {
        Call::Create { description } => http
            .post(format!("{base}/drplane/v1/sites"))
            .header("Idempotency-Key", idempotency_key)
            .json(&json!({"name": key, "description": description})),
        Call::Delete => http
            .delete(format!("{base}/drplane/v1/sites/{key}"))
            .header("Idempotency-Key", idempotency_key),
        Call::Read => http.get(format!("{base}/drplane/v1/sites/{key}")),
    };
    let resp = match req.timeout(timeout).send().await {
        Ok(r) => r,
        // Nothing reached the node: not applied.
        Err(e) if e.is_connect() => return Attempt::Refused(format!("connect: {e}")),
        Err(e) if e.is_timeout() => return Attempt::Maybe("timeout".into()),
        Err(e) => return Attempt::Maybe(format!("transport: {e}")),
    };
    let status = resp.status().as_u16();
    let text = match resp.text().await {
        Ok(t) => t,
        Err(e) => return Attempt::Maybe(format!("{status}, body lost: {e}")),
    };
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let code = body["error"]["code"].as_str().unwrap_or("").to_string();
    match (call, status, code.as_str()) {
        (Call::Create { .. }, 201, _) => Attempt::Done(Ret::Created),
        (Call::Create { .. }, 409, "DRP-3002") => Attempt::Done(Ret::AlreadyExists),
        (Call::Delete, 204, _) => Attempt::Done(Ret::Deleted),
        (Call::Delete, 404, "DRP-3001") => Attempt::Done(Ret::NotFound),
        (Call::Read, 200, _) => match body["description"].as_str() {
            Some(d) => Attempt::Done(Ret::Found {
                description: d.to_string(),
            }),
            None => Attempt::Maybe(format!("200 without a description: {text}")),
        },
        (Call::Read, 404, "DRP-3001") => Attempt::Done(Ret::NotFound),
        // Refused before reaching the log.
        (Call::Read, 503, "DRP-4001") | (_, 503, "DRP-4004") | (_, 401, _) => {
            Attempt::Refused(format!("{status} {code}"))
        }
        (_, 503, "DRP-4001") if unavailable_is_definite => {
            Attempt::Refused(format!("{status} {code}"))
        }
        (_, 503, "DRP-4001") => Attempt::Maybe(format!("{status} {code}")),
        (_, 503, "DRP-4002") => Attempt::Maybe(format!("{status} {code}")),
        _ => Attempt::Maybe(format!("unexpected {status} {}", truncate(&text, 200))),
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
