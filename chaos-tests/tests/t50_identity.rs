//! Identity and access against real processes: the bootstrap admin logs in; tokens are
//! refused when missing, unknown, expired, revoked or used on another project's paths; the
//! role matrix of the native API; failed logins are rate-limited; the CLI authenticates.

use std::time::Duration;

use chaos_tests::{cli, cli_env, Cluster, Reply, ADMIN_PASSWORD};
use serde_json::{json, Value};

/// Slower elections for CI: see [`chaos_tests::SLOW_ELECTIONS`].
const TIMING: &[&str] = chaos_tests::SLOW_ELECTIONS;

async fn with_token(
    c: &Cluster,
    id: u64,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<Reply> {
    c.request(id, method, path, body, &[("x-auth-token", token)])
        .await
}

/// A request with no credentials at all.
async fn anonymous(c: &Cluster, id: u64, path: &str) -> anyhow::Result<Reply> {
    let resp = c
        .client_with_token(None)?
        .get(format!("{}{path}", c.url(id)))
        .send()
        .await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    Ok(Reply {
        status,
        retry_after: None,
        content_type: None,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    })
}

fn assert_native(r: &Reply, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.body["error"]["code"], code, "{}", r.text);
}

/// Creates `project` (if needed) and user `name` with `role` on it; the password is
/// `pw-<name>-1234`.
async fn user_with_role(c: &Cluster, name: &str, project: &str, role: &str) -> anyhow::Result<()> {
    let r = c
        .post(
            1,
            "/drplane/v1/identity/projects",
            &json!({"name": project}),
        )
        .await?;
    assert!(r.status == 201 || r.status == 409, "{}", r.text);
    let r = c
        .post(
            1,
            "/drplane/v1/identity/users",
            &json!({"name": name, "password": format!("pw-{name}-1234"), "project": project, "role": role}),
        )
        .await?;
    assert_eq!(r.status, 201, "{}", r.text);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_valid_missing_expired_revoked_and_wrong_project() -> anyhow::Result<()> {
    let c = Cluster::start(&["site-a", "site-b", "site-c"], TIMING).await?;

    // The bootstrap admin logs in on one node; the token works at once on another (a
    // miss there waits for one read barrier).
    let admin = c.login(2, "admin", ADMIN_PASSWORD, Some("admin")).await?;
    let r = with_token(
        &c,
        3,
        &admin,
        reqwest::Method::GET,
        "/drplane/v1/sites",
        None,
    )
    .await?;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = c
        .keystone_login(1, "admin", "not-the-password", None)
        .await?;
    assert_eq!(r.status, 401, "{}", r.text);
    assert_eq!(r.body["error"]["code"], 401, "keystone shape: {}", r.text);

    // Missing and unknown tokens.
    assert_native(
        &anonymous(&c, 1, "/drplane/v1/sites").await?,
        401,
        "DRP-6001",
    );
    let r = with_token(
        &c,
        1,
        &"ab".repeat(32),
        reqwest::Method::GET,
        "/drplane/v1/sites",
        None,
    )
    .await?;
    assert_native(&r, 401, "DRP-6001");
    // Health stays public.
    assert_eq!(anonymous(&c, 1, "/readyz").await?.status, 200);

    // A short-lived token expires.
    let r = c
        .post(
            1,
            "/drplane/v1/identity/tokens",
            &json!({"user": "admin", "expires_in_secs": 2}),
        )
        .await?;
    assert_eq!(r.status, 201, "{}", r.text);
    let short = r.body["token"].as_str().unwrap_or_default().to_string();
    let r = with_token(
        &c,
        2,
        &short,
        reqwest::Method::GET,
        "/drplane/v1/sites",
        None,
    )
    .await?;
    assert_eq!(r.status, 200, "{}", r.text);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let r = with_token(
        &c,
        2,
        &short,
        reqwest::Method::GET,
        "/drplane/v1/sites",
        None,
    )
    .await?;
    assert_native(&r, 401, "DRP-6001");
    assert!(r.text.contains("expired"), "{}", r.text);

    // A revoked token is refused by every node.
    let t = c.login(1, "admin", ADMIN_PASSWORD, None).await?;
    let r = c
        .request(
            1,
            reqwest::Method::DELETE,
            "/v3/auth/tokens",
            None,
            &[("x-auth-token", &t), ("x-subject-token", &t)],
        )
        .await?;
    assert_eq!(r.status, 204, "{}", r.text);
    for id in c.ids() {
        let r = with_token(&c, id, &t, reqwest::Method::GET, "/drplane/v1/sites", None).await?;
        assert_native(&r, 401, "DRP-6001");
        assert!(r.text.contains("revoked"), "node {id}: {}", r.text);
    }

    // Wrong project: a member of proj-a cannot use proj-b's paths, in the family's shape.
    user_with_role(&c, "ana", "proj-a", "member").await?;
    let r = c
        .post(
            1,
            "/drplane/v1/identity/projects",
            &json!({"name": "proj-b"}),
        )
        .await?;
    assert_eq!(r.status, 201, "{}", r.text);
    let pb = r.body["id"].as_str().unwrap_or_default().to_string();
    let ana = c.login(3, "ana", "pw-ana-1234", Some("proj-a")).await?;
    let me = with_token(
        &c,
        3,
        &ana,
        reqwest::Method::GET,
        "/drplane/v1/auth/whoami",
        None,
    )
    .await?;
    assert_eq!(me.body["project_name"], "proj-a", "{}", me.text);
    let pa = me.body["project_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let r = with_token(
        &c,
        3,
        &ana,
        reqwest::Method::GET,
        &format!("/v1.0/{pb}/instances"),
        None,
    )
    .await?;
    assert_eq!(r.status, 403, "{}", r.text);
    assert_eq!(r.body["forbidden"]["code"], 403, "{}", r.text);
    let r = with_token(
        &c,
        3,
        &ana,
        reqwest::Method::GET,
        &format!("/v2/{pb}/share-replicas"),
        None,
    )
    .await?;
    assert_eq!(r.status, 403, "{}", r.text);
    let r = with_token(
        &c,
        3,
        &ana,
        reqwest::Method::GET,
        &format!("/v1/{pb}/server-groups"),
        None,
    )
    .await?;
    assert_eq!(r.body["error"]["code"], "SDRS.0005", "{}", r.text);
    // Its own project passes authentication (whatever the family then answers).
    let r = with_token(
        &c,
        3,
        &ana,
        reqwest::Method::GET,
        &format!("/v1.0/{pa}/instances"),
        None,
    )
    .await?;
    assert!(r.status != 401 && r.status != 403, "{}", r.text);
    // A login scoped to a project the user has no role on is refused.
    let r = c
        .keystone_login(1, "ana", "pw-ana-1234", Some("proj-b"))
        .await?;
    assert_eq!(r.status, 401, "{}", r.text);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_matrix_and_login_rate_limit() -> anyhow::Result<()> {
    let c = Cluster::start(&["site-a"], TIMING).await?;
    user_with_role(&c, "mo", "proj-m", "member").await?;
    user_with_role(&c, "ray", "proj-m", "reader").await?;
    let admin = c.login(1, "admin", ADMIN_PASSWORD, None).await?;
    let member = c.login(1, "mo", "pw-mo-1234", None).await?;
    let reader = c.login(1, "ray", "pw-ray-1234", None).await?;

    // (role, token, expected read, write, admin-op statuses)
    let cases = [
        ("admin", &admin, 200, 201, 201),
        ("member", &member, 200, 201, 403),
        ("reader", &reader, 200, 403, 403),
    ];
    for (role, token, read, write, admin_op) in cases {
        let r = with_token(
            &c,
            1,
            token,
            reqwest::Method::GET,
            "/drplane/v1/sites",
            None,
        )
        .await?;
        assert_eq!(r.status, read, "{role} read: {}", r.text);
        let r = with_token(
            &c,
            1,
            token,
            reqwest::Method::POST,
            "/drplane/v1/sites",
            Some(&json!({"name": format!("site-by-{role}")})),
        )
        .await?;
        assert_eq!(r.status, write, "{role} write: {}", r.text);
        let r = with_token(
            &c,
            1,
            token,
            reqwest::Method::POST,
            "/drplane/v1/identity/projects",
            Some(&json!({"name": format!("proj-by-{role}")})),
        )
        .await?;
        assert_eq!(r.status, admin_op, "{role} admin op: {}", r.text);
        if admin_op == 403 {
            assert_eq!(r.body["error"]["code"], "DRP-6002", "{}", r.text);
        }
        // Cluster membership is an admin operation too.
        let r = with_token(
            &c,
            1,
            token,
            reqwest::Method::POST,
            "/drplane/v1/cluster/members/99/promote",
            None,
        )
        .await?;
        if role == "admin" {
            // Past authorization: the cluster itself answers (no member 99).
            assert!(
                r.status != 401 && r.status != 403,
                "admin membership: {}",
                r.text
            );
        } else {
            assert_eq!(r.status, 403, "{role} membership: {}", r.text);
        }
    }
    // The reader sees the member's site: one project's readers read what members wrote.
    let r = with_token(
        &c,
        1,
        &reader,
        reqwest::Method::GET,
        "/drplane/v1/sites/site-by-member",
        None,
    )
    .await?;
    assert_eq!(r.status, 200, "{}", r.text);

    // Five failed logins in a minute block the name (even the right password), per name.
    for i in 0..5 {
        let r = c.keystone_login(1, "mo", "wrong-password", None).await?;
        assert_eq!(r.status, 401, "attempt {i}: {}", r.text);
    }
    let r = c.keystone_login(1, "mo", "pw-mo-1234", None).await?;
    assert_eq!(r.status, 429, "{}", r.text);
    let secs: u64 = r
        .retry_after
        .as_deref()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert!((1..=60).contains(&secs), "Retry-After {:?}", r.retry_after);
    // The Danube login of the same name is limited too; other names are not.
    let r = c
        .request(
            1,
            reqwest::Method::POST,
            "/api/accounts/login/",
            Some(&json!({"username": "mo", "password": "pw-mo-1234"})),
            &[],
        )
        .await?;
    assert_eq!(r.status, 429, "{}", r.text);
    assert!(r.body["detail"].is_string(), "{}", r.text);
    c.login(1, "ray", "pw-ray-1234", None).await?;
    // The log names the user of a failed login but never the password.
    let log = c.log_text(1);
    assert!(
        log.contains("login failed") && log.contains("mo"),
        "no login failure logged"
    );
    assert!(
        !log.contains("wrong-password"),
        "a password reached the log"
    );
    assert!(!log.contains(&reader), "a token reached the log");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_logs_in_and_administers_identity() -> anyhow::Result<()> {
    let c = Cluster::start(&["site-a"], TIMING).await?;
    let endpoint = c.url(1);

    // Without credentials the CLI is refused with a hint.
    let (ok, _, err) = cli_env(&["sites", "list", "--endpoint", &endpoint], &[])?;
    assert!(
        !ok && err.contains("DRP-6001") && err.contains("--token"),
        "{err}"
    );

    // Admin (DRPLANE_USER/DRPLANE_PASSWORD from the harness) creates a member.
    let (ok, out, err) = cli(&[
        "identity",
        "users",
        "create",
        "cleo",
        "--in-project",
        "admin",
        "--role",
        "member",
        "--endpoint",
        &endpoint,
    ])?;
    assert!(ok, "{err}");
    let password = out
        .lines()
        .find_map(|l| l.strip_prefix("password (shown only once): "))
        .unwrap_or_default()
        .to_string();
    assert_eq!(password.len(), 24, "{out}");

    // cleo logs in and uses the token.
    let (ok, token, err) = cli_env(
        &["identity", "login", "--endpoint", &endpoint],
        &[("DRPLANE_USER", "cleo"), ("DRPLANE_PASSWORD", &password)],
    )?;
    assert!(ok, "{err}");
    let token = token.trim().to_string();
    let (ok, out, err) = cli_env(
        &["identity", "whoami", "--endpoint", &endpoint, "-o", "json"],
        &[("DRPLANE_TOKEN", &token)],
    )?;
    assert!(ok, "{err}");
    let me: Value = serde_json::from_str(&out)?;
    assert_eq!(me["user_name"], "cleo");
    assert_eq!(me["roles"], json!(["member", "reader"]));
    let (ok, _, err) = cli_env(
        &[
            "sites",
            "create",
            "--name",
            "by-cleo",
            "--endpoint",
            &endpoint,
        ],
        &[("DRPLANE_TOKEN", &token)],
    )?;
    assert!(ok, "{err}");
    let (ok, _, err) = cli_env(
        &["identity", "users", "list", "--endpoint", &endpoint],
        &[("DRPLANE_TOKEN", &token)],
    )?;
    assert!(!ok && err.contains("DRP-6002"), "{err}");

    // Credentials for the other families, through the CLI.
    let (ok, out, err) = cli(&[
        "identity",
        "access-keys",
        "create",
        "cleo",
        "--endpoint",
        &endpoint,
    ])?;
    assert!(
        ok && out.contains("secret key (shown only once): "),
        "{out}{err}"
    );
    let (ok, out, err) = cli(&[
        "identity",
        "api-keys",
        "create",
        "cleo",
        "--endpoint",
        &endpoint,
    ])?;
    assert!(
        ok && out.contains("api key (shown only once): "),
        "{out}{err}"
    );
    let key = out
        .lines()
        .find_map(|l| l.strip_prefix("api key (shown only once): "))
        .unwrap_or_default()
        .to_string();
    let r = c
        .request(
            1,
            reqwest::Method::GET,
            "/api/vm/web01/replica/",
            None,
            &[("es-api-key", &key)],
        )
        .await?;
    assert!(r.status != 401 && r.status != 403, "{}", r.text);
    let (ok, out, err) = cli(&[
        "identity",
        "roles",
        "list",
        "--of-user",
        "cleo",
        "--endpoint",
        &endpoint,
    ])?;
    assert!(ok && out.contains("member"), "{out}{err}");
    let (ok, _, err) = cli(&[
        "identity",
        "users",
        "delete",
        "cleo",
        "--endpoint",
        &endpoint,
    ])?;
    assert!(ok, "{err}");
    let (ok, _, err) = cli_env(
        &["identity", "whoami", "--endpoint", &endpoint],
        &[("DRPLANE_TOKEN", &token)],
    )?;
    assert!(
        !ok && err.contains("DRP-6001"),
        "a deleted user's token is refused: {err}"
    );
    Ok(())
}
