//! The native inventory and jobs endpoints through the public router, as a client sees
//! them (the fake one-node cluster applies proposals to a real store).

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use drplane_api::ControlPlane;
use drplane_statemachine::jobs::JobsCommand;
use drplane_statemachine::{Command, Outcome, Proposal};
use serde_json::{json, Value};
use support::*;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn put_json(r: &axum::Router, uri: &str, body: &Value) -> Answer {
    send(r, json_req("PUT", uri, &body.to_string())).await
}

async fn delete(r: &axum::Router, uri: &str) -> Answer {
    send(r, req("DELETE", uri)).await
}

fn host_body(site: &str, state: Option<&str>) -> Value {
    let mut b = json!({
        "site": site,
        "driver": "fs",
        "agent_address": "10.0.0.1:7000",
        "capacity": {
            "vcpus": 16,
            "ram_mb": 32768,
            "storage_pools": [{"name": "p1", "total_bytes": 1_000_000, "free_bytes": 800_000}],
        },
    });
    if let Some(s) = state {
        b["state"] = json!(s);
    }
    b
}

/// Site `s1` and host `h1` (online) in it.
async fn with_host(r: &axum::Router) {
    let a = post_json(r, "/drplane/v1/sites", r#"{"name":"s1"}"#).await;
    assert_eq!(a.status, 201, "{}", a.text());
    let a = put_json(r, "/drplane/v1/hosts/h1", &host_body("s1", Some("online"))).await;
    assert_eq!(a.status, 200, "{}", a.text());
}

fn is_rfc3339(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| s.len() == 24 && s.ends_with('Z') && s.as_bytes()[10] == b'T')
}

// ---- hosts ----

#[tokio::test]
async fn register_list_show_and_delete_hosts() {
    let (_cp, r) = setup();
    // The site must exist first.
    let a = put_json(&r, "/drplane/v1/hosts/h1", &host_body("s1", None)).await;
    let msg = assert_error(&a, 409, "DRP-3005");
    assert!(msg.contains("site 's1' not found"), "{msg}");

    with_host(&r).await;
    let a = put_json(&r, "/drplane/v1/hosts/h2", &host_body("s1", None)).await;
    assert_eq!(a.status, 200, "{}", a.text());

    let a = get(&r, "/drplane/v1/hosts").await;
    assert_eq!(a.status, 200, "{}", a.text());
    let hosts = a.json()["hosts"].as_array().expect("hosts").clone();
    assert_eq!(hosts.len(), 2);
    let h1 = &hosts[0];
    assert_eq!(h1["name"], "h1");
    assert_eq!(h1["site"], "s1");
    assert_eq!(h1["state"], "online");
    assert_eq!(h1["driver"], "fs");
    assert!(is_rfc3339(&h1["last_heartbeat"]), "{h1}");
    assert_eq!(h1["capacity"]["vcpus"], 16);
    assert_eq!(h1["capacity"]["storage_pools"][0]["free_bytes"], 800_000);
    assert_eq!(h1["available"]["pool_bytes"]["p1"], 800_000);
    assert_eq!(h1["reservations"], json!([]));
    // Registered by hand without a state: offline, never heard from.
    assert_eq!(hosts[1]["state"], "offline");
    assert_eq!(hosts[1]["last_heartbeat"], Value::Null);

    let a = get(&r, "/drplane/v1/hosts/h1?consistency=stale").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["agent_address"], "10.0.0.1:7000");
    assert_error(&get(&r, "/drplane/v1/hosts/nope").await, 404, "DRP-3001");
    assert_error(
        &get(&r, "/drplane/v1/hosts/bad%20name").await,
        400,
        "DRP-1008",
    );

    // A host with a workload is in use.
    let a = post_json(
        &r,
        "/drplane/v1/shares",
        r#"{"id":"sh1","project":"p","name":"docs","host":"h1","pool":"p1","size_bytes":10}"#,
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text());
    let msg = assert_error(&delete(&r, "/drplane/v1/hosts/h1").await, 409, "DRP-3006");
    assert!(msg.contains("workloads"), "{msg}");
    assert_eq!(delete(&r, "/drplane/v1/shares/sh1").await.status, 204);
    assert_eq!(delete(&r, "/drplane/v1/hosts/h1").await.status, 204);
    assert_error(&get(&r, "/drplane/v1/hosts/h1").await, 404, "DRP-3001");
    assert_error(&delete(&r, "/drplane/v1/hosts/h1").await, 404, "DRP-3001");
}

