//! The `AgentControl` gRPC service (agent/proto/control.proto), served next to the Raft
//! service on every node's raft address.
//!
//! Only the leader keeps a session: a follower (or a leader whose scheduler stopped)
//! answers one `Redirect` with the leader's raft address and closes the stream; a
//! just-elected leader makes the agent wait up to a few seconds for its scheduler. On the
//! leader a session is: `Hello` (within 10 s) ─► host and workloads recorded ─► `Welcome`
//! ─► the host's current assignments re-sent ─► heartbeats and reports until the agent
//! leaves, a newer session of the same host replaces it, or leadership ends (then the
//! agent gets `Redirect` to the new leader).

// tonic::Status is large by its authors' design and is what the stream speaks.
#![allow(clippy::result_large_err)]

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use drplane_agent::control::pb::agent_control_server::{AgentControl, AgentControlServer};
use drplane_agent::control::pb::{AgentFrame, ControlFrame};
use drplane_agent::control::{
    AgentMessage, ControlMessage, Hello, ProtocolError, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
use drplane_statemachine::command::validate_site_name;
use drplane_statemachine::inventory::validate_host_name;
use futures::Stream;
use tokio::sync::{mpsc, Notify};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::scheduler::{AgentTx, Leadership, Report, ReportKind, Scheduler};

/// An agent must say Hello this soon after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a just-elected leader lets an agent wait for its scheduler.
const STARTING_WAIT: Duration = Duration::from_secs(5);
/// Frames queued towards one agent.
const OUTBOUND_QUEUE: usize = 8192;

pub struct AgentService {
    scheduler: Arc<Scheduler>,
}

/// The tonic service to mount on this node's raft address.
pub fn agent_service(scheduler: Arc<Scheduler>) -> AgentControlServer<AgentService> {
    AgentControlServer::new(AgentService { scheduler })
        .max_decoding_message_size(MAX_FRAME_BYTES)
        .max_encoding_message_size(MAX_FRAME_BYTES)
}

type ControlStream = Pin<Box<dyn Stream<Item = Result<ControlFrame, Status>> + Send + 'static>>;

fn frame(msg: &ControlMessage) -> Result<ControlFrame, Status> {
    msg.to_frame()
        .map_err(|e| Status::internal(format!("cannot encode {}: {e}", msg.kind())))
}

#[tonic::async_trait]
impl AgentControl for AgentService {
    type ConnectStream = ControlStream;

    async fn connect(
        &self,
        request: Request<Streaming<AgentFrame>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let remote = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let lead = if self.scheduler.is_leader() {
            self.scheduler.wait_active(STARTING_WAIT).await
        } else {
            None
        };
        match lead {
            Some(lead) => {
                let sched = self.scheduler.clone();
                let span = tracing::info_span!("agent_session", remote = %remote, term = lead.term);
                tokio::spawn(session(sched, lead, inbound, tx).instrument(span));
            }
            None => {
                if self.scheduler.is_leader() {
                    return Err(Status::unavailable(
                        "this node was just elected and its scheduler is not running yet; retry",
                    ));
                }
                let hint = self.scheduler.leader_hint();
                tracing::debug!(remote = %remote, leader = ?hint.leader, "redirecting an agent to the leader");
                let redirect = ControlMessage::Redirect {
                    leader_id: hint.leader_id,
                    leader: hint.leader,
                };
                // The queue is empty: this cannot block.
                let _ = tx.try_send(frame(&redirect));
            }
        }
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }
}

async fn read_hello(inbound: &mut Streaming<AgentFrame>) -> Result<Option<Hello>, Status> {
    let first = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(f))) => f,
        Ok(Ok(None)) => return Ok(None),
        Ok(Err(status)) => return Err(status),
        Err(_) => {
            return Err(Status::deadline_exceeded(format!(
                "no Hello within {} s",
                HELLO_TIMEOUT.as_secs()
            )))
        }
    };
    let hello = match AgentMessage::from_frame(&first) {
        Ok(AgentMessage::Hello(h)) => *h,
        Ok(other) => {
            return Err(Status::invalid_argument(format!(
                "the first frame must be Hello, not {}",
                other.kind()
            )))
        }
        Err(e) => return Err(Status::invalid_argument(e.to_string())),
    };
    if hello.protocol != PROTOCOL_VERSION {
        return Err(Status::failed_precondition(
            ProtocolError::Version {
                got: hello.protocol,
            }
            .to_string(),
        ));
    }
    validate_host_name("host.name", &hello.host.name)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    validate_site_name(&hello.host.site)
        .map_err(|e| Status::invalid_argument(format!("host.site: {e}")))?;
    Ok(Some(hello))
}

