//! OpenStack Manila share replicas through the public router (MANILA-* of
//! ../shared/spec/manila.md): versions, microversion gates, fault shapes and the replica
//! life cycle against a fake one-node cluster over a real store.

mod support;

use serde_json::{json, Value};
use support::*;

const V: &str = "2.95";

fn manila_req(
    method: &str,
    uri: &str,
    version: Option<&str>,
    body: Option<&Value>,
) -> axum::http::Request<axum::body::Body> {
    let mut b = axum::http::Request::builder().method(method).uri(uri);
    if let Some(v) = version {
        b = b.header("X-OpenStack-Manila-API-Version", v);
    }
    let body = match body {
        Some(v) => {
            b = b.header("content-type", "application/json");
            axum::body::Body::from(v.to_string())
        }
        None => axum::body::Body::empty(),
    };
    b.body(body).expect("request")
}

async fn m(r: &axum::Router, method: &str, uri: &str, body: Option<&Value>) -> Answer {
    send(r, manila_req(method, uri, Some(V), body)).await
}

fn fault(a: &Answer, status: u16, name: &str) -> String {
    assert_eq!(a.status, status, "body: {}", a.text());
    let v = a.json();
    assert_eq!(v[name]["code"], json!(status), "{v}");
    v[name]["message"].as_str().expect("message").to_string()
}