#[tokio::test]
async fn bad_host_bodies_are_400() {
    let (_cp, r) = setup();
    with_host(&r).await;
    let a = put_json(
        &r,
        "/drplane/v1/hosts/h1",
        &json!({"site": "s1", "colour": "red"}),
    )
    .await;
    assert_error(&a, 400, "DRP-1002");
    let a = put_json(
        &r,
        "/drplane/v1/hosts/h1",
        &json!({"site": "s1", "state": "sideways"}),
    )
    .await;
    assert_error(&a, 400, "DRP-1002");
    let a = put_json(
        &r,
        "/drplane/v1/hosts/h1",
        &json!({"site": "s1", "driver": "magic"}),
    )
    .await;
    assert_error(&a, 400, "DRP-1002");
    let mut body = host_body("s1", None);
    body["capacity"]["storage_pools"][0]["free_bytes"] = json!(2_000_000);
    let msg = assert_error(
        &put_json(&r, "/drplane/v1/hosts/h1", &body).await,
        400,
        "DRP-1008",
    );
    assert!(msg.contains("free_bytes"), "{msg}");
    let a = put_json(&r, "/drplane/v1/hosts/-h", &host_body("s1", None)).await;
    assert_error(&a, 400, "DRP-1008");
    // None of these changed h1.
    assert_eq!(get(&r, "/drplane/v1/hosts/h1").await.json()["driver"], "fs");
}

// ---- workloads ----

