//! Authentication and authorization through the public router: the middleware's
//! decisions and error shapes per family, the Keystone and Danube logins, the native
//! identity API and the bootstrap of `cluster/init`.

mod support;

use axum::body::Body;
use axum::http::Request;
use serde_json::{json, Value};
use support::*;

fn with_headers(
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    b.body(
        body.map(|s| Body::from(s.to_string()))
            .unwrap_or_else(Body::empty),
    )
    .expect("request")
}

fn keystone_body(user: &str, password: &str, project: Option<&str>) -> String {
    let mut auth = json!({
        "identity": {
            "methods": ["password"],
            "password": {"user": {"name": user, "domain": {"name": "Default"}, "password": password}}
        }
    });
    if let Some(p) = project {
        auth["scope"] = json!({"project": {"name": p, "domain": {"id": "default"}}});
    }
    json!({ "auth": auth }).to_string()
}

/// `POST /v3/auth/tokens`; returns the answer (token in `x-subject-token`).
async fn keystone_login(
    r: &axum::Router,
    user: &str,
    password: &str,
    project: Option<&str>,
) -> Answer {
    send_raw(
        r,
        with_headers(
            "POST",
            "/v3/auth/tokens",
            &[("host", "drplane.test:7001")],
            Some(&keystone_body(user, password, project)),
        ),
    )
    .await
}

async fn token_of(r: &axum::Router, user: &str, password: &str, project: Option<&str>) -> String {
    let a = keystone_login(r, user, password, project).await;
    assert_eq!(a.status, 201, "login {user}: {}", a.text());
    a.header("x-subject-token").expect("X-Subject-Token")
}

async fn as_token(
    r: &axum::Router,
    token: &str,
    method: &str,
    uri: &str,
    body: Option<&str>,
) -> Answer {
    send_raw(
        r,
        with_headers(method, uri, &[("x-auth-token", token)], body),
    )
    .await
}

/// Creates project `p` and a user `name` with `role` on it (password `password-<name>`).
async fn user_with_role(r: &axum::Router, name: &str, project: &str, role: &str) {
    let a = post_json(
        r,
        "/drplane/v1/identity/projects",
        &json!({"name": project}).to_string(),
    )
    .await;
    assert!(a.status == 201 || a.status == 409, "{}", a.text());
    let a = post_json(
        r,
        "/drplane/v1/identity/users",
        &json!({"name": name, "password": format!("password-{name}"), "project": project, "role": role})
            .to_string(),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text());
}

// ---- the middleware ----

#[tokio::test]
async fn native_requests_need_a_token_and_health_does_not() {
    let (_cp, r) = setup();
    for path in ["/livez", "/readyz", "/metrics"] {
        assert_eq!(send_raw(&r, req("GET", path)).await.status, 200, "{path}");
    }
    let a = send_raw(&r, req("GET", "/drplane/v1/sites")).await;
    let msg = assert_error(&a, 401, "DRP-6001");
    assert!(msg.contains("X-Auth-Token"), "{msg}");
    let a = as_token(&r, &"0".repeat(64), "GET", "/drplane/v1/sites", None).await;
    assert_error(&a, 401, "DRP-6001");
    let a = as_token(&r, "garbage", "GET", "/drplane/v1/sites", None).await;
    assert_error(&a, 401, "DRP-6001");
    // Unknown paths under the native prefix are not revealed to strangers.
    let a = send_raw(&r, req("GET", "/drplane/v1/nothing-here")).await;
    assert_error(&a, 401, "DRP-6001");
    let a = get(&r, "/drplane/v1/sites").await;
    assert_eq!(a.status, 200, "{}", a.text());
}

