//! Credentials of `drplane dev`: the admin password the nodes are started with
//! (`DRPLANE_ADMIN_PASSWORD`), and working credentials of the `demo` user for every API
//! family, kept in `<dir>/credentials.json` (mode 0600) so a resumed cluster prints the
//! same ones.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// What `<dir>/credentials.json` holds. Local development secrets only.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct DevCredentials {
    pub admin_password: String,
    #[serde(default)]
    pub demo_password: Option<String>,
    /// Danube `ES-API-KEY` of `demo`.
    #[serde(default)]
    pub danube_api_key: Option<String>,
    /// Huawei AK/SK of `demo`.
    #[serde(default)]
    pub huawei_access_key: Option<String>,
    #[serde(default)]
    pub huawei_secret_key: Option<String>,
}

pub(crate) fn credentials_path(dir: &Path) -> PathBuf {
    dir.join("credentials.json")
}

/// A random password: 24 letters and digits.
pub(crate) fn random_password() -> String {
    use rand::Rng;
    const ALNUM: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut rng = rand::rngs::OsRng;
    (0..24)
        .map(|_| ALNUM[rng.gen_range(0..ALNUM.len())] as char)
        .collect()
}

/// Reads the credentials file, or makes a new admin password when there is none.
/// `existing_data`: the directory already holds node data; a missing file is then an
/// error (the admin password of that data is unknown).
pub(crate) fn load_or_create(dir: &Path, existing_data: bool) -> anyhow::Result<DevCredentials> {
    let path = credentials_path(dir);
    match std::fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if existing_data {
                bail!(
                    "{} holds node data but no credentials.json: the admin password of that \
                     cluster is unknown. Remove the directory to start afresh, or use another --dir",
                    dir.display()
                );
            }
            let creds = DevCredentials {
                admin_password: random_password(),
                ..Default::default()
            };
            save(dir, &creds)?;
            Ok(creds)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

pub(crate) fn save(dir: &Path, creds: &DevCredentials) -> anyhow::Result<()> {
    let path = credentials_path(dir);
    let tmp = dir.join("credentials.json.tmp");
    let bytes = serde_json::to_vec_pretty(creds)?;
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(&bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let mut rb = http
        .request(method.clone(), url)
        .header("X-Auth-Token", token);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = rb.send().await.map_err(|e| {
        anyhow!(
            "{method} {url}: {}",
            crate::cli::describe_transport_error(&e)
        )
    })?;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("{method} {url}: {status}: {v}");
    }
    Ok(v)
}

/// The demo user's credentials for every family, created once (as admin) when missing.
/// `None` when the cluster has no `demo` user (data from before `drplane dev` made one).
pub(crate) async fn ensure_demo_credentials(
    http: &reqwest::Client,
    base: &str,
    admin_token: &str,
    dir: &Path,
    creds: &mut DevCredentials,
) -> anyhow::Result<Option<DemoView>> {
    if creds.demo_password.is_none() {
        return Ok(None);
    }
    let user = call(
        http,
        reqwest::Method::GET,
        &format!("{base}/drplane/v1/identity/users/demo"),
        admin_token,
        None,
    )
    .await;
    let Ok(user) = user else {
        return Ok(None);
    };
    let project_id = user
        .get("default_project_id")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("user demo has no default project"))?
        .to_string();
    let mut changed = false;
    if creds.danube_api_key.is_none() {
        let v = call(
            http,
            reqwest::Method::POST,
            &format!("{base}/drplane/v1/identity/api-keys"),
            admin_token,
            Some(json!({"user": "demo", "description": "drplane dev"})),
        )
        .await?;
        creds.danube_api_key = v.get("key").and_then(Value::as_str).map(str::to_string);
        changed = true;
    }
    if creds.huawei_access_key.is_none() || creds.huawei_secret_key.is_none() {
        let v = call(
            http,
            reqwest::Method::POST,
            &format!("{base}/drplane/v1/identity/access-keys"),
            admin_token,
            Some(json!({"user": "demo", "description": "drplane dev"})),
        )
        .await?;
        creds.huawei_access_key = v
            .get("access_key")
            .and_then(Value::as_str)
            .map(str::to_string);
        creds.huawei_secret_key = v
            .get("secret_key")
            .and_then(Value::as_str)
            .map(str::to_string);
        changed = true;
    }
    if changed {
        save(dir, creds)?;
    }
    // A native token of demo, valid for a day.
    let v = call(
        http,
        reqwest::Method::POST,
        &format!("{base}/drplane/v1/identity/tokens"),
        admin_token,
        Some(json!({"user": "demo", "expires_in_secs": 86_400})),
    )
    .await?;
    Ok(Some(DemoView {
        project_id,
        token: v
            .get("token")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        token_expires_at: v
            .get("expires_at")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
    }))
}

/// What is only known at run time.
pub(crate) struct DemoView {
    pub project_id: String,
    pub token: String,
    pub token_expires_at: String,
}

/// The credentials block `drplane dev` prints.
pub(crate) fn render(
    base: &str,
    dir: &Path,
    creds: &DevCredentials,
    demo: Option<&DemoView>,
) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "credentials (kept in {}):",
        credentials_path(dir).display()
    ));
    line(format!(
        "  admin       user admin, password {}, project admin",
        creds.admin_password
    ));
    line(format!(
        "              export DRPLANE_USER=admin DRPLANE_PASSWORD={}",
        creds.admin_password
    ));
    match (demo, &creds.demo_password) {
        (Some(d), Some(pw)) => {
            line(format!(
                "  native      X-Auth-Token: {} (user demo, project demo, until {})",
                d.token, d.token_expires_at
            ));
            line(format!(
                "  keystone    OS_AUTH_URL={base}/v3 OS_USERNAME=demo OS_PASSWORD={pw} OS_PROJECT_NAME=demo \
                 OS_USER_DOMAIN_NAME=Default OS_PROJECT_DOMAIN_NAME=Default   (Trove: {base}/v1.0/{p}, Manila: {base}/v2/{p})",
                p = d.project_id
            ));
            if let Some(k) = &creds.danube_api_key {
                line(format!(
                    "  danube      ES-API-KEY: {k}   (or POST {base}/api/accounts/login/ as demo / {pw})"
                ));
            }
            if let (Some(ak), Some(sk)) = (&creds.huawei_access_key, &creds.huawei_secret_key) {
                line(format!(
                    "  huawei      AK {ak} SK {sk} project_id {} endpoint {base}   (SDRS, ECS)",
                    d.project_id
                ));
            }
        }
        _ => line(
            "  (no demo user in this cluster: create users with `drplane identity users create`)"
                .to_string(),
        ),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_file_roundtrip_and_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load_or_create(dir.path(), true).is_err());
        let c = load_or_create(dir.path(), false).expect("create");
        assert_eq!(c.admin_password.len(), 24);
        let again = load_or_create(dir.path(), true).expect("load");
        assert_eq!(again.admin_password, c.admin_password);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(credentials_path(dir.path()))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = render("http://127.0.0.1:7001", dir.path(), &c, None);
        assert!(text.contains(&c.admin_password));
    }
}
