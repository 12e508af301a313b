//! Pre-vote (`raft/src/election.rs`): a follower cut off from the other two for many
//! leader leases keeps asking for pre-votes that nobody grants, so it never raises its
//! term; when the link comes back it rejoins as a follower and the leader keeps leading in
//! the same term. (With openraft's own election timer the isolated node would start an
//! election every timeout, and its higher term would depose the healthy leader on return.)

use std::time::{Duration, Instant};

use chaos_tests::net::Net;
use chaos_tests::Cluster;
use serde_json::{json, Value};

/// Slower elections for CI: see [`chaos_tests::SLOW_ELECTIONS`].
const TIMING: &[&str] = chaos_tests::SLOW_ELECTIONS;

async fn term_and_leader(c: &Cluster, id: u64) -> anyhow::Result<(u64, Option<u64>)> {
    let r = c.get(id, "/drplane/v1/cluster?consistency=stale").await?;
    anyhow::ensure!(r.status == 200, "status of node {id}: {}", r.text);
    let term = r.body["term"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no term in {}", r.text))?;
    Ok((term, r.body.get("leader_id").and_then(Value::as_u64)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_follower_does_not_depose_the_leader_when_it_returns() -> anyhow::Result<()> {
    Net::available().map_err(|e| anyhow::anyhow!("this test needs root: {e}"))?;
    let mut c = Cluster::start_in_net(&["site-a", "site-b", "site-c"], TIMING, &[]).await?;
    let leader = c.wait_leader(Duration::from_secs(10)).await?;
    let ids = c.ids();
    let isolated = *ids.iter().find(|id| **id != leader).expect("a follower");
    let others: Vec<u64> = ids.iter().copied().filter(|id| *id != isolated).collect();
    let (term0, _) = term_and_leader(&c, leader).await?;

    c.net
        .as_mut()
        .ok_or_else(|| anyhow::anyhow!("no network"))?
        .partition(&[isolated], &others)?;
    // Five leases (600 ms each) without a leader: the isolated node asks for pre-votes all
    // along. The majority side keeps working meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = c
        .post(
            leader,
            "/drplane/v1/sites",
            &json!({"name": "during-partition", "description": "written by the majority"}),
        )
        .await?;
    assert_eq!(r.status, 201, "write on the majority side: {}", r.text);
    let (term_isolated, leader_isolated) = term_and_leader(&c, isolated).await?;
    assert_eq!(
        term_isolated,
        term0,
        "the isolated node raised its term without a granted pre-vote; its log:\n{}",
        c.log_tail(isolated, 40)
    );
    // Cut off for five leases, it no longer names the old leader, and says how long it
    // has been without one.
    let view = c
        .get(isolated, "/drplane/v1/cluster?consistency=stale")
        .await?;
    assert_eq!(
        leader_isolated, None,
        "node {isolated} still names a leader it cannot reach: {}",
        view.text
    );
    let contact_ms = view.body["leader_contact_ms"].as_u64().unwrap_or(0);
    assert!(
        contact_ms >= 2000,
        "leader_contact_ms after 3 s cut off: {}",
        view.text
    );
    let flagged: Vec<&Value> = view.body["members"]
        .as_array()
        .map(|m| m.iter().filter(|m| m["leader"] == json!(true)).collect())
        .unwrap_or_default();
    assert!(
        flagged.is_empty(),
        "a member is flagged leader: {}",
        view.text
    );

    c.net
        .as_mut()
        .ok_or_else(|| anyhow::anyhow!("no network"))?
        .heal()?;
    // It catches up as a follower: a linearizable read on it sees the majority's write.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = c
            .get(isolated, "/drplane/v1/sites/during-partition")
            .await?;
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {isolated} did not catch up after the heal: {} {}",
            r.status,
            r.text
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give a disruptive election every chance to happen, then check nobody moved.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for id in c.ids() {
        let (term, seen_leader) = term_and_leader(&c, id).await?;
        assert_eq!(term, term0, "node {id}: the term changed after the heal");
        assert_eq!(seen_leader, Some(leader), "node {id}: the leader changed");
        let view = c.get(id, "/drplane/v1/cluster?consistency=stale").await?;
        if id != leader {
            let ms = view.body["leader_contact_ms"].as_u64();
            assert!(
                ms.is_some_and(|ms| ms < 600),
                "node {id} hears from the leader again: {}",
                view.text
            );
        }
    }
    Ok(())
}