#[tokio::test]
async fn each_family_refuses_in_its_own_shape() {
    let (_cp, r) = setup();
    type Check = Box<dyn Fn(&Value) -> bool>;
    let cases: Vec<(&str, Check)> = vec![
        (
            "/v1.0/p1/instances",
            Box::new(|v| v["unauthorized"]["code"] == 401),
        ),
        (
            "/v2/p1/share-replicas",
            Box::new(|v| v["unauthorized"]["code"] == 401),
        ),
        (
            "/v2/share-replicas/detail",
            Box::new(|v| v["unauthorized"]["code"] == 401),
        ),
        (
            "/v1/p1/server-groups",
            Box::new(|v| v["error"]["code"] == "SDRS.0002"),
        ),
        (
            "/v1/p1/jobs/j1",
            Box::new(|v| v["error"]["code"] == "SDRS.0002"),
        ),
        (
            "/v1/p1/cloudservers/s1",
            Box::new(|v| v["error_code"] == "APIGW.0301"),
        ),
        (
            "/api/vm/web01/replica/",
            Box::new(|v| v["detail"] == "Authentication credentials were not provided."),
        ),
        (
            "/v3/users",
            Box::new(|v| v["error"]["code"] == 401 && v["error"]["title"] == "Unauthorized"),
        ),
    ];
    for (path, ok) in cases {
        let a = send_raw(&r, req("GET", path)).await;
        assert_eq!(a.status, 401, "{path}: {}", a.text());
        assert_eq!(
            a.header("content-type").as_deref(),
            Some("application/json"),
            "{path}"
        );
        assert!(a.header("x-request-id").is_some(), "{path}");
        assert!(ok(&a.json()), "{path}: {}", a.text());
    }
    let a = send_raw(&r, req("GET", "/api/vm/web01/replica/")).await;
    assert_eq!(a.header("www-authenticate").as_deref(), Some("Token"));
    // Version documents are public.
    assert_eq!(
        send_raw(&r, with_headers("GET", "/v3", &[("host", "h:1")], None))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn a_token_is_confined_to_its_project_and_trove_mgmt_to_admins() {
    let (_cp, r) = setup();
    user_with_role(&r, "alice", "proj-a", "member").await;
    let alice = token_of(&r, "alice", "password-alice", Some("proj-a")).await;
    let me = as_token(&r, &alice, "GET", "/drplane/v1/auth/whoami", None).await;
    assert_eq!(me.status, 200, "{}", me.text());
    let me = me.json();
    assert_eq!(me["user_name"], "alice");
    assert_eq!(me["project_name"], "proj-a");
    assert_eq!(me["roles"], json!(["member", "reader"]));
    let pa = me["project_id"].as_str().expect("project id").to_string();

    // Own project: authentication passes and Trove answers.
    let a = as_token(&r, &alice, "GET", &format!("/v1.0/{pa}/instances"), None).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["instances"], json!([]));
    // Another project: 403 in the family's shape.
    let a = as_token(&r, &alice, "GET", "/v1.0/other-project/instances", None).await;
    assert_eq!(a.status, 403, "{}", a.text());
    assert_eq!(a.json()["forbidden"]["code"], 403);
    let a = as_token(&r, &alice, "GET", "/v1/other-project/server-groups", None).await;
    assert_eq!(a.json()["error"]["code"], "SDRS.0005", "{}", a.text());
    // Trove mgmt: admin only, refused with 401 as Trove does.
    let a = as_token(
        &r,
        &alice,
        "GET",
        &format!("/v1.0/{pa}/mgmt/instances"),
        None,
    )
    .await;
    assert_eq!(a.status, 401, "{}", a.text());
    assert_eq!(
        a.json()["unauthorized"]["message"],
        "User does not have admin privileges."
    );
    // An admin may use any project's paths.
    let a = get(&r, &format!("/v1.0/{pa}/mgmt/instances")).await;
    assert_eq!(a.status, 200, "{}", a.text());
}

#[tokio::test]
async fn role_matrix_on_the_native_api() {
    let (_cp, r) = setup();
    user_with_role(&r, "mia", "proj-m", "member").await;
    user_with_role(&r, "rex", "proj-m", "reader").await;
    let member = token_of(&r, "mia", "password-mia", None).await;
    let reader = token_of(&r, "rex", "password-rex", None).await;
    let site = |n: &str| json!({"name": n}).to_string();
    // read
    for t in [&member, &reader] {
        assert_eq!(
            as_token(&r, t, "GET", "/drplane/v1/sites", None)
                .await
                .status,
            200
        );
        assert_eq!(
            as_token(&r, t, "GET", "/drplane/v1/cluster", None)
                .await
                .status,
            200
        );
    }
    // write
    let a = as_token(
        &r,
        &member,
        "POST",
        "/drplane/v1/sites",
        Some(&site("by-member")),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text());
    let a = as_token(
        &r,
        &reader,
        "POST",
        "/drplane/v1/sites",
        Some(&site("by-reader")),
    )
    .await;
    let msg = assert_error(&a, 403, "DRP-6002");
    assert!(msg.contains("reader"), "{msg}");
    let a = as_token(&r, &reader, "DELETE", "/drplane/v1/sites/by-member", None).await;
    assert_error(&a, 403, "DRP-6002");
    // admin operations
    for t in [&member, &reader] {
        let a = as_token(
            &r,
            t,
            "POST",
            "/drplane/v1/cluster/members",
            Some(r#"{"id":2,"site":"s","http":"h:1","raft":"h:2"}"#),
        )
        .await;
        assert_error(&a, 403, "DRP-6002");
        let a = as_token(&r, t, "GET", "/drplane/v1/identity/users", None).await;
        assert_error(&a, 403, "DRP-6002");
        // Spellings that dodge the prefix never reach an identity handler.
        for sneaky in [
            "/drplane/v1/%69dentity/users",
            "//drplane/v1/identity/users",
            "/drplane/v1/identity/users/",
        ] {
            let a = as_token(&r, t, "GET", sneaky, None).await;
            assert!(a.status == 403 || a.status == 404, "{sneaky}: {}", a.text());
        }
    }
    let a = post_json(
        &r,
        "/drplane/v1/cluster/members",
        r#"{"id":2,"site":"s","http":"h:1","raft":"h:2"}"#,
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text());
    assert_eq!(get(&r, "/drplane/v1/identity/users").await.status, 200);
}

// ---- tokens: expiry, revocation, validation ----

#[tokio::test]
async fn expired_and_revoked_tokens_are_refused() {
    let (_cp, r) = setup();
    let a = post_json(
        &r,
        "/drplane/v1/identity/tokens",
        r#"{"user":"admin","expires_in_secs":1}"#,
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text());
    let short = a.json()["token"].as_str().expect("token").to_string();
    let id = a.json()["id"].as_str().expect("id").to_string();
    assert_eq!(
        as_token(&r, &short, "GET", "/drplane/v1/sites", None)
            .await
            .status,
        200
    );
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let a = as_token(&r, &short, "GET", "/drplane/v1/sites", None).await;
    let msg = assert_error(&a, 401, "DRP-6001");
    assert!(msg.contains("expired"), "{msg}");

    let t = token_of(&r, "admin", ADMIN_PASSWORD, Some("admin")).await;
    assert_eq!(
        as_token(&r, &t, "GET", "/drplane/v1/sites", None)
            .await
            .status,
        200
    );
    let listed = get(&r, "/drplane/v1/identity/tokens?user=admin")
        .await
        .json();
    assert!(
        listed["tokens"].as_array().expect("tokens").len() >= 2,
        "{listed}"
    );
    assert!(
        !listed.to_string().contains(&t),
        "a listing never shows a token"
    );
    let sid = drplane_api::auth::tokens::sha256_hex(&t);
    let a = send(
        &r,
        req("DELETE", &format!("/drplane/v1/identity/tokens/{sid}")),
    )
    .await;
    assert_eq!(a.status, 204, "{}", a.text());
    let a = as_token(&r, &t, "GET", "/drplane/v1/sites", None).await;
    let msg = assert_error(&a, 401, "DRP-6001");
    assert!(msg.contains("revoked"), "{msg}");
    let _ = id;
}

#[tokio::test]
async fn keystone_login_validate_and_revoke() {
    let (_cp, r) = setup();
    let a = keystone_login(&r, "admin", ADMIN_PASSWORD, Some("admin")).await;
    assert_eq!(a.status, 201, "{}", a.text());
    let token = a.header("x-subject-token").expect("X-Subject-Token");
    let body = a.json();
    let t = &body["token"];
    assert!(t["expires_at"].as_str().expect("expires_at").ends_with('Z'));
    assert_eq!(t["user"]["name"], "admin");
    assert_eq!(t["project"]["name"], "admin");
    assert_eq!(t["roles"][0]["name"], "admin");
    let pid = t["project"]["id"].as_str().expect("project id");
    let url_of = |ty: &str| {
        t["catalog"]
            .as_array()
            .and_then(|c| c.iter().find(|s| s["type"] == ty))
            .and_then(|s| s["endpoints"].as_array())
            .and_then(|e| e.iter().find(|e| e["interface"] == "public"))
            .and_then(|e| e["url"].as_str())
            .map(str::to_string)
    };
    assert_eq!(
        url_of("database"),
        Some(format!("http://drplane.test:7001/v1.0/{pid}"))
    );
    assert_eq!(
        url_of("sharev2"),
        Some(format!("http://drplane.test:7001/v2/{pid}"))
    );

    // The same under /identity/v3, scoped by project id, without a catalog.
    let body = json!({"auth": {
        "identity": {"methods": ["password"], "password": {"user": {"id": ADMIN_USER_ID, "password": ADMIN_PASSWORD}}},
        "scope": {"project": {"id": pid}}
    }})
    .to_string();
    let a = send_raw(
        &r,
        with_headers(
            "POST",
            "/identity/v3/auth/tokens?nocatalog",
            &[("host", "h:1")],
            Some(&body),
        ),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text());
    assert!(a.json()["token"].get("catalog").is_none());

    // Validate and revoke with X-Subject-Token.
    let check = |m: &'static str, subject: String| {
        let token = token.clone();
        let r = r.clone();
        async move {
            send_raw(
                &r,
                with_headers(
                    m,
                    "/v3/auth/tokens",
                    &[
                        ("x-auth-token", &token),
                        ("x-subject-token", &subject),
                        ("host", "h:1"),
                    ],
                    None,
                ),
            )
            .await
        }
    };
    let a = check("GET", token.clone()).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.header("x-subject-token"), Some(token.clone()));
    assert_eq!(check("GET", "1".repeat(64)).await.status, 404);
    // A member may not look at the admin's token.
    user_with_role(&r, "kim", "proj-k", "member").await;
    let kim = token_of(&r, "kim", "password-kim", None).await;
    let a = send_raw(
        &r,
        with_headers(
            "GET",
            "/v3/auth/tokens",
            &[
                ("x-auth-token", &kim),
                ("x-subject-token", &token),
                ("host", "h:1"),
            ],
            None,
        ),
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.text());
    assert_eq!(a.json()["error"]["code"], 403);
    let a = check("DELETE", token.clone()).await;
    assert_eq!(a.status, 204, "{}", a.text());
    let a = as_token(&r, &token, "GET", "/drplane/v1/sites", None).await;
    assert_error(&a, 401, "DRP-6001");
}

