//! Membership through the operator's CLI: add a fourth node as a learner, promote it,
//! remove another; the site-majority rule refuses what would let one site stop the
//! cluster, and --force overrides it.

use std::time::{Duration, Instant};

use chaos_tests::{cli, Cluster};
use serde_json::{json, Value};

/// Slower elections for CI: see [`chaos_tests::SLOW_ELECTIONS`].
const TIMING: &[&str] = chaos_tests::SLOW_ELECTIONS;

fn members(json_text: &str) -> anyhow::Result<Vec<Value>> {
    let v: Value = serde_json::from_str(json_text)?;
    let arr = v
        .as_array()
        .cloned()
        .or_else(|| v["members"].as_array().cloned())
        .ok_or_else(|| anyhow::anyhow!("no members in {json_text}"))?;
    Ok(arr)
}

fn role_of(members: &[Value], id: u64) -> Option<String> {
    members
        .iter()
        .find(|m| m["id"].as_u64() == Some(id))
        .and_then(|m| m["role"].as_str().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_promote_remove_with_the_site_majority_rule() -> anyhow::Result<()> {
    let mut c = Cluster::start(&["site-a", "site-b", "site-c"], TIMING).await?;
    let endpoint = c.url(2); // any member will do: requests are forwarded to the leader
    c.spawn_new(4, "site-a")?;
    c.wait_live(4, Duration::from_secs(20)).await?;
    let spec = c.spec(4)?.clone();

    let (ok, out, err) = cli(&[
        "cluster",
        "add",
        "--endpoint",
        &endpoint,
        "--id",
        "4",
        "--site",
        "site-a",
        "--http",
        &spec.http,
        "--raft",
        &spec.raft,
    ])?;
    assert!(ok, "add failed: {out}{err}");
    let (ok, out, err) = cli(&["cluster", "members", "--endpoint", &endpoint, "-o", "json"])?;
    assert!(ok, "{err}");
    let m = members(&out)?;
    assert_eq!(m.len(), 4, "{out}");
    assert_eq!(role_of(&m, 4).as_deref(), Some("learner"));

    // The learner catches up and serves reads.
    c.wait_ready(4, Duration::from_secs(20)).await?;
    let r = c
        .post(1, "/drplane/v1/sites", &json!({"name": "m1"}))
        .await?;
    assert_eq!(r.status, 201, "{}", r.text);
    let r = c.get(4, "/drplane/v1/sites/m1").await?;
    assert_eq!(r.status, 200, "{}", r.text);

    // Promote: 4 voters, site-a holds 2 of 4, not a majority.
    let (ok, out, err) = cli(&["cluster", "promote", "--endpoint", &endpoint, "--id", "4"])?;
    assert!(ok, "promote failed: {out}{err}");
    let (_, out, _) = cli(&["cluster", "members", "--endpoint", &endpoint, "-o", "json"])?;
    assert_eq!(
        role_of(&members(&out)?, 4).as_deref(),
        Some("voter"),
        "{out}"
    );

    // Removing node 2 (site-b) would leave site-a with 2 of 3 voters: refused.
    let (ok, out, err) = cli(&["cluster", "remove", "--endpoint", &c.url(3), "--id", "2"])?;
    assert!(!ok, "remove must be refused: {out}");
    assert!(
        err.contains("site-a") && err.contains("force"),
        "the refusal names the site and --force: {err}"
    );
    let (_, out, _) = cli(&["cluster", "members", "--endpoint", &endpoint, "-o", "json"])?;
    assert_eq!(
        role_of(&members(&out)?, 2).as_deref(),
        Some("voter"),
        "nothing changed: {out}"
    );

    // The same refusal over HTTP is a 409 in the native error shape.
    let r = c
        .request(
            1,
            reqwest::Method::DELETE,
            "/drplane/v1/cluster/members/2",
            None,
            &[],
        )
        .await?;
    assert_eq!(r.status, 409, "{}", r.text);
    assert!(r.body["error"]["code"].is_string(), "{}", r.text);

    // Demote node 3 (site-c) would also leave a site-a majority: refused.
    let (ok, _, err) = cli(&["cluster", "demote", "--endpoint", &endpoint, "--id", "3"])?;
    assert!(!ok && err.contains("site-a"), "{err}");

    // --force allows it.
    let (ok, out, err) = cli(&[
        "cluster",
        "remove",
        "--endpoint",
        &c.url(3),
        "--id",
        "2",
        "--force",
    ])?;
    assert!(ok, "forced remove failed: {out}{err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, out, _) = cli(&["cluster", "members", "--endpoint", &c.url(1), "-o", "json"])?;
        let m = members(&out)?;
        if m.len() == 3 && role_of(&m, 2).is_none() {
            assert_eq!(role_of(&m, 4).as_deref(), Some("voter"));
            break;
        }
        assert!(Instant::now() < deadline, "node 2 still listed: {out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The cluster without node 2 still takes writes.
    c.stop(2)?;
    let r = c
        .post(4, "/drplane/v1/sites", &json!({"name": "after-remove"}))
        .await?;
    assert_eq!(r.status, 201, "{}", r.text);

    // Unknown members and bad ids are clear errors.
    let (ok, _, err) = cli(&["cluster", "promote", "--endpoint", &c.url(1), "--id", "99"])?;
    assert!(!ok && err.contains("99"), "{err}");
    let r = c
        .post(1, "/drplane/v1/cluster/members/abc/promote", &Value::Null)
        .await?;
    assert_eq!(r.status, 400, "{}", r.text);
    // Initializing a member again is refused.
    let (ok, _, err) = cli(&["cluster", "init", "--endpoint", &c.url(1)])?;
    assert!(!ok && err.contains("initialized"), "{err}");
    Ok(())
}
