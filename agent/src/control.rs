//! The agent control protocol: what an agent and the leader's scheduler say to each other
//! over `AgentControl.Connect` (`proto/control.proto`).
//!
//! ```text
//!  agent                                   leader (any node answers; only the leader keeps it)
//!    │── Hello{host, workloads} ─────────────►│ RegisterHost (online) + RegisterWorkloads
//!    │◄──────────────── Welcome{leader, term} ─│ then Assign for every task the host holds
//!    │── Heartbeat{pools}  (every second) ────►│ Heartbeat proposed at most every few seconds
//!    │◄──────── Assign{task, kind, token, lease}│ after AssignTask committed
//!    │── Progress{task, token, progress} ─────►│ ReportProgress (extends the lease)
//!    │── Result{task, token, outcome} ────────►│ ReportResult (refused if the token is stale)
//!    │◄──────────────────────── Cancel{task} ──│ the job ended or the task moved elsewhere
//!  a follower answers: Redirect{leader's raft address} and closes the stream
//! ```
//!
//! Every frame's payload is `[version byte][bincode]` through the state machine's codec, of
//! [`AgentMessage`] (agent → node) or [`ControlMessage`] (node → agent). New variants and
//! fields go at the end; [`PROTOCOL_VERSION`] in `Hello` lets a node refuse an agent it
//! cannot serve with a clear error instead of misreading it.
//!
//! Idempotency: an agent executes a task at most once per task id. An `Assign` for a task
//! it already runs adopts the newer token; one for a task it finished re-reports the
//! result (a success under the newer token, since the work is done; a failure is retried).
//! So the scheduler may re-send `Assign` whenever it is unsure what an agent knows (after
//! a reconnect, a leader change, a lost report).

use drplane_statemachine::codec;
use drplane_statemachine::inventory::{Capacity, Driver as HostDriver, StoragePool, Workload};
use drplane_statemachine::jobs::{FencingToken, Progress, TaskKind, TaskOutcome};
use serde::{Deserialize, Serialize};

/// Generated from `proto/control.proto`.
pub mod pb {
    tonic::include_proto!("drplane.control.v1");
}

/// The protocol an agent speaks, sent in [`Hello`]. A node refuses other versions.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame either side accepts (a `Hello` with 1024 workloads fits easily).
pub const MAX_FRAME_BYTES: usize = 16 << 20;

/// Why a frame could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("cannot encode {what}: {reason}")]
    Encode { what: &'static str, reason: String },
    #[error("malformed {what} frame: {reason}")]
    Decode { what: &'static str, reason: String },
    #[error(
        "agent protocol version {got} is not supported (this binary speaks {PROTOCOL_VERSION})"
    )]
    Version { got: u32 },
    #[error("protocol violation: {0}")]
    Violation(String),
}

/// The host an agent runs on, as it registers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub name: String,
    pub site: String,
    pub driver: HostDriver,
    pub capacity: Capacity,
    /// Where other agents reach this agent's data service (the driver's sync endpoint:
    /// `http://ip:port` for fs, `sim://host` for sim).
    pub data_address: String,
}

/// The first frame of every session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub host: HostInfo,
    /// Servers, shares and database instances on this host.
    pub workloads: Vec<Workload>,
    /// The agent binary's version, for logs.
    pub agent_version: String,
}

/// Agent → node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMessage {
    Hello(Box<Hello>),
    /// Sent every second; `pools` as the driver last reported them.
    Heartbeat {
        pools: Vec<StoragePool>,
    },
    /// How far the task's current attempt got.
    Progress {
        task_id: String,
        token: FencingToken,
        progress: Progress,
    },
    /// The end of the attempt that `token` names.
    Result {
        task_id: String,
        token: FencingToken,
        outcome: TaskOutcome,
    },
}

impl AgentMessage {
    pub fn kind(&self) -> &'static str {
        match self {
            AgentMessage::Hello(_) => "hello",
            AgentMessage::Heartbeat { .. } => "heartbeat",
            AgentMessage::Progress { .. } => "progress",
            AgentMessage::Result { .. } => "result",
        }
    }

    pub fn to_frame(&self) -> Result<pb::AgentFrame, ProtocolError> {
        let data = codec::encode(self).map_err(|e| ProtocolError::Encode {
            what: self.kind(),
            reason: e.to_string(),
        })?;
        Ok(pb::AgentFrame { data: data.into() })
    }

    pub fn from_frame(frame: &pb::AgentFrame) -> Result<Self, ProtocolError> {
        codec::decode(&frame.data).map_err(|e| ProtocolError::Decode {
            what: "agent",
            reason: e.to_string(),
        })
    }
}

