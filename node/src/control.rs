//! The glue between the HTTP API's [`ControlPlane`] trait and this node's [`RaftNode`].

use std::sync::Arc;

use async_trait::async_trait;
use drplane_api::control::{
    ClusterError, ClusterStatus, Consistency, ControlPlane, Health, MemberInfo, NewMember, Role,
};
use drplane_raft::forward::NodeError;
use drplane_raft::{MembershipChange, NodeInfo, RaftNode};
use drplane_statemachine::{CommandResult, Proposal, Store};

pub struct NodeControl {
    pub node: Arc<RaftNode>,
    /// The leader's scheduler (its metrics are appended to this node's).
    pub scheduler: Option<Arc<crate::scheduler::Scheduler>>,
}

fn map_err(e: NodeError) -> ClusterError {
    match e {
        NodeError::NotLeader { leader } => ClusterError::Unavailable {
            reason: format!("leadership is moving (last known leader {leader:?})"),
            retry_after_secs: 1,
        },
        NodeError::Unavailable(reason) => ClusterError::Unavailable {
            reason,
            retry_after_secs: 1,
        },
        NodeError::Unknown(m) => ClusterError::Unknown(m),
        NodeError::Refused(m) => ClusterError::Refused(m),
        NodeError::BadRequest(m) => ClusterError::BadRequest(m),
        NodeError::NotFound(m) => ClusterError::NotFound(m),
        NodeError::Internal(m) => ClusterError::Internal(m),
    }
}

impl NodeControl {
    async fn status(&self) -> ClusterStatus {
        let view = self.node.cluster_view().await;
        ClusterStatus {
            node_id: view.node_id,
            leader_id: view.leader_id,
            leader_contact_ms: view.leader_contact_ms,
            term: view.term,
            state: view.state,
            last_log_index: view.last_log_index,
            commit_index: view.commit_index,
            applied_index: view.applied_index,
            members: view
                .members
                .into_iter()
                .map(|m| MemberInfo {
                    id: m.id,
                    site: m.info.site,
                    http: m.info.http,
                    raft: m.info.raft,
                    role: if m.voter { Role::Voter } else { Role::Learner },
                    leader: m.leader,
                    matched_index: m.matched_index,
                    lag: m.lag,
                })
                .collect(),
        }
    }

    async fn change(
        &self,
        change: MembershipChange,
        force: bool,
    ) -> Result<ClusterStatus, ClusterError> {
        self.node
            .change_membership(change, force)
            .await
            .map_err(map_err)?;
        Ok(self.status().await)
    }
}

#[async_trait]
impl ControlPlane for NodeControl {
    fn node_id(&self) -> u64 {
        self.node.id
    }

    async fn propose(&self, proposal: Proposal) -> Result<CommandResult, ClusterError> {
        self.node.propose(proposal).await.map_err(map_err)
    }

    async fn read_barrier(&self, consistency: Consistency) -> Result<(), ClusterError> {
        match consistency {
            Consistency::Stale => Ok(()),
            Consistency::Linearizable => self.node.read_barrier().await.map_err(map_err),
        }
    }

    fn store(&self) -> &Store {
        self.node.store()
    }

    async fn catch_up_local(&self) -> Result<(), ClusterError> {
        self.node.apply_known_commits().await.map_err(map_err)
    }

    async fn cluster_status(&self) -> Result<ClusterStatus, ClusterError> {
        Ok(self.status().await)
    }

    async fn init_cluster(&self) -> Result<ClusterStatus, ClusterError> {
        self.node.initialize().await.map_err(map_err)?;
        Ok(self.status().await)
    }