#[tokio::test]
async fn servers_shares_and_databases_round_trip() {
    let (_cp, r) = setup();
    with_host(&r).await;
    let a = post_json(
        &r,
        "/drplane/v1/servers",
        r#"{"project":"p1","name":"web01","host":"h1","flavor":{"vcpus":2,"ram_mb":4096},
            "disks":[{"size_bytes":1024,"pool":"p1","path":"/d/web01.img"}]}"#,
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text());
    let server = a.json();
    let id = server["id"].as_str().expect("id").to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "generated id: {id}");
    assert_eq!(
        a.header("location").as_deref(),
        Some(format!("/drplane/v1/servers/{id}").as_str())
    );
    assert_eq!(server["status"], "ACTIVE");
    assert!(uuid::Uuid::parse_str(server["disks"][0]["id"].as_str().expect("disk id")).is_ok());
    assert!(is_rfc3339(&server["created_at"]));
    // Its flavor is allocated on the host.
    let h1 = get(&r, "/drplane/v1/hosts/h1").await.json();
    assert_eq!(h1["allocated"], json!({"vcpus": 2, "ram_mb": 4096}));
    assert_eq!(h1["available"]["vcpus"], 14);

    let a = get(&r, &format!("/drplane/v1/servers/{id}")).await;
    assert_eq!(a.json()["name"], "web01");
    assert_eq!(
        get(&r, "/drplane/v1/servers?project=p1").await.json()["servers"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(
        get(&r, "/drplane/v1/servers?project=p2").await.json()["servers"],
        json!([])
    );
    assert_eq!(
        get(&r, "/drplane/v1/servers?host=h1").await.json()["servers"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    let a = post_json(
        &r,
        "/drplane/v1/databases",
        r#"{"id":"db1","project":"p1","name":"orders","host":"h1","flavor":{"vcpus":1,"ram_mb":1024},
            "volume":{"size_bytes":2048,"pool":"p1"},"datastore":{"type":"mysql","version":"8.0"}}"#,
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text());
    assert_eq!(
        a.json()["datastore"],
        json!({"type": "mysql", "version": "8.0"})
    );
    let a = post_json(
        &r,
        "/drplane/v1/shares",
        r#"{"id":"sh1","project":"p1","name":"docs","host":"h1","pool":"p1","size_bytes":10,"status":"creating"}"#,
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text());
    assert_eq!(a.json()["status"], "creating");
    assert_eq!(
        get(&r, "/drplane/v1/databases").await.json()["databases"][0]["id"],
        "db1"
    );
    assert_eq!(get(&r, "/drplane/v1/shares/sh1").await.json()["pool"], "p1");

    // References that do not exist.
    let a = post_json(
        &r,
        "/drplane/v1/shares",
        r#"{"project":"p1","name":"x","host":"h1","pool":"nope","size_bytes":1}"#,
    )
    .await;
    let msg = assert_error(&a, 409, "DRP-3005");
    assert!(msg.contains("storage pool 'h1/nope'"), "{msg}");
    let a = post_json(
        &r,
        "/drplane/v1/servers",
        r#"{"project":"p1","name":"x","host":"ghost","flavor":{"vcpus":1,"ram_mb":1}}"#,
    )
    .await;
    assert_error(&a, 409, "DRP-3005");
    // Bad input.
    let a = post_json(
        &r,
        "/drplane/v1/servers",
        r#"{"project":"p 1","name":"x","host":"h1","flavor":{"vcpus":1,"ram_mb":1}}"#,
    )
    .await;
    assert_error(&a, 400, "DRP-1008");
    let a = post_json(
        &r,
        "/drplane/v1/servers",
        r#"{"project":"p1","name":"x","host":"h1"}"#,
    )
    .await;
    assert_error(&a, 400, "DRP-1002");
    let a = post_json(
        &r,
        "/drplane/v1/servers",
        r#"{"project":"p1","name":"x","host":"h1","flavor":{"vcpus":1,"ram_mb":1},"status":"DANCING"}"#,
    )
    .await;
    assert_error(&a, 400, "DRP-1002");

    assert_eq!(
        delete(&r, &format!("/drplane/v1/servers/{id}"))
            .await
            .status,
        204
    );
    assert_error(
        &get(&r, &format!("/drplane/v1/servers/{id}")).await,
        404,
        "DRP-3001",
    );
    assert_error(
        &delete(&r, &format!("/drplane/v1/servers/{id}")).await,
        404,
        "DRP-3001",
    );
    assert_eq!(
        get(&r, "/drplane/v1/hosts/h1").await.json()["allocated"]["vcpus"],
        1
    );
}

// ---- jobs ----

async fn create_job(r: &axum::Router, body: &str) -> Value {
    let a = post_json(r, "/drplane/v1/jobs", body).await;
    assert_eq!(a.status, 201, "{}", a.text());
    let v = a.json();
    assert_eq!(
        a.header("location"),
        Some(format!(
            "/drplane/v1/jobs/{}",
            v["id"].as_str().expect("id")
        ))
    );
    v
}

#[tokio::test]
async fn create_show_and_cancel_a_test_job() {
    let (cp, r) = setup();
    with_host(&r).await;
    let job = create_job(
        &r,
        r#"{"type":"benchSleep","entities":{"purpose":"test"},"tasks":[
              {"name":"a","duration_ms":100},
              {"name":"b","duration_ms":50,"depends_on":["a"],"max_attempts":5,"fail_attempts":1,"host":"h1"}]}"#,
    )
    .await;
    let id = job["id"].as_str().expect("id").to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok());
    assert_eq!(job["type"], "benchSleep");
    assert_eq!(job["status"], "INIT");
    assert_eq!(job["project"], ADMIN_PROJECT_ID);
    assert_eq!(job["entities"], json!({"purpose": "test"}));
    assert!(is_rfc3339(&job["begin_time"]));
    assert_eq!(job["end_time"], Value::Null);
    let tasks = job["tasks"].as_array().expect("tasks");
    assert_eq!(tasks.len(), 2);
    assert_eq!(tasks[0]["id"], format!("{id}.a"));
    assert_eq!(tasks[0]["status"], "ready");
    assert_eq!(
        tasks[0]["kind"],
        json!({"type": "sleep", "duration_ms": 100, "fail_attempts": 0})
    );
    assert_eq!(tasks[0]["max_attempts"], 3);
    assert_eq!(tasks[0]["fencing_token"], Value::Null);
    assert_eq!(tasks[1]["status"], "pending");
    assert_eq!(tasks[1]["depends_on"], json!([format!("{id}.a")]));
    assert_eq!(tasks[1]["placement_host"], "h1");

    // The scheduler assigns task a (through the state machine, as the leader would).
    let lease = now_ms() + 60_000;
    let out = cp
        .propose(Proposal {
            request_id: None,
            command: Command::Jobs(JobsCommand::AssignTask {
                task_id: format!("{id}.a"),
                host: "h1".into(),
                term: 4,
                lease_until_ms: lease,
            }),
        })
        .await
        .expect("propose");
    assert!(matches!(out, Ok(Outcome::Task(_))), "{out:?}");
    let shown = get(&r, &format!("/drplane/v1/jobs/{id}")).await;
    assert_eq!(shown.status, 200, "{}", shown.text());
    let shown = shown.json();
    assert_eq!(shown["status"], "RUNNING");
    let a = &shown["tasks"][0];
    assert_eq!(a["status"], "assigned");
    assert_eq!(a["assigned_agent"], "h1");
    assert_eq!(a["attempt"], 1);
    assert_eq!(a["fencing_token"], json!({"term": 4, "attempt": 1}));
    assert!(is_rfc3339(&a["lease_expiry"]));
    assert_eq!(
        a["progress"],
        json!({"percent": 0, "bytes_done": 0, "bytes_total": 0})
    );

    // Cancel it.
    let a = post_json(&r, &format!("/drplane/v1/jobs/{id}/cancel"), "").await;
    assert_eq!(a.status, 200, "{}", a.text());
    let cancelled = a.json();
    assert_eq!(cancelled["status"], "FAIL");
    assert_eq!(cancelled["error_code"], "JOB_CANCELLED");
    assert_eq!(cancelled["fail_reason"], "cancelled by user 'admin'");
    assert!(is_rfc3339(&cancelled["end_time"]));
    for t in cancelled["tasks"].as_array().expect("tasks") {
        assert_eq!(t["status"], "cancelled", "{t}");
    }
    let msg = assert_error(
        &post_json(&r, &format!("/drplane/v1/jobs/{id}/cancel"), "").await,
        409,
        "DRP-3007",
    );
    assert!(msg.contains("already ended with FAIL"), "{msg}");
    assert_error(
        &post_json(&r, "/drplane/v1/jobs/nope/cancel", "").await,
        404,
        "DRP-3001",
    );
    assert_error(&get(&r, "/drplane/v1/jobs/nope").await, 404, "DRP-3001");
    assert_error(&get(&r, "/drplane/v1/jobs/bad%20id").await, 400, "DRP-1008");
    assert_error(
        &send(&r, req("DELETE", &format!("/drplane/v1/jobs/{id}"))).await,
        405,
        "DRP-2002",
    );
}