/// One task given to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub task_id: String,
    pub job_id: String,
    pub kind: TaskKind,
    /// Every report about this attempt must carry it.
    pub token: FencingToken,
    /// The leader renews it while the agent is connected and alive.
    pub lease_until_ms: u64,
    /// Data addresses of the other hosts the task involves (host name → the address its
    /// agent's sync service listens on), e.g. a sync's source.
    pub peers: std::collections::BTreeMap<String, String>,
}

/// Node → agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlMessage {
    /// The session is accepted by the leader of `term`. `warnings` name what it could not
    /// record (e.g. a workload the inventory refused).
    Welcome {
        leader_id: u64,
        term: u64,
        warnings: Vec<String>,
    },
    /// This node is not the leader: connect to `leader` (a raft address, `host:port`), or
    /// look again later when it is `None` (an election is under way).
    Redirect {
        leader_id: Option<u64>,
        leader: Option<String>,
    },
    Assign(Box<Assignment>),
    /// Stop working on the task: its job ended, or it was given to another host.
    Cancel {
        task_id: String,
    },
}

impl ControlMessage {
    pub fn kind(&self) -> &'static str {
        match self {
            ControlMessage::Welcome { .. } => "welcome",
            ControlMessage::Redirect { .. } => "redirect",
            ControlMessage::Assign(_) => "assign",
            ControlMessage::Cancel { .. } => "cancel",
        }
    }

    pub fn to_frame(&self) -> Result<pb::ControlFrame, ProtocolError> {
        let data = codec::encode(self).map_err(|e| ProtocolError::Encode {
            what: self.kind(),
            reason: e.to_string(),
        })?;
        Ok(pb::ControlFrame { data: data.into() })
    }

    pub fn from_frame(frame: &pb::ControlFrame) -> Result<Self, ProtocolError> {
        codec::decode(&frame.data).map_err(|e| ProtocolError::Decode {
            what: "control",
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn frames_round_trip_and_refuse_unknown_versions() {
        let hello = AgentMessage::Hello(Box::new(Hello {
            protocol: PROTOCOL_VERSION,
            host: HostInfo {
                name: "h1".into(),
                site: "s1".into(),
                driver: HostDriver::Sim,
                capacity: Capacity {
                    vcpus: 4,
                    ram_mb: 1024,
                    pools: vec![StoragePool {
                        name: "default".into(),
                        total_bytes: 10,
                        free_bytes: 5,
                    }],
                },
                data_address: "sim://h1".into(),
            },
            workloads: Vec::new(),
            agent_version: "0.1.0".into(),
        }));
        let frame = hello.to_frame().expect("encode");
        assert_eq!(AgentMessage::from_frame(&frame).expect("decode"), hello);

        let token = FencingToken {
            term: 3,
            attempt: 2,
        };
        let result = AgentMessage::Result {
            task_id: "t".into(),
            token,
            outcome: TaskOutcome::Succeeded {
                output: BTreeMap::new(),
            },
        };
        let frame = result.to_frame().expect("encode");
        assert_eq!(AgentMessage::from_frame(&frame).expect("decode"), result);

        let assign = ControlMessage::Assign(Box::new(Assignment {
            peers: Default::default(),
            task_id: "t".into(),
            job_id: "j".into(),
            kind: TaskKind::Sleep {
                duration_ms: 5,
                fail_attempts: 1,
            },
            token,
            lease_until_ms: 99,
        }));
        let mut frame = assign.to_frame().expect("encode");
        assert_eq!(ControlMessage::from_frame(&frame).expect("decode"), assign);

        let mut bytes = frame.data.to_vec();
        bytes[0] = bytes[0].wrapping_add(1);
        frame.data = bytes.into();
        let err = ControlMessage::from_frame(&frame).expect_err("unknown version");
        assert!(err.to_string().contains("not supported"), "{err}");
        assert!(AgentMessage::from_frame(&pb::AgentFrame::default()).is_err());
    }
}