/// Sites s1, s2; online hosts h1 (s1), h2 (s2); share `sh1` on h1 in the admin project.
async fn world(r: &axum::Router) {
    for s in ["s1", "s2"] {
        let a = post_json(r, "/drplane/v1/sites", &json!({"name": s}).to_string()).await;
        assert_eq!(a.status, 201, "{}", a.text());
    }
    for (h, s) in [("h1", "s1"), ("h2", "s2")] {
        let body = json!({
            "site": s, "driver": "fs", "agent_address": "10.0.0.1:7000", "state": "online",
            "capacity": {"vcpus": 16, "ram_mb": 32768,
                         "storage_pools": [{"name": "p1", "total_bytes": 1 << 30, "free_bytes": 1 << 29}]},
        });
        let a = send(
            r,
            json_req("PUT", &format!("/drplane/v1/hosts/{h}"), &body.to_string()),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
    let share = json!({"id": "sh1", "project": ADMIN_PROJECT_ID, "name": "docs", "host": "h1",
                       "pool": "p1", "size_bytes": 1 << 20, "path": "/data/sh1"});
    let a = post_json(r, "/drplane/v1/shares", &share.to_string()).await;
    assert_eq!(a.status, 201, "{}", a.text());
}

#[tokio::test]
async fn versions_are_public_and_negotiated() {
    // MANILA-VERSIONS
    let (_cp, r) = setup();
    for path in ["/", "/v2", "/v2/"] {
        let a = send_raw(&r, req("GET", path)).await;
        assert_eq!(a.status, 200, "{path}: {}", a.text());
        let v = a.json();
        let entry = &v["versions"][0];
        assert_eq!(entry["id"], "v2.0");
        assert_eq!(entry["version"], "2.95");
        assert_eq!(entry["min_version"], "2.0");
    }
    let p = ADMIN_PROJECT_ID;
    let a = send(
        &r,
        manila_req(
            "GET",
            &format!("/v2/{p}/share-replicas"),
            Some("2.96"),
            None,
        ),
    )
    .await;
    fault(&a, 406, "computeFault");
    let a = send(
        &r,
        manila_req("GET", &format!("/v2/{p}/share-replicas"), Some("x.y"), None),
    )
    .await;
    fault(&a, 400, "badRequest");
    // Absent header = 2.0: no replica API.
    let a = send(
        &r,
        manila_req("GET", &format!("/v2/{p}/share-replicas"), None, None),
    )
    .await;
    assert_eq!(
        fault(&a, 404, "itemNotFound"),
        "The resource could not be found."
    );
    assert_eq!(
        a.header("x-openstack-manila-api-version").as_deref(),
        Some("2.0")
    );
    // 2.11–2.55 need the experimental header.
    let a = send(
        &r,
        manila_req(
            "GET",
            &format!("/v2/{p}/share-replicas"),
            Some("2.40"),
            None,
        ),
    )
    .await;
    fault(&a, 404, "itemNotFound");
    let mut q = manila_req(
        "GET",
        &format!("/v2/{p}/share-replicas"),
        Some("2.40"),
        None,
    );
    q.headers_mut().insert(
        "X-OpenStack-Manila-API-Experimental",
        axum::http::HeaderValue::from_static("True"),
    );
    let a = send(&r, q).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(
        a.header("x-openstack-manila-api-experimental").as_deref(),
        Some("True")
    );
    // Unknown paths and methods under /v2 answer in Manila's shape.
    fault(
        &m(&r, "GET", &format!("/v2/{p}/nowhere"), None).await,
        404,
        "itemNotFound",
    );
    fault(
        &m(&r, "PATCH", &format!("/v2/{p}/share-replicas"), None).await,
        405,
        "badMethod",
    );
    // No token: Manila's 401.
    let a = send_raw(
        &r,
        manila_req("GET", &format!("/v2/{p}/share-replicas"), Some(V), None),
    )
    .await;
    fault(&a, 401, "unauthorized");
}

#[tokio::test]
async fn replica_life_cycle_and_errors() {
    // MANILA-SHARE-SHOW, MANILA-SR-CREATE, -SHOW, -LIST, -LIST-DETAIL, -EXPORT-LIST,
    // -RESET-STATUS, -RESET-REPLICA-STATE, -DELETE (409 on the active replica)
    let (_cp, r) = setup();
    world(&r).await;
    let p = ADMIN_PROJECT_ID;
    let share = m(&r, "GET", &format!("/v2/{p}/shares/sh1"), None).await;
    assert_eq!(share.status, 200, "{}", share.text());
    assert_eq!(share.json()["share"]["replication_type"], Value::Null);
    fault(
        &m(&r, "GET", &format!("/v2/{p}/shares/nope"), None).await,
        404,
        "itemNotFound",
    );

    let body = json!({"share_replica": {"share_id": "sh1", "availability_zone": "s2"}});
    let a = m(&r, "POST", &format!("/v2/{p}/share-replicas"), Some(&body)).await;
    assert!(fault(&a, 400, "badRequest").contains("replication type"));
    let a = m(
        &r,
        "POST",
        &format!("/v2/{p}/share-replicas"),
        Some(&json!({"x": 1})),
    )
    .await;
    fault(&a, 422, "computeFault");
    let a = m(
        &r,
        "POST",
        &format!("/v2/{p}/share-replicas"),
        Some(&json!({"share_replica": {}})),
    )
    .await;
    assert_eq!(
        fault(&a, 400, "badRequest"),
        "Must provide Share ID to add replica."
    );

    let a = send(
        &r,
        json_req(
            "PUT",
            "/drplane/v1/manila/shares/sh1",
            r#"{"replication_type":"dr"}"#,
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let share = m(&r, "GET", &format!("/v2/{p}/shares/sh1"), None)
        .await
        .json();
    assert_eq!(share["share"]["replication_type"], "dr");
    assert_eq!(share["share"]["has_replicas"], false);

    let a = m(&r, "POST", &format!("/v2/{p}/share-replicas"), Some(&body)).await;
    assert_eq!(a.status, 202, "{}", a.text());
    let created = a.json()["share_replica"].clone();
    assert_eq!(created["status"], "creating");
    assert_eq!(created["replica_state"], "out_of_sync");
    assert_eq!(created["availability_zone"], "s2");
    assert_eq!(created["host"], "h2@drplane#p1");
    let rid = created["id"].as_str().expect("id").to_string();

    let shown = m(&r, "GET", &format!("/v2/{p}/share-replicas/{rid}"), None).await;
    assert_eq!(shown.status, 200);
    assert_eq!(shown.json()["share_replica"]["id"], json!(rid));
    let listed = m(
        &r,
        "GET",
        &format!("/v2/{p}/share-replicas/detail?share_id=sh1"),
        None,
    )
    .await
    .json();
    assert_eq!(listed["share_replicas"].as_array().map(Vec::len), Some(2));
    let summary = m(&r, "GET", "/v2/share-replicas?share_id=sh1&limit=1", None)
        .await
        .json();
    assert_eq!(summary["share_replicas"].as_array().map(Vec::len), Some(1));
    assert_eq!(summary["share_replica_links"][0]["rel"], "next");
    fault(
        &m(
            &r,
            "GET",
            &format!("/v2/{p}/share-replicas?share_id=nope"),
            None,
        )
        .await,
        404,
        "itemNotFound",
    );
    fault(
        &m(
            &r,
            "GET",
            &format!("/v2/{p}/share-replicas?offset=-1"),
            None,
        )
        .await,
        400,
        "badRequest",
    );

    let active = listed["share_replicas"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["replica_state"] == "active"))
        .expect("active")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let el = m(
        &r,
        "GET",
        &format!("/v2/{p}/share-replicas/{active}/export-locations"),
        None,
    )
    .await;
    assert_eq!(el.status, 200, "{}", el.text());
    assert_eq!(el.json()["export_locations"][0]["path"], "h1:/data/sh1");

    // Busy while creating: a plain delete is refused; the active one answers 409.
    let a = m(
        &r,
        "DELETE",
        &format!("/v2/{p}/share-replicas/{active}"),
        None,
    )
    .await;
    fault(&a, 409, "conflictingRequest");
    let a = m(&r, "DELETE", &format!("/v2/{p}/share-replicas/{rid}"), None).await;
    fault(&a, 400, "badRequest");
    let a = m(&r, "DELETE", &format!("/v2/{p}/share-replicas/nope"), None).await;
    assert_eq!(
        fault(&a, 404, "itemNotFound"),
        "No replica exists with ID nope."
    );

    let act = |b: Value| b;
    let a = m(
        &r,
        "POST",
        &format!("/v2/{p}/share-replicas/{rid}/action"),
        Some(&act(json!({"reset_status": {"status": "error"}}))),
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.text());
    let a = m(
        &r,
        "POST",
        &format!("/v2/{p}/share-replicas/{rid}/action"),
        Some(&act(json!({"reset_status": {"status": "bogus"}}))),
    )
    .await;
    assert!(fault(&a, 400, "badRequest").starts_with("Invalid state"));
    let a = m(
        &r,
        "POST",
        &format!("/v2/{p}/share-replicas/{active}/action"),
        Some(&act(
            json!({"reset_replica_state": {"replica_state": "error"}}),
        )),
    )
    .await;
    assert_eq!(
        fault(&a, 400, "badRequest"),
        "Cannot reset replica_state of an active replica"
    );
    let a = m(
        &r,
        "POST",
        &format!("/v2/{p}/share-replicas/{active}/action"),
        Some(&act(json!({"promote": null}))),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let a = m(
        &r,
        "POST",
        &format!("/v2/{p}/share-replicas/{rid}/action"),
        Some(&act(json!({"nothing": null}))),
    )
    .await;
    fault(&a, 400, "badRequest");
    // Force delete preempts the create.
    let a = m(
        &r,
        "POST",
        &format!("/v2/{p}/share-replicas/{rid}/action"),
        Some(&act(json!({"force_delete": null}))),
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.text());
    let shown = m(&r, "GET", &format!("/v2/{p}/share-replicas/{rid}"), None)
        .await
        .json();
    assert_eq!(shown["share_replica"]["status"], "deleting");
}