#[tokio::test]
async fn bad_test_jobs_are_refused_before_anything_is_stored() {
    let (cp, r) = setup();
    with_host(&r).await;
    let before = cp.proposals();
    let cases = [
        (r#"{"tasks":[]}"#, 400, "DRP-1008", "at least one task"),
        (
            r#"{"tasks":[{"name":"a","duration_ms":1,"depends_on":["b"]},{"name":"b","duration_ms":1,"depends_on":["a"]}]}"#,
            400,
            "DRP-1008",
            "cycle",
        ),
        (
            r#"{"tasks":[{"name":"a","duration_ms":1,"depends_on":["zz"]}]}"#,
            400,
            "DRP-1008",
            "not a task",
        ),
        (
            r#"{"tasks":[{"name":"a","duration_ms":1},{"name":"a","duration_ms":1}]}"#,
            400,
            "DRP-1008",
            "twice",
        ),
        (
            r#"{"tasks":[{"name":"a b","duration_ms":1}]}"#,
            400,
            "DRP-1008",
            "tasks.name",
        ),
        (
            r#"{"tasks":[{"name":"a","duration_ms":1,"max_attempts":0}]}"#,
            400,
            "DRP-1008",
            "max_attempts",
        ),
        (
            r#"{"tasks":[{"name":"a","duration_ms":99999999999}]}"#,
            400,
            "DRP-1008",
            "duration_ms",
        ),
        (
            r#"{"type":"no spaces","tasks":[{"name":"a","duration_ms":1}]}"#,
            400,
            "DRP-1008",
            "type",
        ),
        (
            r#"{"tasks":[{"name":"a"}]}"#,
            400,
            "DRP-1002",
            "duration_ms",
        ),
        (
            r#"{"tasks":[{"name":"a","duration_ms":1,"speed":2}]}"#,
            400,
            "DRP-1002",
            "speed",
        ),
        (r#"{"tasks":"#, 400, "DRP-1001", ""),
    ];
    for (body, status, code, needle) in cases {
        let a = post_json(&r, "/drplane/v1/jobs", body).await;
        let msg = assert_error(&a, status, code);
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    assert_eq!(cp.proposals(), before, "refused before proposing");
    // A pinned host that does not exist is refused by the state machine.
    let a = post_json(
        &r,
        "/drplane/v1/jobs",
        r#"{"tasks":[{"name":"a","duration_ms":1,"host":"ghost"}]}"#,
    )
    .await;
    let msg = assert_error(&a, 409, "DRP-3005");
    assert!(msg.contains("host 'ghost'"), "{msg}");
    assert_eq!(get(&r, "/drplane/v1/jobs").await.json()["jobs"], json!([]));
}

#[tokio::test]
async fn a_retried_create_with_the_same_idempotency_key_makes_one_job() {
    let (_cp, r) = setup();
    let body = r#"{"tasks":[{"name":"a","duration_ms":1}]}"#;
    let with_key = || {
        let mut q = json_req("POST", "/drplane/v1/jobs", body);
        q.headers_mut()
            .insert("idempotency-key", "job-key-1".parse().expect("header"));
        q
    };
    let first = send(&r, with_key()).await;
    let second = send(&r, with_key()).await;
    assert_eq!(first.status, 201, "{}", first.text());
    assert_eq!(second.status, 201, "{}", second.text());
    assert_eq!(first.json()["id"], second.json()["id"]);
    assert_eq!(
        get(&r, "/drplane/v1/jobs").await.json()["jobs"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
}

#[tokio::test]
async fn list_jobs_filters_and_pages() {
    let (_cp, r) = setup();
    let mut ids = Vec::new();
    for i in 0..5 {
        let ty = if i % 2 == 0 { "even" } else { "odd" };
        let body = json!({"type": ty, "tasks": [{"name": "a", "duration_ms": 1}]}).to_string();
        ids.push(
            create_job(&r, &body).await["id"]
                .as_str()
                .expect("id")
                .to_string(),
        );
        // Distinct begin times: the list is newest first.
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
    let cancelled = post_json(&r, &format!("/drplane/v1/jobs/{}/cancel", ids[1]), "").await;
    assert_eq!(cancelled.status, 200);
    let list = |v: &Value| -> Vec<String> {
        v["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .map(|j| j["id"].as_str().expect("id").to_string())
            .collect()
    };
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    let all = get(&r, "/drplane/v1/jobs").await.json();
    assert_eq!(list(&all), newest_first);
    assert_eq!(all["next_marker"], Value::Null);
    assert!(
        all["jobs"][0].get("tasks").is_none(),
        "the list has no tasks"
    );
    assert_eq!(all["jobs"][0]["task_count"], 1);

    let page1 = get(&r, "/drplane/v1/jobs?limit=2").await.json();
    assert_eq!(list(&page1), newest_first[..2]);
    let marker = page1["next_marker"].as_str().expect("marker").to_string();
    assert_eq!(marker, newest_first[1]);
    let page2 = get(&r, &format!("/drplane/v1/jobs?limit=2&marker={marker}"))
        .await
        .json();
    assert_eq!(list(&page2), newest_first[2..4]);

    let odd = get(&r, "/drplane/v1/jobs?type=odd").await.json();
    assert_eq!(list(&odd), vec![ids[3].clone(), ids[1].clone()]);
    let failed = get(&r, "/drplane/v1/jobs?status=FAIL").await.json();
    assert_eq!(list(&failed), vec![ids[1].clone()]);
    let init = get(
        &r,
        &format!("/drplane/v1/jobs?status=init&project={ADMIN_PROJECT_ID}"),
    )
    .await
    .json();
    assert_eq!(list(&init).len(), 4);
    assert_eq!(
        get(&r, "/drplane/v1/jobs?project=other").await.json()["jobs"],
        json!([])
    );

    for (q, needle) in [
        ("status=DONE", "status"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("marker=not-a-job", "marker"),
        ("type=a%20b", "type"),
    ] {
        let a = get(&r, &format!("/drplane/v1/jobs?{q}")).await;
        let msg = assert_error(&a, 400, "DRP-1011");
        assert!(msg.contains(needle), "{q}: {msg}");
    }
    assert_error(
        &get(&r, "/drplane/v1/jobs?consistency=eventual").await,
        400,
        "DRP-1006",
    );
}

/// A member of project `ops`: its token and the project's id.
async fn ops_member(r: &axum::Router) -> (String, String) {
    let a = post_json(r, "/drplane/v1/identity/projects", r#"{"name":"ops"}"#).await;
    assert_eq!(a.status, 201, "{}", a.text());
    let project_id = a.json()["id"].as_str().expect("project id").to_string();
    let a = post_json(
        r,
        "/drplane/v1/identity/users",
        r#"{"name":"olga","password":"password-olga-1","project":"ops","role":"member"}"#,
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text());
    let a = post_json(
        r,
        "/drplane/v1/identity/tokens",
        r#"{"user":"olga","project":"ops"}"#,
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text());
    (
        a.json()["token"].as_str().expect("token").to_string(),
        project_id,
    )
}

async fn as_member(r: &axum::Router, token: &str, method: &str, uri: &str) -> Answer {
    let mut q = req(method, uri);
    q.headers_mut()
        .insert("x-auth-token", token.parse().expect("header"));
    send_raw(r, q).await
}

#[tokio::test]
async fn a_project_sees_only_its_own_jobs_and_no_inventory() {
    let (_cp, r) = setup();
    let (token, ops) = ops_member(&r).await;
    let mine = create_job(
        &r,
        &json!({"project": ops, "tasks": [{"name": "a", "duration_ms": 1}]}).to_string(),
    )
    .await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let theirs = create_job(&r, r#"{"tasks":[{"name":"a","duration_ms":1}]}"#).await["id"]
        .as_str()
        .expect("id")
        .to_string();

    let a = as_member(&r, &token, "GET", "/drplane/v1/jobs").await;
    assert_eq!(a.status, 200, "{}", a.text());
    let listed: Vec<Value> = a.json()["jobs"].as_array().expect("jobs").clone();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], mine.as_str());
    let a = as_member(
        &r,
        &token,
        "GET",
        &format!("/drplane/v1/jobs?project={ADMIN_PROJECT_ID}"),
    )
    .await;
    assert_eq!(a.json()["jobs"], json!([]));
    assert_eq!(
        as_member(&r, &token, "GET", &format!("/drplane/v1/jobs/{mine}"))
            .await
            .status,
        200
    );
    // Another project's job is indistinguishable from a missing one.
    let a = as_member(&r, &token, "GET", &format!("/drplane/v1/jobs/{theirs}")).await;
    assert_error(&a, 404, "DRP-3001");
    let a = as_member(
        &r,
        &token,
        "POST",
        &format!("/drplane/v1/jobs/{theirs}/cancel"),
    )
    .await;
    assert_error(&a, 404, "DRP-3001");
    let a = as_member(
        &r,
        &token,
        "GET",
        &format!("/drplane/v1/jobs?marker={theirs}"),
    )
    .await;
    assert_error(&a, 400, "DRP-1011");
    // A member may cancel its own project's job, but not create test jobs or see hosts.
    let a = as_member(
        &r,
        &token,
        "POST",
        &format!("/drplane/v1/jobs/{mine}/cancel"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["fail_reason"], "cancelled by user 'olga'");
    assert_error(
        &as_member(&r, &token, "GET", "/drplane/v1/hosts").await,
        403,
        "DRP-6002",
    );
    assert_error(
        &as_member(&r, &token, "GET", "/drplane/v1/servers").await,
        403,
        "DRP-6002",
    );
    let mut q = json_req(
        "POST",
        "/drplane/v1/jobs",
        r#"{"tasks":[{"name":"a","duration_ms":1}]}"#,
    );
    q.headers_mut()
        .insert("x-auth-token", token.parse().expect("header"));
    assert_error(&send_raw(&r, q).await, 403, "DRP-6002");
}
