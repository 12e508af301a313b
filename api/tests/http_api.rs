//! The native HTTP API through the public router, as a client sees it.

mod support;

use axum::body::Body;
use axum::http::Request;
use drplane_api::Consistency;
use support::*;

// ---- health, readiness, metrics, request ids ----

#[tokio::test]
async fn livez_answers_ok_with_a_generated_request_id() {
    let (_cp, r) = setup();
    let a = get(&r, "/livez").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json(), serde_json::json!({"status": "ok"}));
    let id = a.header("x-request-id").expect("request id");
    assert!(
        uuid::Uuid::parse_str(&id).is_ok(),
        "generated id is a uuid: {id}"
    );
    let b = get(&r, "/livez").await;
    assert_ne!(b.header("x-request-id"), Some(id), "ids are per request");
}

#[tokio::test]
async fn caller_request_id_is_echoed_when_sane_and_replaced_otherwise() {
    let (_cp, r) = setup();
    let with_id = |id: &str| {
        Request::builder()
            .uri("/livez")
            .header("x-request-id", id)
            .body(Body::empty())
            .expect("request")
    };
    let a = send(&r, with_id("trace-42:abc")).await;
    assert_eq!(a.header("x-request-id").as_deref(), Some("trace-42:abc"));

    let a = send(&r, with_id("has spaces in it")).await;
    let got = a.header("x-request-id").expect("request id");
    assert!(uuid::Uuid::parse_str(&got).is_ok(), "replaced: {got}");

    let long = "a".repeat(129);
    let a = send(&r, with_id(&long)).await;
    assert_ne!(a.header("x-request-id").as_deref(), Some(long.as_str()));

    // Error answers carry the id too.
    let a = send(
        &r,
        Request::builder()
            .uri("/nowhere")
            .header("x-request-id", "err-1")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(a.status, 404);
    assert_eq!(a.header("x-request-id").as_deref(), Some("err-1"));
}

#[tokio::test]
async fn readyz_follows_health() {
    let (cp, r) = setup();
    let a = get(&r, "/readyz").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["ready"], true);

    cp.set_fault(Fault::Unavailable {
        retry_after_secs: 2,
    });
    let a = get(&r, "/readyz").await;
    assert_eq!(a.status, 503);
    let v = a.json();
    assert_eq!(v["ready"], false);
    assert_eq!(v["reason"], "no leader known");
    assert_eq!(v["error"]["code"], "DRP-4004");
    assert_eq!(v["error"]["status"], 503);
}

#[tokio::test]
async fn metrics_expose_control_plane_and_http_metrics() {
    let (_cp, r) = setup();
    get(&r, "/livez").await;
    get(&r, "/livez").await;
    get(&r, "/drplane/v1/sites/unknown-site").await;
    get(&r, "/no/such/route").await;
    let a = get(&r, "/metrics").await;
    assert_eq!(a.status, 200);
    let ct = a.header("content-type").expect("content type");
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = a.text();
    assert!(text.contains("drplane_raft_term 3\n"), "{text}");
    assert!(
        text.contains(
            "drplane_http_requests_total{method=\"GET\",route=\"/livez\",status=\"200\"} 2\n"
        ),
        "{text}"
    );
    // Routes are labelled by template, not by the path a client sent.
    assert!(
        text.contains(
            "drplane_http_requests_total{method=\"GET\",route=\"/drplane/v1/sites/{name}\",status=\"404\"} 1\n"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "drplane_http_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"} 1\n"
        ),
        "{text}"
    );
    assert!(!text.contains("/no/such/route"), "{text}");
    assert!(
        text.contains(
            "drplane_http_request_duration_seconds_count{method=\"GET\",route=\"/livez\"} 2\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("drplane_http_request_duration_seconds_bucket{method=\"GET\",route=\"/livez\",le=\"+Inf\"} 2\n"),
        "{text}"
    );
}

// ---- sites ----

