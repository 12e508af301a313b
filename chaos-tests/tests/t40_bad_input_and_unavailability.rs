//! Bad input against a real node gets a 4xx JSON error and never a panic; without a quorum
//! the API answers 503 with Retry-After within a bounded time instead of hanging.

use std::time::{Duration, Instant};

use chaos_tests::Cluster;
use serde_json::{json, Value};

const TIMING: &[&str] = &[
    "--heartbeat-ms",
    "60",
    "--election-min-ms",
    "300",
    "--election-max-ms",
    "600",
    "--request-timeout-ms",
    "3000",
];

fn assert_json_error(r: &chaos_tests::Reply, status: u16) {
    assert_eq!(r.status, status, "{}", r.text);
    assert!(
        r.body["error"]["code"]
            .as_str()
            .is_some_and(|c| c.starts_with("DRP-")),
        "native error shape expected: {}",
        r.text
    );
    assert!(
        r.body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{}",
        r.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_json_4xx_and_no_quorum_gets_503() -> anyhow::Result<()> {
    let mut c = Cluster::start(&["site-a", "site-b", "site-c"], TIMING).await?;
    let follower = {
        let l = c.wait_leader(Duration::from_secs(10)).await?;
        c.ids().into_iter().find(|id| *id != l).expect("follower")
    };
    let url = format!("{}/drplane/v1/sites", c.url(follower));
    let raw = |body: &'static str, ct: &'static str| {
        let http = c.http.clone();
        let url = url.clone();
        async move {
            let r = http
                .post(url)
                .header("content-type", ct)
                .body(body)
                .send()
                .await?;
            let status = r.status().as_u16();
            let text = r.text().await?;
            Ok::<_, anyhow::Error>(chaos_tests::Reply {
                status,
                retry_after: None,
                content_type: None,
                body: serde_json::from_str(&text).unwrap_or(Value::Null),
                text,
            })
        }
    };
    assert_json_error(&raw("{\"name\": ", "application/json").await?, 400);
    assert_json_error(&raw("{\"name\": 5}", "application/json").await?, 400);
    assert_json_error(
        &raw("{\"name\": \"a\", \"colour\": \"red\"}", "application/json").await?,
        400,
    );
    assert_json_error(
        &raw("{\"description\": \"no name\"}", "application/json").await?,
        400,
    );
    assert_json_error(
        &raw("name=a", "application/x-www-form-urlencoded").await?,
        415,
    );
    assert_json_error(
        &c.post(follower, "/drplane/v1/sites", &json!({"name": "bad name!"}))
            .await?,
        400,
    );
    let big = json!({"name": "big", "description": "x".repeat(2 << 20)});
    assert_json_error(&c.post(follower, "/drplane/v1/sites", &big).await?, 413);
    assert_json_error(&c.get(follower, "/drplane/v1/nothing-here").await?, 404);
    assert_json_error(
        &c.request(
            follower,
            reqwest::Method::PATCH,
            "/drplane/v1/sites",
            None,
            &[],
        )
        .await?,
        405,
    );
    assert_json_error(
        &c.get(follower, "/drplane/v1/sites?consistency=sometimes")
            .await?,
        400,
    );
    assert_json_error(&c.get(follower, "/drplane/v1/sites/nope").await?, 404);
    let r = c
        .post(follower, "/drplane/v1/sites", &json!({"name": "twice"}))
        .await?;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_json_error(
        &c.post(follower, "/drplane/v1/sites", &json!({"name": "twice"}))
            .await?,
        409,
    );
    // The node is still healthy after all of that.
    let r = c.get(follower, "/livez").await?;
    assert_eq!(r.status, 200);

    // Lose the quorum: the survivor answers 503 + Retry-After within a bounded time.
    let survivor = follower;
    for id in c.ids() {
        if id != survivor {
            c.kill(id)?;
        }
    }
    let started = Instant::now();
    let r = c
        .post(survivor, "/drplane/v1/sites", &json!({"name": "no-quorum"}))
        .await?;
    let took = started.elapsed();
    assert_json_error(&r, 503);
    assert!(r.retry_after.is_some(), "503 must carry Retry-After");
    assert!(
        took < Duration::from_secs(8),
        "answered only after {took:?}"
    );
    let started = Instant::now();
    let r = c.get(survivor, "/drplane/v1/sites").await?;
    assert_json_error(&r, 503);
    assert!(started.elapsed() < Duration::from_secs(8));
    // Stale reads still work on the survivor.
    let r = c
        .get(survivor, "/drplane/v1/sites/twice?consistency=stale")
        .await?;
    assert_eq!(r.status, 200, "{}", r.text);
    // And it is not ready.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = c.get(survivor, "/readyz").await?;
        if r.status == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "survivor still claims ready: {}",
            r.text
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