#[tokio::test]
async fn keystone_refusals_and_login_rate_limit() {
    let (_cp, r) = setup();
    let a = keystone_login(&r, "admin", "wrong-password", None).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.json()["error"]["code"], 401);
    assert!(a.header("x-subject-token").is_none());
    let a = keystone_login(&r, "nobody", "x", None).await;
    assert_eq!(a.status, 401);
    let a = keystone_login(&r, "admin", ADMIN_PASSWORD, Some("no-such-project")).await;
    assert_eq!(a.status, 401, "{}", a.text());
    let a = send_raw(
        &r,
        with_headers(
            "POST",
            "/v3/auth/tokens",
            &[("host", "h:1")],
            Some("{\"auth\":"),
        ),
    )
    .await;
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["error"]["code"], 400);

    // Five failures in a minute block the name, even with the right password.
    user_with_role(&r, "guess", "proj-g", "member").await;
    for _ in 0..5 {
        assert_eq!(keystone_login(&r, "guess", "nope", None).await.status, 401);
    }
    let a = keystone_login(&r, "guess", "password-guess", None).await;
    assert_eq!(a.status, 429, "{}", a.text());
    let secs: u64 = a
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&secs), "{secs}");
    // Other names are not affected.
    assert_eq!(
        keystone_login(&r, "admin", ADMIN_PASSWORD, None)
            .await
            .status,
        201
    );
}