    async fn add_learner(&self, member: NewMember) -> Result<ClusterStatus, ClusterError> {
        drplane_statemachine::command::validate_site_name(&member.site)
            .map_err(|e| ClusterError::BadRequest(format!("site: {e}")))?;
        for (what, addr) in [("http", &member.http), ("raft", &member.raft)] {
            if !valid_host_port(addr) {
                return Err(ClusterError::BadRequest(format!(
                    "{what} address '{addr}' is not host:port"
                )));
            }
        }
        let info = NodeInfo {
            site: member.site,
            http: member.http,
            raft: member.raft,
        };
        self.node
            .add_learner(member.id, info)
            .await
            .map_err(map_err)?;
        Ok(self.status().await)
    }

    async fn promote(&self, id: u64, force: bool) -> Result<ClusterStatus, ClusterError> {
        self.change(MembershipChange::Promote(id), force).await
    }

    async fn demote(&self, id: u64, force: bool) -> Result<ClusterStatus, ClusterError> {
        self.change(MembershipChange::Demote(id), force).await
    }

    async fn remove(&self, id: u64, force: bool) -> Result<ClusterStatus, ClusterError> {
        self.change(MembershipChange::Remove(id), force).await
    }

    fn health(&self) -> Health {
        let (ready, reason) = self.node.readiness();
        Health { ready, reason }
    }

    fn metrics_text(&self) -> String {
        let mut text = self.node.metrics_text();
        if let Some(s) = &self.scheduler {
            text.push_str(&s.metrics_text());
        }
        text.push_str(&replication_metrics(
            self.node.store(),
            drplane_raft::now_ms(),
        ));
        text
    }
}

/// Per-pair recovery point and bytes sent, and pairs by state, from this node's store.
fn replication_metrics(store: &drplane_statemachine::Store, now_ms: u64) -> String {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;
    let pairs = match store.list_pairs() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read replication pairs for metrics");
            return String::new();
        }
    };
    let esc = |v: &str| {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    };
    let mut out = String::new();
    let mut by_state: BTreeMap<&str, u64> = BTreeMap::new();
    for p in &pairs {
        *by_state.entry(p.state.as_str()).or_default() += 1;
    }
    out.push_str("# HELP drplane_replication_pairs Replication pairs by state.\n");
    out.push_str("# TYPE drplane_replication_pairs gauge\n");
    for state in ["creating", "active", "failed_over", "error"] {
        let n = by_state.get(state).copied().unwrap_or(0);
        let _ = writeln!(out, "drplane_replication_pairs{{state=\"{state}\"}} {n}");
    }
    out.push_str(
        "# HELP drplane_replication_rpo_seconds Age of the data the pair's target holds \
         (now minus the start of its last successful sync).\n",
    );
    out.push_str("# TYPE drplane_replication_rpo_seconds gauge\n");
    for p in &pairs {
        if let Some(rpo) = p.rpo_seconds(now_ms) {
            let _ = writeln!(
                out,
                "drplane_replication_rpo_seconds{{pair=\"{}\",owner=\"{}\",project=\"{}\"}} {rpo:.3}",
                esc(&p.id),
                esc(&p.owner),
                esc(&p.project)
            );
        }
    }
    out.push_str("# HELP drplane_replication_bytes_sent_total Bytes the pair's syncs sent.\n");
    out.push_str("# TYPE drplane_replication_bytes_sent_total counter\n");
    for p in &pairs {
        let _ = writeln!(
            out,
            "drplane_replication_bytes_sent_total{{pair=\"{}\"}} {}",
            esc(&p.id),
            p.bytes_sent_total
        );
    }
    out
}

/// `host:port` with a non-empty host and a numeric port.
pub fn valid_host_port(addr: &str) -> bool {
    match addr.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok()
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::valid_host_port;

    #[test]
    fn host_port() {
        assert!(valid_host_port("127.0.0.1:7001"));
        assert!(valid_host_port("node-a.example:80"));
        assert!(valid_host_port("[::1]:80"));
        assert!(!valid_host_port("127.0.0.1"));
        assert!(!valid_host_port(":80"));
        assert!(!valid_host_port("http://x:80"));
        assert!(!valid_host_port("x:99999"));
    }
}
