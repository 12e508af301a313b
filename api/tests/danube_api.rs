//! The Danube family (DANUBE-*) through the public router: shapes, status codes, headers,
//! the task API and the ES-STREAM answer (the fake one-node cluster applies proposals to a
//! real store; no agent runs the tasks).

mod support;

use axum::body::Body;
use axum::http::Request;
use drplane_api::ControlPlane;
use drplane_statemachine::inventory::{
    Capacity, Disk, Driver, Flavor, HostRegistration, HostState, InventoryCommand, Server,
    ServerStatus, StoragePool, Workload,
};
use drplane_statemachine::{Command, Proposal};
use serde_json::{json, Value};
use support::*;

async fn apply(cp: &FakeCluster, command: Command) {
    cp.propose(Proposal {
        request_id: None,
        command,
    })
    .await
    .expect("propose")
    .expect("applied");
}

async fn world() -> (std::sync::Arc<FakeCluster>, axum::Router, String) {
    let (cp, r) = setup();
    for s in ["s1", "s2"] {
        apply(
            &cp,
            Command::CreateSite {
                name: s.into(),
                description: String::new(),
            },
        )
        .await;
    }
    for (h, s) in [("n1", "s1"), ("n2", "s2")] {
        apply(
            &cp,
            Command::Inventory(InventoryCommand::RegisterHost(Box::new(HostRegistration {
                name: h.into(),
                site: s.into(),
                driver: Driver::Sim,
                agent_address: String::new(),
                capacity: Capacity {
                    vcpus: 8,
                    ram_mb: 16384,
                    pools: vec![StoragePool {
                        name: "default".into(),
                        total_bytes: 1 << 30,
                        free_bytes: 1 << 30,
                    }],
                },
                state: Some(HostState::Online),
            }))),
        )
        .await;
    }
    apply(
        &cp,
        Command::Inventory(InventoryCommand::RegisterWorkloads {
            workloads: vec![Workload::Server(Server {
                id: "vm-uuid-1".into(),
                project: ADMIN_PROJECT_ID.into(),
                name: "web01".into(),
                host: "n1".into(),
                status: ServerStatus::Active,
                flavor: Flavor {
                    vcpus: 2,
                    ram_mb: 2048,
                },
                disks: vec![Disk {
                    id: "vm-uuid-1-root".into(),
                    size_bytes: 1 << 20,
                    pool: "default".into(),
                    path: String::new(),
                }],
                created_at_ms: 0,
                updated_at_ms: 0,
            })],
        }),
    )
    .await;
    // DANUBE-AUTH-LOGIN
    let a = send_raw(
        &r,
        json_req(
            "POST",
            "/api/accounts/login/",
            &json!({"username": "admin", "password": ADMIN_PASSWORD}).to_string(),
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let token = a.json()["token"].as_str().expect("token").to_string();
    (cp, r, token)
}

fn dreq(
    method: &str,
    uri: &str,
    token: &str,
    body: Option<Value>,
    stream: Option<&str>,
) -> Request<Body> {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Token {token}"))
        .header("content-type", "application/json; indent=4");
    if let Some(s) = stream {
        b = b.header("es-stream", s);
    }
    b.body(Body::from(body.map(|v| v.to_string()).unwrap_or_default()))
        .expect("request")
}

#[tokio::test]
async fn replica_list_paths_headers_and_errors() {
    let (_cp, r, t) = world().await;
    // DANUBE-REP-LIST, by hostname and uuid, ± slash, ± /dc/main.
    for uri in [
        "/api/vm/web01/replica/",
        "/api/vm/web01/replica",
        "/api/vm/vm-uuid-1/replica/",
        "/api/dc/main/vm/web01/replica/",
        "/api/dc/main/vm/web01/replica?full=True",
    ] {
        let a = send_raw(&r, dreq("GET", uri, &t, None, Some("es"))).await;
        assert_eq!(a.status, 200, "{uri}: {}", a.text());
        let v = a.json();
        assert_eq!(v["status"], "SUCCESS");
        assert_eq!(v["result"], json!([]));
        assert!(v["task_id"].as_str().expect("id").starts_with("1d1d1-"));
        assert_eq!(a.header("es_dc").as_deref(), Some("main"));
        assert_eq!(a.header("es_username").as_deref(), Some("admin"));
        assert!(a.header("es_version").is_some());
        assert!(a.header("es_stream").is_none());
        assert!(a.header("es_task_response").is_none());
    }
    let a = send_raw(&r, dreq("GET", "/api/vm/nope/replica/", &t, None, None)).await;
    assert_eq!(
        (a.status, a.json()),
        (404, json!({"detail": "VM not found"}))
    );
    let a = send_raw(&r, dreq("GET", "/api/vm/web01/replica/r1/", &t, None, None)).await;
    assert_eq!(
        (a.status, a.json()),
        (404, json!({"detail": "Slave VM not found"}))
    );
    let a = send_raw(
        &r,
        dreq("GET", "/api/dc/other/vm/web01/replica/", &t, None, None),
    )
    .await;
    assert_eq!(a.status, 404);
    let a = send_raw(&r, dreq("GET", "/api/nothing/here/", &t, None, None)).await;
    assert_eq!((a.status, a.json()), (404, json!({"detail": "Not found."})));
    let a = send_raw(
        &r,
        dreq("PATCH", "/api/vm/web01/replica/r1/", &t, None, None),
    )
    .await;
    assert_eq!(a.status, 405, "{}", a.text());
    assert!(a.json()["detail"]
        .as_str()
        .expect("detail")
        .contains("PATCH"));
    // DANUBE-VM-STATUS
    let a = send_raw(&r, dreq("GET", "/api/vm/web01/status/", &t, None, None)).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let v = a.json();
    assert_eq!(v["result"]["status"], "running");
    assert_eq!(v["result"]["uuid"], "vm-uuid-1");
    assert_eq!(v["result"]["node_status"], "online");
    // DANUBE-REP-CREATE validation: 400 task-style FAILURE per field.
    let a = send_raw(
        &r,
        dreq(
            "POST",
            "/api/vm/web01/replica/r1/",
            &t,
            Some(json!({})),
            None,
        ),
    )
    .await;
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["status"], "FAILURE");
    assert_eq!(
        a.json()["result"],
        json!({"node": ["This field is required."]})
    );
    let a = send_raw(
        &r,
        dreq(
            "POST",
            "/api/vm/web01/replica/r1/",
            &t,
            Some(json!({"node": "n2", "sleep_time": 86401, "bwlimit": "x"})),
            None,
        ),
    )
    .await;
    assert_eq!(a.status, 400);
    let res = &a.json()["result"];
    assert!(
        res["sleep_time"].is_array() && res["bwlimit"].is_array(),
        "{res}"
    );
    let a = send_raw(
        &r,
        dreq(
            "POST",
            "/api/vm/web01/replica/r1/",
            &t,
            Some(json!({"node": "n1"})),
            None,
        ),
    )
    .await;
    assert_eq!(a.status, 400);
    assert!(a.json()["result"]["node"].is_array());
    let bad = Request::builder()
        .method("POST")
        .uri("/api/vm/web01/replica/r1/")
        .header("authorization", format!("Token {t}"))
        .body(Body::from("{nope"))
        .expect("request");
    let a = send_raw(&r, bad).await;
    assert_eq!(a.status, 400);
    assert!(a.json()["detail"].is_string());
    // Credentials: Danube shapes.
    let a = send_raw(&r, req("GET", "/api/vm/web01/replica/")).await;
    assert_eq!(a.status, 401);
    assert!(a.json()["detail"].is_string());
}

#[tokio::test]
async fn tasks_pending_cancel_and_stream() {
    let (_cp, r, t) = world().await;
    // DANUBE-REP-CREATE without ES-STREAM: 201 PENDING (no agent runs it here).
    let a = send_raw(
        &r,
        dreq(
            "POST",
            "/api/vm/web01/replica/rep1/",
            &t,
            Some(json!({"node": "n2", "sleep_time": 0})),
            None,
        ),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text());
    let v = a.json();
    assert_eq!(v["status"], "PENDING");
    assert_eq!(v["result"], Value::Null);
    let id = v["task_id"].as_str().expect("id").to_string();
    assert!(id.starts_with("1e1d1-"));
    assert_eq!(a.header("es_task_id").as_deref(), Some(id.as_str()));
    assert_eq!(a.header("es_task_response").as_deref(), Some("true"));
    // DANUBE-REP-SHOW while it is created.
    let a = send_raw(
        &r,
        dreq("GET", "/api/vm/web01/replica/rep1/", &t, None, None),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["result"]["node"], "n2");
    assert_eq!(a.json()["result"]["last_sync"], Value::Null);
    // DANUBE-REP-CREATE again: 406; failover while creating: 409.
    let a = send_raw(
        &r,
        dreq(
            "POST",
            "/api/vm/web01/replica/rep1/",
            &t,
            Some(json!({"node": "n2"})),
            None,
        ),
    )
    .await;
    assert_eq!(
        (a.status, a.json()),
        (406, json!({"detail": "Slave VM already exists"}))
    );
    let a = send_raw(
        &r,
        dreq(
            "PUT",
            "/api/vm/web01/replica/rep1/failover/",
            &t,
            Some(json!({})),
            None,
        ),
    )
    .await;
    assert_eq!(
        (a.status, a.json()),
        (409, json!({"detail": "VM has pending tasks"}))
    );
    // DANUBE-TASK-STATUS / -DONE / -LIST / -DETAIL of the pending task.
    let a = send_raw(
        &r,
        dreq("GET", &format!("/api/task/{id}/status/"), &t, None, None),
    )
    .await;
    assert_eq!(a.status, 201);
    assert_eq!(a.json()["status"], "PENDING");
    assert_eq!(a.header("es_task_response").as_deref(), Some("true"));
    let a = send_raw(
        &r,
        dreq("GET", &format!("/api/task/{id}/done"), &t, None, None),
    )
    .await;
    assert_eq!(
        (a.status, a.json()),
        (201, json!({"task_id": id, "done": false}))
    );
    let a = send_raw(&r, dreq("GET", "/api/task/", &t, None, None)).await;
    assert_eq!((a.status, a.json()), (200, json!([id])));
    let a = send_raw(&r, dreq("GET", &format!("/api/task/{id}/"), &t, None, None)).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["view"], "vm_replica");
    assert_eq!(a.json()["method"], "POST");
    assert_eq!(a.json()["node"], "n2");
    // DANUBE-REP-UPDATE of parameters with ES-STREAM: es: a streamed 201 whose body is
    // the final status line and the task-status JSON (the update ends at once).
    let a = send_raw(
        &r,
        dreq(
            "PUT",
            "/api/vm/web01/replica/rep1/",
            &t,
            Some(json!({"sleep_time": 10})),
            Some("es"),
        ),
    )
    .await;
    assert_eq!(a.status, 201);
    assert_eq!(a.header("es_stream").as_deref(), Some("True"));
    assert_eq!(a.header("es_task_response").as_deref(), Some("true"));
    let text = a.text();
    let body = text.trim_start();
    let (line, json_text) = body.split_once('\n').expect("status line");
    assert_eq!(line, "200", "{text}");
    let v: Value = serde_json::from_str(json_text).expect("json");
    assert_eq!(v["status"], "SUCCESS");
    assert_eq!(
        v["result"]["message"],
        "Server replication service was successfully updated"
    );
    assert_eq!(v["result"]["sleep_time"], 10);
    // Only reserve_resources: synchronous 205.
    let a = send_raw(
        &r,
        dreq(
            "PUT",
            "/api/vm/web01/replica/rep1",
            &t,
            Some(json!({"reserve_resources": false})),
            None,
        ),
    )
    .await;
    assert_eq!(a.status, 205, "{}", a.text());
    assert_eq!(a.json()["result"]["reserve_resources"], false);
    // DANUBE-TASK-CANCEL: revoked (410), the replica is gone.
    let a = send_raw(
        &r,
        dreq(
            "PUT",
            &format!("/api/task/{id}/cancel/"),
            &t,
            Some(json!({})),
            None,
        ),
    )
    .await;
    assert_eq!(a.status, 410, "{}", a.text());
    assert_eq!(a.json()["status"], "REVOKED");
    let a = send_raw(&r, dreq("GET", "/api/vm/web01/replica/", &t, None, None)).await;
    assert_eq!(a.json()["result"], json!([]));
    let a = send_raw(
        &r,
        dreq(
            "PUT",
            &format!("/api/task/{id}/cancel/"),
            &t,
            Some(json!({})),
            None,
        ),
    )
    .await;
    assert_eq!(
        (a.status, a.json()),
        (406, json!({"detail": "Task cannot be canceled"}))
    );
    let a = send_raw(
        &r,
        dreq(
            "GET",
            "/api/task/1d1d1-00000000-0000-0000-0000/status/",
            &t,
            None,
            None,
        ),
    )
    .await;
    assert_eq!(a.status, 404);
    // The same job through the native API.
    let a = get(&r, &format!("/drplane/v1/jobs/{id}")).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["type"], "danubeReplicaCreate");
}