#[tokio::test]
async fn site_create_get_list_delete_round_trip() {
    let (_cp, r) = setup();
    let a = post_json(
        &r,
        "/drplane/v1/sites",
        r#"{"name":"dc-east","description":"primary"}"#,
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text());
    assert_eq!(
        a.header("location").as_deref(),
        Some("/drplane/v1/sites/dc-east")
    );
    let created = a.json();
    let mut keys: Vec<_> = created
        .as_object()
        .expect("object")
        .keys()
        .cloned()
        .collect();
    keys.sort();
    assert_eq!(keys, ["created_at", "description", "name"]);
    assert_eq!(created["name"], "dc-east");
    assert_eq!(created["description"], "primary");
    let ts = created["created_at"].as_str().expect("created_at string");
    // 2026-11-27T13:57:47.123Z
    assert_eq!(ts.len(), 24, "{ts}");
    assert!(
        ts.ends_with('Z') && &ts[10..11] == "T" && &ts[19..20] == ".",
        "{ts}"
    );
    assert!(ts.as_bytes()[..4].iter().all(u8::is_ascii_digit), "{ts}");
    assert!(ts >= "2024-01-01", "{ts}");

    let a = get(&r, "/drplane/v1/sites/dc-east").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json(), created, "GET returns what POST returned");

    post_json(&r, "/drplane/v1/sites", r#"{"name":"dc-west"}"#).await;
    let a = get(&r, "/drplane/v1/sites").await;
    assert_eq!(a.status, 200);
    let list = a.json();
    let names: Vec<&str> = list["sites"]
        .as_array()
        .expect("sites array")
        .iter()
        .map(|s| s["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["dc-east", "dc-west"]);
    assert_eq!(
        list["sites"][1]["description"], "",
        "description defaults to empty"
    );

    let a = send(&r, req("DELETE", "/drplane/v1/sites/dc-east")).await;
    assert_eq!(a.status, 204);
    assert!(a.body.is_empty());
    let a = get(&r, "/drplane/v1/sites/dc-east").await;
    let msg = assert_error(&a, 404, "DRP-3001");
    assert!(msg.contains("dc-east"), "{msg}");
    let a = send(&r, req("DELETE", "/drplane/v1/sites/dc-east")).await;
    assert_error(&a, 404, "DRP-3001");
}

#[tokio::test]
async fn duplicate_site_is_a_conflict() {
    let (_cp, r) = setup();
    let body = r#"{"name":"a"}"#;
    assert_eq!(post_json(&r, "/drplane/v1/sites", body).await.status, 201);
    let a = post_json(&r, "/drplane/v1/sites", body).await;
    assert_error(&a, 409, "DRP-3002");
}

#[tokio::test]
async fn idempotency_key_makes_a_retried_create_apply_once() {
    let (_cp, r) = setup();
    let create = |key: &str| {
        Request::builder()
            .method("POST")
            .uri("/drplane/v1/sites")
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(Body::from(r#"{"name":"once","description":"d"}"#))
            .expect("request")
    };
    let first = send(&r, create("key-1")).await;
    assert_eq!(first.status, 201, "{}", first.text());
    // Later in time: a re-application would stamp a later created_at.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let retry = send(&r, create("key-1")).await;
    assert_eq!(
        retry.status,
        201,
        "a retry gets the first answer: {}",
        retry.text()
    );
    assert_eq!(retry.json(), first.json());
    // Another key is another request, refused by state.
    let other = send(&r, create("key-2")).await;
    assert_error(&other, 409, "DRP-3002");
}

#[tokio::test]
async fn bad_idempotency_keys_are_refused_before_proposing() {
    let (cp, r) = setup();
    let create = |key: &str| {
        Request::builder()
            .method("POST")
            .uri("/drplane/v1/sites")
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(Body::from(r#"{"name":"k"}"#))
            .expect("request")
    };
    let a = send(&r, create(&"k".repeat(129))).await;
    let msg = assert_error(&a, 400, "DRP-1007");
    assert!(msg.contains("129"), "{msg}");
    let a = send(&r, create("")).await;
    assert_error(&a, 400, "DRP-1007");
    assert_eq!(cp.proposals(), 0);
    let a = send(&r, create(&"k".repeat(128))).await;
    assert_eq!(a.status, 201, "128 bytes is accepted: {}", a.text());
}

#[tokio::test]
async fn invalid_site_names_are_refused_before_proposing() {
    let (cp, r) = setup();
    let a = post_json(&r, "/drplane/v1/sites", r#"{"name":"-bad name"}"#).await;
    let msg = assert_error(&a, 400, "DRP-1008");
    assert!(msg.contains("name"), "{msg}");
    let long = format!(r#"{{"name":"ok","description":"{}"}}"#, "d".repeat(1025));
    let a = post_json(&r, "/drplane/v1/sites", &long).await;
    let msg = assert_error(&a, 400, "DRP-1008");
    assert!(msg.contains("description"), "{msg}");
    let a = send(&r, req("DELETE", "/drplane/v1/sites/has%20space")).await;
    assert_error(&a, 400, "DRP-1008");
    assert_eq!(cp.proposals(), 0, "nothing invalid reached the log");
    let a = get(&r, "/drplane/v1/sites/has%20space").await;
    assert_error(&a, 400, "DRP-1008");
}

// ---- bad input ----

#[tokio::test]
async fn malformed_json_is_400() {
    let (_cp, r) = setup();
    let a = post_json(&r, "/drplane/v1/sites", r#"{"name": "a""#).await;
    let msg = assert_error(&a, 400, "DRP-1001");
    assert!(msg.contains("line 1"), "{msg}");
    assert!(
        !msg.contains("Failed to"),
        "axum's plain text leaked: {msg}"
    );
    let a = post_json(&r, "/drplane/v1/sites", "").await;
    assert_error(&a, 400, "DRP-1001");
    let a = post_json(&r, "/drplane/v1/sites", r#"{"name":"a"} trailing"#).await;
    assert_error(&a, 400, "DRP-1001");
}

#[tokio::test]
async fn wrong_types_missing_and_unknown_fields_are_400_naming_the_field() {
    let (cp, r) = setup();
    let a = post_json(&r, "/drplane/v1/sites", r#"{"name":5}"#).await;
    let msg = assert_error(&a, 400, "DRP-1002");
    assert!(
        msg.contains("name") && msg.contains("invalid type"),
        "{msg}"
    );

    let a = post_json(&r, "/drplane/v1/sites", r#"{"description":"x"}"#).await;
    let msg = assert_error(&a, 400, "DRP-1002");
    assert!(msg.contains("missing field `name`"), "{msg}");

    let a = post_json(&r, "/drplane/v1/sites", r#"{"name":"a","colour":"red"}"#).await;
    let msg = assert_error(&a, 400, "DRP-1002");
    assert!(msg.contains("colour"), "{msg}");

    let a = post_json(&r, "/drplane/v1/sites", r#"["a"]"#).await;
    assert_error(&a, 400, "DRP-1002");

    let a = post_json(
        &r,
        "/drplane/v1/cluster/members",
        r#"{"id":"two","site":"s","http":"h","raft":"r"}"#,
    )
    .await;
    let msg = assert_error(&a, 400, "DRP-1002");
    assert!(msg.contains("id"), "{msg}");
    assert_eq!(cp.proposals(), 0);
}

#[tokio::test]
async fn missing_or_wrong_content_type_is_415() {
    let (_cp, r) = setup();
    let no_ct = Request::builder()
        .method("POST")
        .uri("/drplane/v1/sites")
        .body(Body::from(r#"{"name":"a"}"#))
        .expect("request");
    let a = send(&r, no_ct).await;
    assert_error(&a, 415, "DRP-1003");

    let text = Request::builder()
        .method("POST")
        .uri("/drplane/v1/sites")
        .header("content-type", "text/plain")
        .body(Body::from(r#"{"name":"a"}"#))
        .expect("request");
    let a = send(&r, text).await;
    let msg = assert_error(&a, 415, "DRP-1003");
    assert!(msg.contains("text/plain"), "{msg}");

    let with_charset = Request::builder()
        .method("POST")
        .uri("/drplane/v1/sites")
        .header("content-type", "application/json; charset=utf-8")
        .body(Body::from(r#"{"name":"a"}"#))
        .expect("request");
    assert_eq!(send(&r, with_charset).await.status, 201);
}

#[tokio::test]
async fn two_mib_body_is_413() {
    let (cp, r) = setup();
    let big = format!(r#"{{"name":"a","description":"{}"}}"#, "x".repeat(2 << 20));
    let a = post_json(&r, "/drplane/v1/sites", &big).await;
    assert_error(&a, 413, "DRP-1004");
    // The unread rest of the body makes the connection unusable: the client is told.
    assert_eq!(a.header("connection").as_deref(), Some("close"));
    // Also on a route whose body is optional.
    let a = send(
        &r,
        json_req("POST", "/drplane/v1/cluster/members/1/promote", &big),
    )
    .await;
    assert_error(&a, 413, "DRP-1004");
    // The limit is 1 MiB, below axum's default of 2 MB.
    let over = format!(
        r#"{{"name":"a","description":"{}"}}"#,
        "x".repeat(1_500_000)
    );
    let a = post_json(&r, "/drplane/v1/sites", &over).await;
    assert_error(&a, 413, "DRP-1004");
    // Just under the limit the body is read, and refused for its content instead.
    let under = format!(
        r#"{{"name":"a","description":"{}"}}"#,
        "x".repeat(1_000_000)
    );
    let a = post_json(&r, "/drplane/v1/sites", &under).await;
    assert_error(&a, 400, "DRP-1008");
    assert_eq!(cp.proposals(), 0);
}

#[tokio::test]
async fn unknown_route_is_404_and_wrong_method_is_405_in_native_shape() {
    let (_cp, r) = setup();
    let a = get(&r, "/drplane/v1/nothing-here").await;
    let msg = assert_error(&a, 404, "DRP-2001");
    assert!(msg.contains("/drplane/v1/nothing-here"), "{msg}");
    let a = get(&r, "/nothing-here").await;
    assert_error(&a, 404, "DRP-2001");

    let a = send(&r, req("PUT", "/drplane/v1/sites")).await;
    assert_error(&a, 405, "DRP-2002");
    let allow = a.header("allow").expect("Allow header");
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");

    let a = send(&r, req("DELETE", "/livez")).await;
    assert_error(&a, 405, "DRP-2002");
    let a = send(&r, req("GET", "/drplane/v1/cluster/members/2/promote")).await;
    assert_error(&a, 405, "DRP-2002");
}

#[tokio::test]
async fn consistency_parameter() {
    let (cp, r) = setup();
    let a = get(&r, "/drplane/v1/sites").await;
    assert_eq!(a.status, 200);
    assert_eq!(cp.last_consistency(), Some(Consistency::Linearizable));

    let a = get(&r, "/drplane/v1/sites?consistency=stale").await;
    assert_eq!(a.status, 200);
    assert_eq!(cp.last_consistency(), Some(Consistency::Stale));

    let a = get(&r, "/drplane/v1/sites/x?consistency=linearizable").await;
    assert_error(&a, 404, "DRP-3001");
    assert_eq!(cp.last_consistency(), Some(Consistency::Linearizable));

    let a = get(&r, "/drplane/v1/sites?consistency=eventual").await;
    let msg = assert_error(&a, 400, "DRP-1006");
    assert!(msg.contains("eventual"), "{msg}");
    let a = get(&r, "/drplane/v1/sites/x?consistency=").await;
    assert_error(&a, 400, "DRP-1006");
}

// ---- cluster ----

#[tokio::test]
async fn cluster_status_has_exactly_the_documented_fields() {
    let (_cp, r) = setup();
    let a = get(&r, "/drplane/v1/cluster").await;
    assert_eq!(a.status, 200);
    let v = a.json();
    let mut keys: Vec<_> = v.as_object().expect("object").keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "applied_index",
            "commit_index",
            "last_log_index",
            "leader_contact_ms",
            "leader_id",
            "members",
            "node_id",
            "state",
            "term"
        ]
    );
    assert_eq!(v["leader_id"], 1);
    assert_eq!(v["term"], 3);
    let m = &v["members"][0];
    let mut keys: Vec<_> = m.as_object().expect("object").keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "http",
            "id",
            "lag",
            "leader",
            "matched_index",
            "raft",
            "role",
            "site"
        ]
    );
    assert_eq!(m["role"], "voter");
    assert_eq!(m["leader"], true);

    let a = post_json(&r, "/drplane/v1/cluster/init", "").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["node_id"], 1);
}

#[tokio::test]
async fn member_lifecycle_and_force() {
    let (cp, r) = setup();
    let a = post_json(
        &r,
        "/drplane/v1/cluster/members",
        r#"{"id":2,"site":"dc-b","http":"10.0.0.2:8080","raft":"10.0.0.2:9090"}"#,
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text());

    let a = get(&r, "/drplane/v1/cluster/members").await;
    assert_eq!(a.status, 200);
    let members = a.json();
    let two = members
        .as_array()
        .expect("members is an array")
        .iter()
        .find(|m| m["id"] == 2)
        .expect("member 2 listed")
        .clone();
    assert_eq!(two["role"], "learner");
    assert_eq!(two["site"], "dc-b");

    let a = post_json(&r, "/drplane/v1/cluster/members/2/promote", "").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(cp.last_force(), Some(false));
    let roles = a.json()["members"].clone();
    assert!(
        roles
            .as_array()
            .expect("array")
            .iter()
            .any(|m| m["id"] == 2 && m["role"] == "voter"),
        "{roles}"
    );

    let a = send(
        &r,
        req("POST", "/drplane/v1/cluster/members/2/demote?force=true"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(cp.last_force(), Some(true));

    let a = post_json(
        &r,
        "/drplane/v1/cluster/members/2/promote",
        r#"{"force":true}"#,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(cp.last_force(), Some(true));

    let a = send(&r, req("DELETE", "/drplane/v1/cluster/members/2")).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(cp.last_force(), Some(false));
    assert!(a.json()["members"]
        .as_array()
        .expect("array")
        .iter()
        .all(|m| m["id"] != 2));

    let a = send(&r, req("DELETE", "/drplane/v1/cluster/members/2")).await;
    assert_error(&a, 404, "DRP-3004");
}

#[tokio::test]
async fn bad_force_values_are_400() {
    let (_cp, r) = setup();
    let a = send(
        &r,
        req("POST", "/drplane/v1/cluster/members/1/promote?force=maybe"),
    )
    .await;
    assert_error(&a, 400, "DRP-1006");
    let a = send(
        &r,
        json_req(
            "POST",
            "/drplane/v1/cluster/members/1/promote?force=false",
            r#"{"force":true}"#,
        ),
    )
    .await;
    assert_error(&a, 400, "DRP-1000");
    let a = post_json(
        &r,
        "/drplane/v1/cluster/members/1/demote",
        r#"{"forse":true}"#,
    )
    .await;
    let msg = assert_error(&a, 400, "DRP-1002");
    assert!(msg.contains("forse"), "{msg}");
    let a = post_json(
        &r,
        "/drplane/v1/cluster/members/1/demote",
        r#"{"force":"yes"}"#,
    )
    .await;
    assert_error(&a, 400, "DRP-1002");
}

#[tokio::test]
async fn member_id_that_is_not_a_u64_is_400() {
    let (_cp, r) = setup();
    for uri in [
        "/drplane/v1/cluster/members/abc/promote",
        "/drplane/v1/cluster/members/-1/demote",
        "/drplane/v1/cluster/members/18446744073709551616/promote",
    ] {
        let a = send(&r, req("POST", uri)).await;
        let msg = assert_error(&a, 400, "DRP-1005");
        assert!(msg.contains("member id"), "{uri}: {msg}");
    }
    let a = send(&r, req("DELETE", "/drplane/v1/cluster/members/1.5")).await;
    assert_error(&a, 400, "DRP-1005");
    // Percent-encoding that is not UTF-8.
    let a = send(&r, req("POST", "/drplane/v1/cluster/members/%FF/promote")).await;
    assert_error(&a, 400, "DRP-1005");
    let a = get(&r, "/drplane/v1/sites/%FF%FE").await;
    assert_error(&a, 400, "DRP-1005");
}

// ---- cluster faults ----

#[tokio::test]
async fn unavailable_is_503_with_retry_after() {
    let (cp, r) = setup();
    cp.set_fault(Fault::Unavailable {
        retry_after_secs: 3,
    });
    let a = post_json(&r, "/drplane/v1/sites", r#"{"name":"a"}"#).await;
    let msg = assert_error(&a, 503, "DRP-4001");
    assert!(msg.contains("no leader"), "{msg}");
    assert_eq!(a.header("retry-after").as_deref(), Some("3"));

    let a = get(&r, "/drplane/v1/sites/a").await;
    assert_error(&a, 503, "DRP-4001");
    assert_eq!(a.header("retry-after").as_deref(), Some("3"));

    let a = get(&r, "/drplane/v1/cluster").await;
    assert_error(&a, 503, "DRP-4001");
    assert!(a.header("retry-after").is_some());
}

#[tokio::test]
async fn unknown_outcome_is_503_with_retry_after() {
    let (cp, r) = setup();
    cp.set_fault(Fault::Unknown);
    let a = send(&r, req("DELETE", "/drplane/v1/sites/a")).await;
    assert_error(&a, 503, "DRP-4002");
    let secs: u64 = a
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!(secs >= 1);
}

#[tokio::test]
async fn refused_is_409() {
    let (cp, r) = setup();
    cp.set_fault(Fault::Refused);
    let a = post_json(&r, "/drplane/v1/cluster/members/1/promote", "").await;
    let msg = assert_error(&a, 409, "DRP-4003");
    assert!(msg.contains("site majority"), "{msg}");
    assert!(a.header("retry-after").is_none());
    let a = post_json(&r, "/drplane/v1/cluster/init", "").await;
    assert_error(&a, 409, "DRP-4003");
}

#[tokio::test]
async fn bad_member_request_from_the_cluster_is_400() {
    let (_cp, r) = setup();
    let a = post_json(
        &r,
        "/drplane/v1/cluster/members",
        r#"{"id":5,"site":"s","http":"","raft":"r"}"#,
    )
    .await;
    let msg = assert_error(&a, 400, "DRP-1009");
    assert!(msg.contains("http"), "{msg}");
}

#[tokio::test]
async fn internal_errors_are_500_without_leaking_detail() {
    let (cp, r) = setup();
    cp.set_fault(Fault::Internal);
    let a = get(&r, "/drplane/v1/cluster").await;
    assert_error(&a, 500, "DRP-5001");
    assert!(!a.text().contains("/srv/x"), "{}", a.text());
}

#[tokio::test]
async fn hierarchical_site_names_round_trip_with_an_encoded_slash() {
    let (_cp, r) = setup();
    let a = post_json(&r, "/drplane/v1/sites", r#"{"name":"eu/west/dc1"}"#).await;
    assert_eq!(a.status, 201, "{}", a.text());
    let location = a.header("location").expect("location");
    assert_eq!(location, "/drplane/v1/sites/eu%2Fwest%2Fdc1");
    let b = get(&r, &location).await;
    assert_eq!(b.status, 200, "{}", b.text());
    assert_eq!(b.json()["name"], "eu/west/dc1");
    let c = post_json(&r, "/drplane/v1/sites", r#"{"name":"eu//dc1"}"#).await;
    assert_eq!(c.status, 400, "{}", c.text());
}
