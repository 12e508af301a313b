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

/// A `member` of the admin project (where `web01` is) and its Danube token.
async fn member_token(r: &axum::Router, name: &str) -> String {
    let a = post_json(
        r,
        "/drplane/v1/identity/users",
        &json!({"name": name, "password": format!("password-{name}"), "project": "admin", "role": "member"})
            .to_string(),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text());
    let a = send_raw(
        r,
        json_req(
            "POST",
            "/api/accounts/login/",
            &json!({"username": name, "password": format!("password-{name}")}).to_string(),
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    a.json()["token"].as_str().expect("token").to_string()
}

// DANUBE-AUTH-LOGIN / -LOGOUT carry es_version, es_username and es_dc like every reply.
#[tokio::test]
async fn login_and_logout_carry_the_danube_headers() {
    let (_cp, r) = setup();
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
    assert!(a.header("es_version").is_some_and(|v| !v.is_empty()));
    assert_eq!(a.header("es_username").as_deref(), Some("admin"));
    assert_eq!(a.header("es_dc").as_deref(), Some("main"));
    let token = a.json()["token"].as_str().expect("token").to_string();
    // A refused login: no user yet.
    for body in [
        json!({"username": "admin", "password": "wrong"}),
        json!({"username": "admin"}),
    ] {
        let a = send_raw(
            &r,
            json_req("POST", "/api/accounts/login", &body.to_string()),
        )
        .await;
        assert_eq!(a.status, 400, "{}", a.text());
        assert!(a.json()["detail"].is_string());
        assert!(a.header("es_version").is_some());
        assert_eq!(a.header("es_username").as_deref(), Some(""));
        assert_eq!(a.header("es_dc").as_deref(), Some("main"));
    }
    let a = send_raw(&r, dreq("GET", "/api/accounts/logout/", &token, None, None)).await;
    assert_eq!((a.status, a.json()), (200, json!({"detail": "Bye."})));
    assert!(a.header("es_version").is_some());
    assert_eq!(a.header("es_username").as_deref(), Some("admin"));
    assert_eq!(a.header("es_dc").as_deref(), Some("main"));
    // The token is gone.
    let a = send_raw(&r, dreq("GET", "/api/task/", &token, None, None)).await;
    assert_eq!(a.status, 401);
}

// `dc` in the request data selects the DC (and wins over the path); an unknown one is
// Danube's 404 "Datacenter not found", before anything is changed.
#[tokio::test]
async fn dc_in_the_data_selects_the_datacenter() {
    let (_cp, r, t) = world().await;
    for uri in [
        "/api/vm/web01/replica/?dc=main",
        "/api/dc/nodc/vm/web01/replica/?dc=main",
        "/api/vm/web01/status/?dc=main",
        "/api/task/?dc=main",
        "/api/dc/main/task/",
    ] {
        let a = send_raw(&r, dreq("GET", uri, &t, None, None)).await;
        assert_eq!(a.status, 200, "{uri}: {}", a.text());
        assert_eq!(a.header("es_dc").as_deref(), Some("main"), "{uri}");
    }
    for uri in [
        "/api/vm/web01/replica/?dc=nodc",
        "/api/dc/main/vm/web01/replica/?dc=nodc",
        "/api/dc/nodc/vm/web01/replica/",
        "/api/vm/web01/replica/rep1/?dc=nodc",
        "/api/vm/web01/status/?dc=nodc",
        "/api/task/?dc=nodc",
        "/api/dc/nodc/task/",
        "/api/task/1e1d1-00000000-0000-0000-0000/status/?dc=nodc",
    ] {
        let a = send_raw(&r, dreq("GET", uri, &t, None, None)).await;
        assert_eq!(
            (a.status, a.json()),
            (404, json!({"detail": "Datacenter not found"})),
            "{uri}"
        );
        assert_eq!(a.header("es_dc").as_deref(), Some("main"), "{uri}");
    }
    // Changes: refused before anything happens.
    for (method, uri, body) in [
        (
            "POST",
            "/api/vm/web01/replica/rep1/",
            json!({"node": "n2", "dc": "nodc"}),
        ),
        (
            "POST",
            "/api/dc/main/vm/web01/replica/rep1/",
            json!({"node": "n2", "dc": "x"}),
        ),
        (
            "PUT",
            "/api/vm/web01/replica/rep1/failover/",
            json!({"dc": "nodc"}),
        ),
        (
            "PUT",
            "/api/vm/web01/replica/rep1/reinit/",
            json!({"dc": 7}),
        ),
        (
            "DELETE",
            "/api/vm/web01/replica/rep1/",
            json!({"dc": "nodc"}),
        ),
        (
            "PUT",
            "/api/task/1e1d1-00000000-0000-0000-0000/cancel/",
            json!({"dc": "nodc"}),
        ),
    ] {
        let a = send_raw(&r, dreq(method, uri, &t, Some(body), None)).await;
        assert_eq!(
            (a.status, a.json()),
            (404, json!({"detail": "Datacenter not found"})),
            "{method} {uri}"
        );
    }
    let a = send_raw(&r, dreq("GET", "/api/vm/web01/replica/", &t, None, None)).await;
    assert_eq!(a.json()["result"], json!([]));
    // The right DC in the body (or an empty one) is accepted.
    let a = send_raw(
        &r,
        dreq(
            "POST",
            "/api/dc/nodc/vm/web01/replica/rep1/",
            &t,
            Some(json!({"node": "n2", "dc": "main"})),
            None,
        ),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text());
    let a = send_raw(
        &r,
        dreq(
            "PUT",
            "/api/vm/web01/replica/rep1/",
            &t,
            Some(json!({"reserve_resources": false, "dc": ""})),
            None,
        ),
    )
    .await;
    assert_eq!(a.status, 205, "{}", a.text());
}

// DANUBE-TASK-STATUS / -DONE / -DETAIL: the task's user or an admin (403 otherwise);
// -LIST: the caller's own pending tasks (an admin's: everyone's); -CANCEL: the creator or
// an admin (406 otherwise).
#[tokio::test]
async fn tasks_are_seen_by_their_user_and_admins_only() {
    let (_cp, r, admin) = world().await;
    let olga = member_token(&r, "olga").await;
    let ivan = member_token(&r, "ivan").await;
    let a = send_raw(
        &r,
        dreq(
            "POST",
            "/api/vm/web01/replica/rep1/",
            &olga,
            Some(json!({"node": "n2"})),
            None,
        ),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text());
    let id = a.json()["task_id"].as_str().expect("id").to_string();
    let denied = json!({"detail": "You do not have permission to perform this action."});
    for path in [
        format!("/api/task/{id}/status/"),
        format!("/api/task/{id}/state/"),
        format!("/api/task/{id}/done/"),
        format!("/api/task/{id}/"),
    ] {
        let a = send_raw(&r, dreq("GET", &path, &olga, None, None)).await;
        assert!(a.status == 201 || a.status == 200, "{path}: {}", a.text());
        let a = send_raw(&r, dreq("GET", &path, &admin, None, None)).await;
        assert!(a.status == 201 || a.status == 200, "{path}: {}", a.text());
        let a = send_raw(&r, dreq("GET", &path, &ivan, None, None)).await;
        assert_eq!((a.status, a.json()), (403, denied.clone()), "{path}");
        assert_eq!(a.header("es_username").as_deref(), Some("ivan"));
    }
    let a = send_raw(&r, dreq("GET", "/api/task/", &olga, None, None)).await;
    assert_eq!(a.json(), json!([id]));
    let a = send_raw(&r, dreq("GET", "/api/task/", &ivan, None, None)).await;
    assert_eq!(a.json(), json!([]));
    let a = send_raw(&r, dreq("GET", "/api/task/", &admin, None, None)).await;
    assert_eq!(a.json(), json!([id]));
    // An unknown task stays a 404 for everyone.
    let a = send_raw(
        &r,
        dreq(
            "GET",
            "/api/task/1e1d1-00000000-0000-0000-0000/status/",
            &ivan,
            None,
            None,
        ),
    )
    .await;
    assert_eq!(a.status, 404);
    let a = send_raw(
        &r,
        dreq(
            "PUT",
            &format!("/api/task/{id}/cancel/"),
            &ivan,
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
            "PUT",
            &format!("/api/task/{id}/cancel/"),
            &olga,
            Some(json!({})),
            None,
        ),
    )
    .await;
    assert_eq!(a.status, 410, "{}", a.text());
    // Finished: the status stays the user's and the admin's.
    let a = send_raw(
        &r,
        dreq("GET", &format!("/api/task/{id}/status/"), &ivan, None, None),
    )
    .await;
    assert_eq!(a.status, 403);
    let a = send_raw(
        &r,
        dreq(
            "GET",
            &format!("/api/task/{id}/status/"),
            &admin,
            None,
            None,
        ),
    )
    .await;
    assert_eq!(a.status, 410);
}

/// Accepts one HTTP request on `listener`, answers 200 and returns (request line, JSON body).
async fn one_request(listener: tokio::net::TcpListener) -> (String, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut c, _) = listener.accept().await.expect("accept");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = c.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().expect("length"))
                })
                .expect("content-length");
            if body.len() >= len {
                c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    .await
                    .expect("answer");
                let line = head.lines().next().expect("request line").to_string();
                return (line, serde_json::from_str(body).expect("json body"));
            }
        }
    }
}