// ---- Danube ----

#[tokio::test]
async fn danube_login_token_logout_and_api_key() {
    let (_cp, r) = setup();
    user_with_role(&r, "dana", "proj-d", "member").await;
    let login = |body: String, ct: &'static str| {
        let r = r.clone();
        async move {
            send_raw(
                &r,
                Request::builder()
                    .method("POST")
                    .uri("/api/accounts/login/")
                    .header("content-type", ct)
                    .body(Body::from(body))
                    .expect("request"),
            )
            .await
        }
    };
    let a = login(
        json!({"username": "dana", "password": "nope"}).to_string(),
        "application/json; indent=4",
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.text());
    assert!(a.json()["detail"].is_string());
    let a = login(
        "username=dana&password=password-dana".into(),
        "application/x-www-form-urlencoded",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let a = login(
        json!({"username": "dana", "password": "password-dana"}).to_string(),
        "application/json; indent=4",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let v = a.json();
    let token = v["token"].as_str().expect("token").to_string();
    assert_eq!(token.len(), 40);
    assert!(v["expires"].is_string());
    assert_eq!(v["detail"], "Welcome to Danube Cloud API.");

    let auth = format!("Token {token}");
    let a = send_raw(
        &r,
        with_headers(
            "GET",
            "/api/vm/web01/replica/",
            &[("authorization", &auth)],
            None,
        ),
    )
    .await;
    assert_eq!(
        a.status,
        404,
        "authenticated; no Danube routes yet: {}",
        a.text()
    );
    let a = send_raw(
        &r,
        with_headers(
            "GET",
            "/api/accounts/logout/",
            &[("authorization", &auth)],
            None,
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["detail"], "Bye.");
    let a = send_raw(
        &r,
        with_headers(
            "GET",
            "/api/vm/web01/replica/",
            &[("authorization", &auth)],
            None,
        ),
    )
    .await;
    assert_eq!(a.status, 401);
    assert_eq!(a.json()["detail"], "Invalid token.");

    let a = post_json(
        &r,
        "/drplane/v1/identity/api-keys",
        r#"{"user":"dana","description":"es cli"}"#,
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text());
    let key = a.json()["key"].as_str().expect("key").to_string();
    let a = send_raw(
        &r,
        with_headers(
            "GET",
            "/api/vm/web01/replica/",
            &[("es-api-key", &key)],
            None,
        ),
    )
    .await;
    assert_eq!(a.status, 404, "{}", a.text());
    let a = send_raw(
        &r,
        with_headers(
            "GET",
            "/api/vm/web01/replica/",
            &[("es-api-key", &"f".repeat(40))],
            None,
        ),
    )
    .await;
    assert_eq!(a.status, 401);
    let listed = get(&r, "/drplane/v1/identity/api-keys").await.text();
    assert!(!listed.contains(&key), "{listed}");
}

// ---- Huawei AK/SK ----

#[tokio::test]
async fn huawei_signatures_are_verified_against_the_store() {
    use drplane_api::auth::huawei::{Signer, SigningRequest};
    let (_cp, r) = setup();
    user_with_role(&r, "hua", "proj-h", "member").await;
    let a = post_json(&r, "/drplane/v1/identity/access-keys", r#"{"user":"hua"}"#).await;
    assert_eq!(a.status, 201, "{}", a.text());
    let v = a.json();
    let ak = v["access_key"].as_str().expect("ak").to_string();
    let sk = v["secret_key"].as_str().expect("sk").to_string();
    let pid = v["project_id"].as_str().expect("project").to_string();
    let listed = get(&r, "/drplane/v1/identity/access-keys").await.text();
    assert!(listed.contains(&ak) && !listed.contains(&sk), "{listed}");

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let signed = |secret: &str, project_header: &str| {
        let s = Signer {
            access_key: &ak,
            secret_key: secret,
        };
        let req = SigningRequest {
            method: "GET".into(),
            resource_path: format!("/v1/{pid}/server-groups"),
            query: vec![("limit".into(), "10".into())],
            headers: vec![
                ("Content-Type".into(), "application/json".into()),
                ("X-Project-Id".into(), project_header.to_string()),
            ],
            host: "127.0.0.1:7001".into(),
            body: Vec::new(),
        };
        let out = s.sign(&req, now);
        let mut b = Request::builder().method("GET").uri(out.uri.clone());
        for (k, v) in &out.headers {
            b = b.header(k.as_str(), v.as_str());
        }
        b.body(Body::empty()).expect("request")
    };
    let a = send_raw(&r, signed(&sk, &pid)).await;
    assert_eq!(
        a.status,
        200,
        "authenticated: the SDRS list answers: {}",
        a.text()
    );
    // The same request as HTTP/2 delivers it: the host in the URI's authority, no Host.
    let h2 = {
        let one = signed(&sk, &pid);
        let (mut parts, body) = one.into_parts();
        assert!(
            parts.headers.remove("host").is_some(),
            "the signer sets Host"
        );
        parts.uri = format!("http://127.0.0.1:7001{}", parts.uri)
            .parse()
            .expect("absolute uri");
        Request::from_parts(parts, body)
    };
    let a = send_raw(&r, h2).await;
    assert_eq!(
        a.status,
        200,
        "HTTP/2-shaped request authenticated: {}",
        a.text()
    );
    let a = send_raw(&r, signed("wrong-secret-key", &pid)).await;
    assert_eq!(a.status, 401, "{}", a.text());
    assert_eq!(a.json()["error"]["code"], "SDRS.0002");
    let a = send_raw(&r, signed(&sk, "another-project")).await;
    assert_eq!(a.status, 401, "{}", a.text());
    // Deleting the pair revokes it.
    let a = send(
        &r,
        req("DELETE", &format!("/drplane/v1/identity/access-keys/{ak}")),
    )
    .await;
    assert_eq!(a.status, 204, "{}", a.text());
    assert_eq!(send_raw(&r, signed(&sk, &pid)).await.status, 401);
}

// ---- identity admin and bootstrap ----

#[tokio::test]
async fn identity_admin_crud_and_the_last_admin() {
    let (_cp, r) = setup();
    let a = post_json(
        &r,
        "/drplane/v1/identity/projects",
        r#"{"name":"ops","description":"operations"}"#,
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text());
    let a = post_json(&r, "/drplane/v1/identity/projects", r#"{"name":"ops"}"#).await;
    assert_error(&a, 409, "DRP-3002");
    let a = post_json(
        &r,
        "/drplane/v1/identity/projects",
        r#"{"name":"bad name"}"#,
    )
    .await;
    assert_error(&a, 400, "DRP-1008");
    assert_eq!(
        get(&r, "/drplane/v1/identity/projects/ops").await.json()["description"],
        "operations"
    );

    let a = post_json(
        &r,
        "/drplane/v1/identity/users",
        r#"{"name":"olga","project":"ops","role":"admin"}"#,
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text());
    let generated = a.json()["password"]
        .as_str()
        .expect("generated password")
        .to_string();
    assert!(a.json()["role_assignments"][0]["role"] == "admin");
    let olga = token_of(&r, "olga", &generated, Some("ops")).await;
    let shown = as_token(&r, &olga, "GET", "/drplane/v1/identity/users/olga", None).await;
    assert_eq!(shown.status, 200, "{}", shown.text());
    assert!(!shown.text().contains("argon2"), "{}", shown.text());

    let a = send(
        &r,
        req(
            "PUT",
            "/drplane/v1/identity/projects/ops/users/olga/roles/reader",
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let list = get(&r, "/drplane/v1/identity/role-assignments?user=olga")
        .await
        .json();
    assert_eq!(
        list["role_assignments"].as_array().map(Vec::len),
        Some(2),
        "{list}"
    );
    let a = send(
        &r,
        req(
            "PUT",
            "/drplane/v1/identity/projects/ops/users/olga/roles/boss",
        ),
    )
    .await;
    assert_error(&a, 400, "DRP-1005");

    let a = send(
        &r,
        json_req(
            "PATCH",
            "/drplane/v1/identity/users/olga",
            r#"{"enabled":false}"#,
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let a = as_token(&r, &olga, "GET", "/drplane/v1/sites", None).await;
    assert_error(&a, 401, "DRP-6001");

    // The last enabled admin cannot be removed.
    let a = send(
        &r,
        req(
            "DELETE",
            "/drplane/v1/identity/projects/admin/users/admin/roles/admin",
        ),
    )
    .await;
    assert_error(&a, 409, "DRP-3003");
    let a = send(&r, req("DELETE", "/drplane/v1/identity/users/admin")).await;
    assert_error(&a, 409, "DRP-3003");

    let a = send(&r, req("DELETE", "/drplane/v1/identity/users/olga")).await;
    assert_eq!(a.status, 204, "{}", a.text());
    let a = send(&r, req("DELETE", "/drplane/v1/identity/projects/ops")).await;
    assert_eq!(a.status, 204, "{}", a.text());
    assert_error(
        &get(&r, "/drplane/v1/identity/projects/ops").await,
        404,
        "DRP-3001",
    );
}

#[tokio::test]
async fn init_bootstraps_the_first_admin_once() {
    // A server without DRPLANE_ADMIN_PASSWORD generates one and shows it once.
    let cp = FakeCluster::new();
    let r = drplane_api::router(cp.clone());
    let a = send_raw(&r, req("GET", "/drplane/v1/cluster")).await;
    assert_eq!(a.status, 200, "public before the first user: {}", a.text());
    let a = send_raw(
        &r,
        json_req("POST", "/drplane/v1/cluster/init", r#"{"demo":true}"#),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let v = a.json();
    let admin_pw = v["admin_password"]
        .as_str()
        .expect("admin_password")
        .to_string();
    let demo_pw = v["demo_password"]
        .as_str()
        .expect("demo_password")
        .to_string();
    assert_eq!(v["node_id"], 1);
    let admin = token_of(&r, "admin", &admin_pw, Some("admin")).await;
    let demo = token_of(&r, "demo", &demo_pw, Some("demo")).await;
    let me = as_token(&r, &demo, "GET", "/drplane/v1/auth/whoami", None)
        .await
        .json();
    assert_eq!(me["roles"], json!(["member", "reader"]));
    // Now init and the cluster view need credentials, and a second init creates nothing.
    let a = send_raw(&r, req("POST", "/drplane/v1/cluster/init")).await;
    assert_error(&a, 401, "DRP-6001");
    assert_error(
        &send_raw(&r, req("GET", "/drplane/v1/cluster")).await,
        401,
        "DRP-6001",
    );
    let a = as_token(&r, &admin, "POST", "/drplane/v1/cluster/init", None).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert!(a.json().get("admin_password").is_none(), "{}", a.text());
    let a = as_token(&r, &demo, "POST", "/drplane/v1/cluster/init", None).await;
    assert_error(&a, 403, "DRP-6002");

    // With DRPLANE_ADMIN_PASSWORD the password is not echoed.
    let (_cp, r) = setup_fresh();
    let a = send_raw(&r, req("POST", "/drplane/v1/cluster/init")).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert!(a.json().get("admin_password").is_none());
    token_of(&r, "admin", ADMIN_PASSWORD, None).await;
}
