//! A recorded history of operations on the sites API: what each client asked, when, and
//! what it learnt.
//!
//! Sites are independent records keyed by name, so the history is checked key by key
//! (linearizability is compositional). Per key the model is `Option<description>`: absent
//! or present with the description of the create that made it.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// What a client asked of one site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "snake_case")]
pub enum Call {
    /// `POST /drplane/v1/sites {name, description}`.
    Create { description: String },
    /// `DELETE /drplane/v1/sites/{name}`.
    Delete,
    /// `GET /drplane/v1/sites/{name}` (linearizable).
    Read,
}

impl Call {
    pub fn is_write(&self) -> bool {
        !matches!(self, Call::Read)
    }
}

/// What the cluster answered, as the model sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "snake_case")]
pub enum Ret {
    /// 201: the create made the site.
    Created,
    /// 409 `DRP-3002`: the site existed.
    AlreadyExists,
    /// 204: the delete removed the site.
    Deleted,
    /// 404 `DRP-3001` to a delete or a read: there was no site.
    NotFound,
    /// 200 to a read: the site, with its description.
    Found { description: String },
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "o", rename_all = "snake_case")]
pub enum Outcome {
    /// A definite answer: the operation took effect once, with this result.
    Ok(Ret),
    /// Certainly not applied (every attempt was refused before it reached the log:
    /// `DRP-4001`, `DRP-4004`, connection refused, 401).
    Fail { why: String },
    /// May or may not have been applied (timeouts, `DRP-4002`, connections lost after the
    /// request was sent, 5xx).
    Unknown { why: String },
}

/// One operation of one client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// Index in the history.
    pub id: usize,
    pub client: usize,
    /// The site name.
    pub key: String,
    pub call: Call,
    /// Microseconds since the run started: when the first attempt was sent...
    pub invoke_us: u64,
    /// ... and when the last attempt was answered (or given up).
    pub complete_us: u64,
    pub outcome: Outcome,
    /// Nodes the attempts went to, in order.
    pub nodes: Vec<u64>,
}

/// A whole run's history.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct History {
    pub ops: Vec<Op>,
}

/// Operation counts by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub ok: u64,
    pub failed: u64,
    pub unknown: u64,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.ok + self.failed + self.unknown
    }

    pub fn add(&mut self, o: &Counts) {
        self.ok += o.ok;
        self.failed += o.failed;
        self.unknown += o.unknown;
    }
}

impl History {
    /// Renumber the ops by invocation time and return the history.
    pub fn from_ops(mut ops: Vec<Op>) -> History {
        ops.sort_by_key(|o| (o.invoke_us, o.complete_us, o.client));
        for (i, o) in ops.iter_mut().enumerate() {
            o.id = i;
        }
        History { ops }
    }

    /// The ops on each key, in invocation order.
    pub fn by_key(&self) -> BTreeMap<&str, Vec<&Op>> {
        let mut m: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
        for o in &self.ops {
            m.entry(o.key.as_str()).or_default().push(o);
        }
        m
    }

    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for o in &self.ops {
            match o.outcome {
                Outcome::Ok(_) => c.ok += 1,
                Outcome::Fail { .. } => c.failed += 1,
                Outcome::Unknown { .. } => c.unknown += 1,
            }
        }
        c
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self).context("encoding the history")?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    pub fn load(path: &Path) -> anyhow::Result<History> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("decoding {}", path.display()))
    }
}
