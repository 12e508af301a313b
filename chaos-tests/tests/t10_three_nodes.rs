//! Three real nodes (real RocksDB, real gRPC): write through a follower, read
//! linearizably from every node, lose the leader, catch a restarted node up by log replay
//! and by snapshot install.

use std::time::{Duration, Instant};

use chaos_tests::Cluster;
use serde_json::json;

/// Slower elections for CI: see [`chaos_tests::SLOW_ELECTIONS`].
const TIMING: &[&str] = chaos_tests::SLOW_ELECTIONS;

async fn create_site(c: &Cluster, via: u64, name: &str) -> anyhow::Result<chaos_tests::Reply> {
    c.post(
        via,
        "/drplane/v1/sites",
        &json!({"name": name, "description": format!("site {name}")}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_via_follower_read_everywhere_survive_leader_loss_and_replay_log(
) -> anyhow::Result<()> {
    let mut c = Cluster::start(&["site-a", "site-b", "site-c"], TIMING).await?;
    let leader = c.wait_leader(Duration::from_secs(10)).await?;
    let follower = c
        .ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");

    // Write through a follower: forwarded to the leader, answered by the follower.
    let r = create_site(&c, follower, "dc-east").await?;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["name"], "dc-east");
    assert_eq!(r.body["description"], "site dc-east");

    // Linearizable read on every node sees it, right away.
    for id in c.ids() {
        let r = c.get(id, "/drplane/v1/sites/dc-east").await?;
        assert_eq!(r.status, 200, "node {id}: {}", r.text);
        assert_eq!(r.body["name"], "dc-east", "node {id}");
    }
    // The cluster view agrees on one leader with three voters.
    let status = c.status(follower).await?;
    assert_eq!(status["leader_id"].as_u64(), Some(leader));
    let members = status["members"].as_array().expect("members");
    assert_eq!(members.len(), 3);
    assert!(members.iter().all(|m| m["role"] == "voter"));
    assert_eq!(members.iter().filter(|m| m["leader"] == true).count(), 1);

    // Kill the leader; a write through a survivor is acknowledged within 2 s.
    c.kill(leader)?;
    let killed_at = Instant::now();
    let survivor = c
        .ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("survivor");
    let acked = loop {
        let r = create_site(&c, survivor, "after-kill").await?;
        if r.status == 201 {
            break killed_at.elapsed();
        }
        assert_eq!(
            r.status, 503,
            "only 503 is acceptable while electing: {}",
            r.text
        );
        assert!(r.retry_after.is_some(), "503 must carry Retry-After");
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "no leader after 10 s"
        );
    };
    eprintln!("leader kill -> acknowledged write: {acked:?}");
    assert!(
        acked < Duration::from_secs(2),
        "write acknowledged only after {acked:?}"
    );

    // More writes while the old leader is down, then restart it: it replays and catches up.
    for i in 0..20 {
        let r = create_site(&c, survivor, &format!("while-down-{i}")).await?;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    c.restart(leader)?;
    c.wait_ready(leader, Duration::from_secs(20)).await?;
    let expected = c.site_names(survivor, "linearizable").await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = c.site_names(leader, "stale").await?;
        if got == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "restarted node has {got:?}, want {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(expected.contains(&"after-kill".to_string()));
    assert!(expected.contains(&"dc-east".to_string()));
    assert!(
        !c.log_text(leader).contains("installed snapshot"),
        "this restart must catch up by log replay"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_far_behind_catches_up_by_snapshot() -> anyhow::Result<()> {
    let mut args = TIMING.to_vec();
    args.extend(["--snapshot-logs", "20", "--keep-logs", "5"]);
    let mut c = Cluster::start(&["site-a", "site-b", "site-c"], &args).await?;
    let leader = c.wait_leader(Duration::from_secs(10)).await?;
    let lagging = c
        .ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("follower");
    c.stop(lagging)?;
    for i in 0..120 {
        let r = create_site(&c, leader, &format!("s-{i:03}")).await?;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    // The leader compacted its log behind a snapshot; the lagging node can only catch up
    // by installing it, streamed over gRPC.
    c.restart(lagging)?;
    c.wait_ready(lagging, Duration::from_secs(30)).await?;
    let expected = c.site_names(leader, "linearizable").await?;
    assert_eq!(
        expected.len(),
        123,
        "120 written + 3 node sites: {expected:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = c.site_names(lagging, "stale").await?;
        if got == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lagging node has {} of {}",
            got.len(),
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        c.log_text(lagging).contains("installed snapshot"),
        "catch-up must have gone through a snapshot:\n{}",
        c.log_tail(lagging, 40)
    );
    // And it keeps working as a member after the install.
    let r = create_site(&c, lagging, "after-install").await?;
    assert_eq!(r.status, 201, "{}", r.text);
    Ok(())
}

/// One counter from `/metrics` on node `id`.
async fn metric(c: &Cluster, id: u64, name: &str) -> anyhow::Result<u64> {
    let text = c.get(id, "/metrics").await?.text;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .map(|v| v as u64)
        .ok_or_else(|| anyhow::anyhow!("no {name} in /metrics of node {id}"))
}

/// Sequential writes on the leader: the commit-only AppendEntries that openraft sends after
/// each commit are answered by the leader itself (`drplane_raft_commit_only_held_total`
/// grows), new entries reach the followers before the leader's own sync (eager appends),
/// yet every follower still applies every write within a heartbeat or two, a write
/// through a follower is readable on that follower when it is answered, and every node's
/// commit and applied indexes meet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_learn_held_back_commits_from_the_next_message() -> anyhow::Result<()> {
    let mut c = Cluster::start(&["site-a", "site-b", "site-c"], TIMING).await?;
    let leader = c.wait_leader(Duration::from_secs(10)).await?;
    let followers: Vec<u64> = c.ids().into_iter().filter(|id| *id != leader).collect();

    let held_before = metric(&c, leader, "drplane_raft_commit_only_held_total").await?;
    let used_before = metric(&c, leader, "drplane_raft_eager_answers_used_total").await?;
    for i in 0..40 {
        let r = create_site(&c, leader, &format!("seq-{i:02}")).await?;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    let held = metric(&c, leader, "drplane_raft_commit_only_held_total").await? - held_before;
    // Two followers, one commit-only message each per write when the writes are spaced.
    assert!(
        held >= 20,
        "only {held} commit-only messages held back over 40 writes"
    );
    // Spaced writes find both followers caught up: their entries go out before the
    // leader's own sync, and the replication streams use those answers.
    let used = metric(&c, leader, "drplane_raft_eager_answers_used_total").await? - used_before;
    assert!(used >= 20, "only {used} eager answers used over 40 writes");

    // The last write reaches every follower's state machine without any further write.
    let started = Instant::now();
    for &f in &followers {
        loop {
            let names = c.site_names(f, "stale").await?;
            if names.iter().any(|n| n == "seq-39") {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "follower {f} has not applied the last write after {:?}: {names:?}",
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Every node's applied index reaches the leader's commit index.
    let commit = metric(&c, leader, "drplane_raft_commit_index").await?;
    for id in c.ids() {
        let applied = metric(&c, id, "drplane_raft_applied_index").await?;
        assert!(
            applied >= commit,
            "node {id} applied {applied} < commit {commit}"
        );
    }

    // A write through a follower is on that follower when it is answered (read your
    // write, no barrier), and on the other follower right after a linearizable read.
    let r = create_site(&c, followers[0], "via-follower").await?;
    assert_eq!(r.status, 201, "{}", r.text);
    let names = c.site_names(followers[0], "stale").await?;
    assert!(names.iter().any(|n| n == "via-follower"), "{names:?}");
    let names = c.site_names(followers[1], "linearizable").await?;
    assert!(names.iter().any(|n| n == "via-follower"), "{names:?}");
    c.kill(leader)?;
    Ok(())
}
