//! The Trove family (TROVE-* of ../shared/spec/trove.md) through the public router, over
//! the fake one-node cluster: wire shapes, OpenStack faults and status codes. The agents'
//! side (jobs running to the end) is covered by the state machine's tests and the compat
//! suite (compat/test_trove_*.py).

mod support;

use serde_json::{json, Value};
use support::*;

const P: &str = ADMIN_PROJECT_ID;

async fn put_json(r: &axum::Router, uri: &str, body: &Value) -> Answer {
    send(r, json_req("PUT", uri, &body.to_string())).await
}

/// Sites s1, s2 with online hosts h1, h2.
async fn with_hosts(r: &axum::Router) {
    for (s, h) in [("s1", "h1"), ("s2", "h2")] {
        let a = post_json(r, "/drplane/v1/sites", &json!({"name": s}).to_string()).await;
        assert_eq!(a.status, 201, "{}", a.text());
        let body = json!({
            "site": s,
            "driver": "fs",
            "agent_address": "10.0.0.1:7000",
            "state": "online",
            "capacity": {
                "vcpus": 16,
                "ram_mb": 32768,
                "storage_pools": [{"name": "p1", "total_bytes": 100u64 << 30, "free_bytes": 50u64 << 30}],
            },
        });
        let a = put_json(r, &format!("/drplane/v1/hosts/{h}"), &body).await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
}

/// Asserts a Trove fault: `{"<name>": {"code": status, "message": …}}`.
fn fault(a: &Answer, status: u16, name: &str) -> String {
    assert_eq!(a.status, status, "{}", a.text());
    let v = a.json();
    let obj = v.as_object().expect("object");
    assert_eq!(obj.len(), 1, "{v}");
    assert_eq!(v[name]["code"], status, "{v}");
    v[name]["message"].as_str().expect("message").to_string()
}

async fn create(r: &axum::Router) -> String {
    let body = json!({"instance": {"name": "db1", "flavorRef": "2", "volume": {"size": 1}}});
    let a = post_json(r, &format!("/v1.0/{P}/instances"), &body.to_string()).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let i = a.json()["instance"].clone();
    // TROVE-INST-CREATE answers the instance in BUILD.
    assert_eq!(i["status"], "BUILD");
    assert_eq!(i["flavor"]["id"], "2");
    assert_eq!(i["volume"]["size"], 1);
    assert_eq!(i["operating_status"], "");
    i["id"].as_str().expect("id").to_string()
}

#[tokio::test]
async fn versions_list_show_and_faults() {
    let (_cp, r) = setup();
    with_hosts(&r).await;
    // TROVE-VERSIONS (public)
    let a = send_raw(&r, req("GET", "/v1.0")).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["versions"][0]["id"], "v1.0");

    let id = create(&r).await;
    // TROVE-INST-LIST, TROVE-INST-LIST-DETAIL, TROVE-INST-SHOW
    let a = get(&r, &format!("/v1.0/{P}/instances?include_clustered=False")).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["instances"][0]["id"], id.as_str());
    assert!(a.json()["instances"][0].get("created").is_none());
    let a = get(&r, &format!("/v1.0/{P}/instances/detail")).await;
    assert!(a.json()["instances"][0].get("created").is_some());
    let a = get(&r, &format!("/v1.0/{P}/instances/{id}")).await;
    assert_eq!(a.status, 200);
    let i = &a.json()["instance"];
    assert_eq!(i["links"][0]["rel"], "self");
    assert_eq!(i["tenant_id"], P);

    // Faults in Trove's shape.
    fault(
        &get(&r, &format!("/v1.0/{P}/instances/nope")).await,
        404,
        "itemNotFound",
    );
    fault(
        &get(&r, &format!("/v1.0/{P}/whatever")).await,
        404,
        "itemNotFound",
    );
    fault(
        &send(
            &r,
            req("PATCH", &format!("/v1.0/{P}/instances/{id}/action")),
        )
        .await,
        405,
        "badMethod",
    );
    let act = format!("/v1.0/{P}/instances/{id}/action");
    let m = fault(
        &post_json(&r, &act, r#"{"bogus": {}}"#).await,
        400,
        "badRequest",
    );
    assert_eq!(m, "Invalid instance action: bogus");
    fault(&post_json(&r, &act, "{}").await, 400, "badRequest");
    fault(&post_json(&r, &act, "[").await, 400, "badRequest");
    // Busy building: TROVE-ACT-RESTART is 422; TROVE-INST-DELETE while BUILD is 422.
    fault(
        &post_json(&r, &act, r#"{"restart": {}}"#).await,
        422,
        "unprocessableEntity",
    );
    fault(
        &send(&r, req("DELETE", &format!("/v1.0/{P}/instances/{id}"))).await,
        422,
        "unprocessableEntity",
    );
    // TROVE-ACT-PROMOTE of a non-replica: 400.
    fault(
        &post_json(&r, &act, r#"{"promote_to_replica_source": {}}"#).await,
        400,
        "badRequest",
    );
    // resize with both keys: 400.
    fault(
        &post_json(
            &r,
            &act,
            r#"{"resize": {"flavorRef": "3", "volume": {"size": 2}}}"#,
        )
        .await,
        400,
        "badRequest",
    );
    // TROVE-ACT-RESIZE-VOLUME above the maximum: 413 overLimit.
    fault(
        &post_json(&r, &act, r#"{"resize": {"volume": {"size": 99}}}"#).await,
        413,
        "overLimit",
    );
    // TROVE-INST-CREATE errors.
    let url = format!("/v1.0/{P}/instances");
    fault(
        &post_json(
            &r,
            &url,
            r#"{"instance": {"name": "x", "flavorRef": "77", "volume": {"size": 1}}}"#,
        )
        .await,
        400,
        "badRequest",
    );
    fault(
        &post_json(
            &r,
            &url,
            r#"{"instance": {"name": "x", "replica_of": "missing"}}"#,
        )
        .await,
        404,
        "itemNotFound",
    );
    fault(
        &post_json(
            &r,
            &url,
            r#"{"instance": {"name": "x", "flavorRef": "2", "volume": {"size": 50}}}"#,
        )
        .await,
        413,
        "overLimit",
    );
}

#[tokio::test]
async fn mgmt_views_and_update() {
    let (_cp, r) = setup();
    with_hosts(&r).await;
    let id = create(&r).await;
    // TROVE-MGMT-SHOW, TROVE-MGMT-LIST
    let a = get(&r, &format!("/v1.0/{P}/mgmt/instances/{id}")).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let m = &a.json()["instance"];
    assert_eq!(m["task_description"], "The instance is building.");
    assert!(m["server"]["host"] == "h1" || m["server"]["host"] == "h2");
    assert!(m["job_id"].is_string());
    let a = get(&r, &format!("/v1.0/{P}/mgmt/instances?deleted=False")).await;
    assert_eq!(a.json()["instances"].as_array().map(Vec::len), Some(1));
    // TROVE-MGMT-* body rules.
    let act = format!("/v1.0/{P}/mgmt/instances/{id}/action");
    fault(
        &post_json(&r, &act, r#"{"stop": {}, "reboot": {}}"#).await,
        400,
        "badRequest",
    );
    fault(
        &post_json(&r, &act, r#"{"rebuild": {"image_id": "x"}}"#).await,
        400,
        "badRequest",
    );
    // TROVE-MGMT-RESET-TASK frees the building instance.
    let a = post_json(&r, &act, r#"{"reset-task-status": {}}"#).await;
    assert_eq!(a.status, 202, "{}", a.text());
    let a = get(&r, &format!("/v1.0/{P}/instances/{id}")).await;
    // The abandoned build leaves the server in error, with a fault.
    assert_eq!(a.json()["instance"]["status"], "ERROR");
    assert!(a.json()["instance"]["fault"]["message"].is_string());
    // TROVE-INST-UPDATE: rename; unknown key and two attributes are 400.
    let u = format!("/v1.0/{P}/instances/{id}");
    let a = put_json(&r, &u, &json!({"instance": {"name": "renamed"}})).await;
    assert_eq!(a.status, 202, "{}", a.text());
    let a = get(&r, &u).await;
    assert_eq!(a.json()["instance"]["name"], "renamed");
    fault(
        &put_json(&r, &u, &json!({"instance": {"colour": "red"}})).await,
        400,
        "badRequest",
    );
    fault(
        &put_json(
            &r,
            &u,
            &json!({"instance": {"replica_of": null, "datastore_version": "9"}}),
        )
        .await,
        400,
        "badRequest",
    );
    fault(
        &put_json(&r, &u, &json!({"instance": {"replica_of": null}})).await,
        400,
        "badRequest",
    );
    // Flavors the client can name.
    let a = get(&r, &format!("/v1.0/{P}/flavors/3")).await;
    assert_eq!(a.json()["flavor"]["vcpus"], 2);
}