// cb_url: when the task ends, its status body goes to the callback (cb_method), with
// random_token and security_token; a bad cb_url does not refuse the call.
#[tokio::test]
async fn callback_gets_the_task_status_when_the_task_ends() {
    let (_cp, r, t) = world().await;
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
    assert_eq!(a.status, 201, "{}", a.text());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let hook = tokio::spawn(one_request(listener));
    // An update of parameters: a task that ends at once.
    let a = send_raw(
        &r,
        dreq(
            "PUT",
            "/api/vm/web01/replica/rep1/",
            &t,
            Some(json!({"sleep_time": 10, "cb_url": format!("http://127.0.0.1:{port}/hook?x=1"), "cb_method": "PUT"})),
            None,
        ),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text());
    let id = a.json()["task_id"].as_str().expect("id").to_string();
    let (line, body) = tokio::time::timeout(std::time::Duration::from_secs(20), hook)
        .await
        .expect("the callback came")
        .expect("hook");
    assert_eq!(line, "PUT /hook?x=1 HTTP/1.1");
    assert_eq!(body["task_id"], json!(id));
    assert_eq!(body["status"], "SUCCESS");
    assert_eq!(
        body["result"]["message"],
        "Server replication service was successfully updated"
    );
    assert_eq!(body["result"]["sleep_time"], 10);
    for k in ["random_token", "security_token"] {
        let v = body[k].as_str().expect(k);
        assert!(
            v.len() == 32 && v.chars().all(|c| c.is_ascii_hexdigit()),
            "{k}: {v}"
        );
    }
    assert_ne!(body["random_token"], body["security_token"]);
    // Invalid or unsupported callbacks are ignored, the call goes on.
    for cb in [
        json!({"sleep_time": 11, "cb_url": "not a url"}),
        json!({"sleep_time": 12, "cb_url": "http://127.0.0.1:1/x", "cb_method": "PATCH"}),
        json!({"sleep_time": 13, "cb_url": "https://127.0.0.1:1/x"}),
    ] {
        let a = send_raw(
            &r,
            dreq(
                "PUT",
                "/api/vm/web01/replica/rep1/",
                &t,
                Some(cb.clone()),
                None,
            ),
        )
        .await;
        assert_eq!(a.status, 201, "{cb}: {}", a.text());
    }
    // A callback target that is down does not hold the task up.
    let a = send_raw(
        &r,
        dreq(
            "PUT",
            "/api/vm/web01/replica/rep1/",
            &t,
            Some(json!({"sleep_time": 14, "cb_url": "http://127.0.0.1:1/down"})),
            Some("es"),
        ),
    )
    .await;
    assert_eq!(a.status, 201);
    assert!(a.text().trim_start().starts_with("200\n"), "{}", a.text());
}