async fn session(
    sched: Arc<Scheduler>,
    lead: Arc<Leadership>,
    mut inbound: Streaming<AgentFrame>,
    tx: AgentTx,
) {
    let hello = match read_hello(&mut inbound).await {
        Ok(Some(h)) => h,
        Ok(None) => return,
        Err(status) => {
            tracing::warn!(error = %status.message(), "agent refused before Hello");
            let _ = tx.send(Err(status)).await;
            return;
        }
    };
    let host = hello.host.name.clone();
    let span = tracing::info_span!("agent", host = %host, site = %hello.host.site);
    async move {
        let warnings = match sched.register_agent(&lead, &hello).await {
            Ok(w) => w,
            Err(status) => {
                tracing::warn!(error = %status.message(), "agent registration refused");
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        let welcome = ControlMessage::Welcome {
            leader_id: sched.node_id(),
            term: lead.term,
            warnings,
        };
        if tx.send(frame(&welcome)).await.is_err() {
            return;
        }
        let kick = Arc::new(Notify::new());
        let session = lead.attach(&host, tx.clone(), kick.clone());
        tracing::info!(
            session,
            driver = ?hello.host.driver,
            data_address = %hello.host.data_address,
            version = %hello.agent_version,
            "agent connected"
        );
        sched.resync(&lead, &host);
        lead.wake();
        let ended = loop {
            tokio::select! {
                _ = lead.stopped() => {
                    let hint = sched.leader_hint();
                    let redirect = ControlMessage::Redirect {
                        leader_id: hint.leader_id.filter(|l| *l != sched.node_id()),
                        leader: if hint.leader_id == Some(sched.node_id()) { None } else { hint.leader },
                    };
                    let _ = tx.try_send(frame(&redirect));
                    break "leadership ended; agent redirected".to_string();
                }
                _ = kick.notified() => break "session replaced or congested".to_string(),
                msg = inbound.message() => match msg {
                    Ok(Some(f)) => match AgentMessage::from_frame(&f) {
                        Ok(AgentMessage::Heartbeat { pools }) => lead.seen(&host, session, Some(pools)),
                        Ok(AgentMessage::Progress { task_id, token, progress }) => {
                            lead.seen(&host, session, None);
                            lead.report(Report::new(host.clone(), task_id, token, ReportKind::Progress(progress))).await;
                        }
                        Ok(AgentMessage::Result { task_id, token, outcome }) => {
                            lead.seen(&host, session, None);
                            tracing::debug!(task = %task_id, token = %token, "result received");
                            lead.report(Report::new(host.clone(), task_id, token, ReportKind::Result(outcome))).await;
                        }
                        Ok(AgentMessage::Hello(_)) => {
                            let _ = tx.send(Err(Status::invalid_argument("Hello sent twice"))).await;
                            break "protocol violation: Hello twice".to_string();
                        }
                        Err(e) => {
                            let _ = tx.send(Err(Status::invalid_argument(e.to_string()))).await;
                            break format!("bad frame: {e}");
                        }
                    },
                    Ok(None) => break "the agent closed the session".to_string(),
                    Err(status) => break format!("stream broke: {}", status.message()),
                },
            }
        };
        lead.detach(&host, session);
        tracing::info!(session, reason = %ended, "agent disconnected");
    }
    .instrument(span)
    .await
}
