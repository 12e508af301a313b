//! The operator's CLI: `drplane cluster …` and `drplane sites …`, over the HTTP API of any
//! member.
//!
//! The contract scripts rely on:
//! - `--endpoint` (env `DRPLANE_ENDPOINT`, default `http://127.0.0.1:7001`) is a
//!   comma-separated list of node URLs (`http://` or `https://`); a URL without a scheme
//!   gets `http://`. They are tried
//!   in turn when a connection cannot be made, never after an HTTP error answer (any node
//!   forwards writes to the leader, so another node would give the same answer).
//! - `-o json` prints the server's JSON, pretty-printed, fields unchanged; `-o table`
//!   (the default) prints aligned columns for people.
//! - An error answer prints `error: <message>` and `fix: <fix>` on stderr and exits
//!   non-zero; so does a connection failure, naming the endpoints tried.
//! - `--ca FILE` (env `DRPLANE_CA`): PEM certificate(s) of the cluster CA, the only roots
//!   trusted for `https://` endpoints (there are no built-in roots). An endpoint whose
//!   certificate does not verify fails like an unreachable one, saying so.
//! - Credentials: `--token` (env `DRPLANE_TOKEN`) is sent as `X-Auth-Token`; otherwise
//!   `--user`/`--password` (`DRPLANE_USER`/`DRPLANE_PASSWORD`, optionally
//!   `--login-project`/`DRPLANE_PROJECT`) log in through `POST /v3/auth/tokens` on the
//!   first endpoint that answers, once per command. `cluster init` is sent without
//!   credentials first (a new node needs none) and with them if the node asks.
//!
//! Why a timed-out request is not always retried on the next endpoint: a write may have
//! been applied even though its answer never came. Reads are retried; site writes carry an
//! `Idempotency-Key` (the same on every attempt), so the server applies them at most once
//! and they are retried too; membership changes are not, the operator checks
//! `cluster status` first.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use serde_json::Value;

/// Default endpoint: node 1 of `drplane dev`.
pub(crate) const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:7001";

/// Per-request deadline of the CLI.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for opening a TCP connection; a dead endpoint must not eat the whole timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Output format of every command.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    /// Aligned columns for people.
    #[default]
    Table,
    /// The server's JSON, pretty-printed.
    Json,
}

/// Where to send requests and how to print answers; shared by `cluster` and `sites`.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnArgs {
    /// Node URL(s), comma-separated; each is tried in turn when it cannot be reached.
    #[arg(
        long,
        env = "DRPLANE_ENDPOINT",
        default_value = DEFAULT_ENDPOINT,
        global = true,
        value_name = "URL[,URL…]"
    )]
    pub endpoint: String,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    /// Token sent as X-Auth-Token (e.g. from `drplane identity login`).
    #[arg(long, env = "DRPLANE_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// User to log in as (through POST /v3/auth/tokens) when no --token is given.
    #[arg(long, env = "DRPLANE_USER", global = true)]
    pub user: Option<String>,
    /// Password of --user (prefer the environment: a flag shows in `ps`).
    #[arg(long, env = "DRPLANE_PASSWORD", global = true, hide_env_values = true)]
    pub password: Option<String>,
    /// Project to log in to (name or id); the user's default project when absent.
    #[arg(long, env = "DRPLANE_PROJECT", global = true)]
    pub login_project: Option<String>,
    /// PEM file of the cluster CA, trusted for https:// endpoints (e.g. <dir>/tls/ca.pem of
    /// `drplane dev --tls`).
    #[arg(long, env = "DRPLANE_CA", global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

impl ConnArgs {
    /// The credentials these arguments give.
    pub(crate) fn credentials(&self) -> anyhow::Result<Credentials> {
        if let Some(t) = self.token.as_deref().filter(|t| !t.trim().is_empty()) {
            return Ok(Credentials::Token(t.trim().to_string()));
        }
        match (&self.user, &self.password) {
            (Some(user), Some(password)) => Ok(Credentials::Password {
                user: user.clone(),
                password: password.clone(),
                project: self.login_project.clone(),
            }),
            (Some(_), None) => {
                bail!("--user needs --password (or DRPLANE_PASSWORD)")
            }
            _ => Ok(Credentials::None),
        }
    }

    /// The API client for these arguments.
    pub(crate) fn api(&self) -> anyhow::Result<Api> {
        Ok(Api::with_ca(&self.endpoint, self.ca.as_deref())?.with_credentials(self.credentials()?))
    }
}

/// A reqwest client builder for the HTTP API: with `ca`, one trusting exactly the CA
/// certificates in that PEM file (see [`crate::tls::https_client_builder`]); without, a
/// plain one (an `https://` endpoint then fails verification: no roots are built in).
pub(crate) fn client_builder(ca: Option<&Path>) -> anyhow::Result<reqwest::ClientBuilder> {
    match ca {
        None => Ok(reqwest::Client::builder()),
        Some(path) => {
            let pem = std::fs::read(path)
                .with_context(|| format!("cannot read the CA file {} (--ca)", path.display()))?;
            crate::tls::https_client_builder(&pem)
                .with_context(|| format!("CA file {} (--ca)", path.display()))
        }
    }
}

/// `X-Auth-Token: <token>` as default headers of a client (empty without a token).
pub(crate) fn auth_headers(token: Option<&str>) -> anyhow::Result<reqwest::header::HeaderMap> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        let mut v = reqwest::header::HeaderValue::from_str(t)
            .map_err(|_| anyhow!("the token is not a valid header value"))?;
        v.set_sensitive(true);
        headers.insert("x-auth-token", v);
    }
    Ok(headers)
}

/// How the CLI proves who it is.
#[derive(Clone)]
pub(crate) enum Credentials {
    None,
    Token(String),
    Password {
        user: String,
        password: String,
        project: Option<String>,
    },
}

/// `drplane cluster …`
#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(subcommand)]
    pub command: ClusterCommand,
}

/// A member id plus the site-majority override.
#[derive(clap::Args, Debug, Clone)]
pub struct MemberTarget {
    /// Member (node) id.
    #[arg(long)]
    pub id: u64,
    /// Allow a change that leaves one site holding a majority of the voters.
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum ClusterCommand {
    /// Make a one-node cluster of the node at --endpoint.
    Init,
    /// Add a node as a learner (through any member).
    Add {
        /// The new node's id.
        #[arg(long)]
        id: u64,
        /// The site the new node runs in.
        #[arg(long)]
        site: String,
        /// The new node's HTTP address, host:port.
        #[arg(long)]
        http: String,
        /// The new node's Raft gRPC address, host:port.
        #[arg(long)]
        raft: String,
    },
    /// Learner -> voter.
    Promote(MemberTarget),
    /// Voter -> learner.
    Demote(MemberTarget),
    /// Remove a member from the cluster.
    Remove(MemberTarget),
    /// List the members: id, site, addresses, role, leader, matched index, lag.
    Members,
    /// The whole cluster: leader, term, indexes and members.
    Status,
}

/// `drplane sites …`
#[derive(clap::Args, Debug)]
pub struct SitesArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(subcommand)]
    pub command: SitesCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum SitesCommand {
    /// Create a site.
    Create {
        /// Site name: letters, digits, '.', '_' and '-', at most 63 characters.
        #[arg(long)]
        name: String,
        /// Free text, at most 1024 bytes.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List all sites.
    List,
    /// Show one site.
    Show {
        /// Site name.
        name: String,
    },
    /// Delete a site.
    Delete {
        /// Site name.
        name: String,
    },
}

pub async fn run_cluster(args: ClusterArgs) -> anyhow::Result<()> {
    let api = args.conn.api()?;
    let out = args.conn.output;
    match args.command {
        ClusterCommand::Init => {
            let status = api
                .send(Req::post("/drplane/v1/cluster/init", None).anonymous_first())
                .await?
                .into_json()?;
            print_status_result(out, &status, "initialized a one-node cluster")?;
            if out == Output::Table {
                if let Some(pw) = status.value.get("admin_password").and_then(Value::as_str) {
                    println!();
                    println!("created user 'admin' (role admin on project 'admin')");
                    println!("admin password (shown only once): {pw}");
                } else {
                    println!();
                    println!(
                        "user 'admin' has the password of the server's DRPLANE_ADMIN_PASSWORD \
                         (or was created earlier)"
                    );
                }
            }
            Ok(())
        }
        ClusterCommand::Add {
            id,
            site,
            http,
            raft,
        } => {
            let body = serde_json::json!({"id": id, "site": site, "http": http, "raft": raft});
            let status = api
                .send(Req::post("/drplane/v1/cluster/members", Some(body)))
                .await?
                .into_json()?;
            print_status_result(out, &status, &format!("added node {id} as a learner"))
        }
        ClusterCommand::Promote(t) => {
            let path = member_op_path(t.id, "promote", t.force);
            let status = api.send(Req::post(&path, None)).await?.into_json()?;
            print_status_result(out, &status, &format!("promoted node {} to voter", t.id))
        }
        ClusterCommand::Demote(t) => {
            let path = member_op_path(t.id, "demote", t.force);
            let status = api.send(Req::post(&path, None)).await?.into_json()?;
            print_status_result(out, &status, &format!("demoted node {} to learner", t.id))
        }
        ClusterCommand::Remove(t) => {
            let path = format!("/drplane/v1/cluster/members/{}?force={}", t.id, t.force);
            let status = api.send(Req::delete(&path)).await?.into_json()?;
            print_status_result(out, &status, &format!("removed node {}", t.id))
        }
        ClusterCommand::Members => {
            let members = api
                .send(Req::get("/drplane/v1/cluster/members"))
                .await?
                .into_json()?;
            match out {
                Output::Json => print_json(&members),
                Output::Table => print!("{}", render_members(&members.value)?),
            }
            Ok(())
        }
        ClusterCommand::Status => {
            let status = api
                .send(Req::get("/drplane/v1/cluster"))
                .await?
                .into_json()?;
            match out {
                Output::Json => print_json(&status),
                Output::Table => print!("{}", render_status(&status.value)?),
            }
            Ok(())
        }
    }
}

pub async fn run_sites(args: SitesArgs) -> anyhow::Result<()> {
    let api = args.conn.api()?;
    let out = args.conn.output;
    match args.command {
        SitesCommand::Create { name, description } => {
            let body = serde_json::json!({"name": name, "description": description});
            let site = api
                .send(Req::post("/drplane/v1/sites", Some(body)).idempotent_write())
                .await?
                .into_json()?;
            match out {
                Output::Json => print_json(&site),
                Output::Table => print!("{}", render_sites(std::slice::from_ref(&site.value))),
            }
            Ok(())
        }
        SitesCommand::List => {
            let answer = api.send(Req::get("/drplane/v1/sites")).await?.into_json()?;
            match out {
                Output::Json => print_json(&answer),
                Output::Table => {
                    let sites = answer
                        .value
                        .get("sites")
                        .and_then(Value::as_array)
                        .ok_or_else(|| anyhow!("unexpected answer: no \"sites\" array"))?;
                    print!("{}", render_sites(sites));
                }
            }
            Ok(())
        }
        SitesCommand::Show { name } => {
            let path = format!("/drplane/v1/sites/{}", encode_path_segment(&name));
            let site = api.send(Req::get(&path)).await?.into_json()?;
            match out {
                Output::Json => print_json(&site),
                Output::Table => print!("{}", render_sites(std::slice::from_ref(&site.value))),
            }
            Ok(())
        }
        SitesCommand::Delete { name } => {
            let path = format!("/drplane/v1/sites/{}", encode_path_segment(&name));
            let answer = api.send(Req::delete(&path).idempotent_write()).await?;
            match out {
                // 204 has no body: there is no server JSON to print.
                Output::Json => {
                    if !answer.raw.trim().is_empty() {
                        println!("{}", pretty_json(&answer.raw));
                    }
                }
                Output::Table => println!("deleted site {name}"),
            }
            Ok(())
        }
    }
}

fn member_op_path(id: u64, op: &str, force: bool) -> String {
    format!("/drplane/v1/cluster/members/{id}/{op}?force={force}")
}

/// The server's JSON as it sent it (field order kept), pretty-printed.
pub(crate) fn print_json(doc: &Doc) {
    println!("{}", pretty_json(&doc.raw));
}

/// Re-indents valid JSON text like `serde_json::to_string_pretty`, keeping the order of
/// fields and the text of every scalar exactly as given.
pub(crate) fn pretty_json(raw: &str) -> String {
    fn newline(out: &mut String, indent: usize) {
        out.push('\n');
        for _ in 0..indent {
            out.push_str("  ");
        }
    }
    let chars: Vec<char> = raw.trim().chars().collect();
    let mut out = String::with_capacity(raw.len() * 2);
    let mut indent = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                out.push(c);
                if j < chars.len() && chars[j] == close {
                    out.push(close);
                    i = j + 1;
                } else {
                    indent += 1;
                    newline(&mut out, indent);
                }
            }
            '}' | ']' => {
                indent = indent.saturating_sub(1);
                newline(&mut out, indent);
                out.push(c);
            }
            ',' => {
                out.push(',');
                newline(&mut out, indent);
            }
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

fn print_status_result(out: Output, status: &Doc, what: &str) -> anyhow::Result<()> {
    match out {
        Output::Json => print_json(status),
        Output::Table => {
            println!("{what}");
            println!();
            print!("{}", render_status(&status.value)?);
        }
    }
    Ok(())
}

// ---- endpoints and requests ----

/// Parses a comma-separated endpoint list into base URLs (`http://host:port` or
/// `https://host:port`, no trailing slash).
pub(crate) fn parse_endpoints(list: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for raw in list.split(',') {
        let raw = raw.trim();
        if raw.is_empty() {
            continue;
        }
        out.push(normalize_endpoint(raw)?);
    }
    if out.is_empty() {
        bail!("no endpoint given: pass --endpoint URL[,URL…] or set DRPLANE_ENDPOINT");
    }
    Ok(out)
}

/// `host:port` -> `http://host:port`; the scheme lower-cased, trailing slashes removed.
/// `http://` and `https://` are accepted.
pub(crate) fn normalize_endpoint(raw: &str) -> anyhow::Result<String> {
    let raw = raw.trim();
    let (scheme, rest) = match raw.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => ("http", rest),
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => ("https", rest),
        Some((scheme, _)) => {
            bail!("endpoint '{raw}': use http:// or https:// (got {scheme}://)")
        }
        None => ("http", raw),
    };
    let with_scheme = format!("{scheme}://{rest}");
    let trimmed = with_scheme.trim_end_matches('/');
    if trimmed.len() <= scheme.len() + 3 {
        bail!("endpoint '{raw}' has no host");
    }
    let url = reqwest::Url::parse(trimmed)
        .with_context(|| format!("endpoint '{raw}' is not a valid URL"))?;
    if url.host_str().is_none_or(str::is_empty) {
        bail!("endpoint '{raw}' has no host");
    }
    if url.query().is_some() || url.fragment().is_some() {
        bail!("endpoint '{raw}' must not have a query or fragment");
    }
    Ok(trimmed.to_string())
}

/// Percent-encodes one path segment (everything but unreserved characters).
pub(crate) fn encode_path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[derive(Debug, Clone)]
pub(crate) struct Req {
    method: reqwest::Method,
    path: String,
    body: Option<Value>,
    /// Safe to send again to another endpoint after a timeout.
    retry_on_timeout: bool,
    /// Sent as `Idempotency-Key` (the same on every attempt).
    idempotency_key: Option<String>,
    /// Sent without credentials first; again with them only if the server answers 401.
    anonymous_first: bool,
}

impl Req {
    pub(crate) fn new(method: reqwest::Method, path: &str, body: Option<Value>) -> Req {
        Req {
            retry_on_timeout: method == reqwest::Method::GET,
            method,
            path: path.to_string(),
            body,
            idempotency_key: None,
            anonymous_first: false,
        }
    }
    pub(crate) fn get(path: &str) -> Req {
        Req::new(reqwest::Method::GET, path, None)
    }
    pub(crate) fn post(path: &str, body: Option<Value>) -> Req {
        Req::new(reqwest::Method::POST, path, body)
    }
    pub(crate) fn delete(path: &str) -> Req {
        Req::new(reqwest::Method::DELETE, path, None)
    }
    /// The server applies it at most once: safe to retry on the next endpoint.
    pub(crate) fn idempotent_write(mut self) -> Req {
        self.idempotency_key = Some(uuid::Uuid::new_v4().to_string());
        self.retry_on_timeout = true;
        self
    }
    /// Try without credentials first (for `cluster init` on a new node).
    pub(crate) fn anonymous_first(mut self) -> Req {
        self.anonymous_first = true;
        self
    }
}

/// A 2xx answer.
#[derive(Debug)]
pub(crate) struct Answer {
    endpoint: String,
    /// The body as received (empty for 204).
    raw: String,
    /// The body parsed, if there is one.
    body: Option<Value>,
}

/// A JSON answer: parsed for tables, as received for `-o json`.
#[derive(Debug)]
pub(crate) struct Doc {
    pub(crate) value: Value,
    pub(crate) raw: String,
}

impl Answer {
    pub(crate) fn into_json(self) -> anyhow::Result<Doc> {
        match self.body {
            Some(value) => Ok(Doc {
                value,
                raw: self.raw,
            }),
            None => Err(anyhow!("{} answered with an empty body", self.endpoint)),
        }
    }
}

/// The HTTP API of a cluster, through a list of endpoints.
pub(crate) struct Api {
    endpoints: Vec<String>,
    http: reqwest::Client,
    credentials: Credentials,
    /// The token of a password login, once obtained.
    login_token: tokio::sync::Mutex<Option<String>>,
}

/// An error answer, kept apart so a caller can react to its status.
struct ErrorAnswer {
    status: u16,
    text: String,
}

impl Api {
    /// A client of the nodes in `endpoint_list`, trusting the CA in the PEM file `ca` for
    /// `https://` endpoints.
    pub(crate) fn with_ca(endpoint_list: &str, ca: Option<&Path>) -> anyhow::Result<Api> {
        let endpoints = parse_endpoints(endpoint_list)?;
        let http = client_builder(ca)?
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Api {
            endpoints,
            http,
            credentials: Credentials::None,
            login_token: tokio::sync::Mutex::new(None),
        })
    }

    pub(crate) fn with_credentials(mut self, credentials: Credentials) -> Api {
        self.credentials = credentials;
        self
    }

    /// The token to send: the given one, or the one a password login returns (logging in
    /// on first use).
    pub(crate) async fn token(&self) -> anyhow::Result<Option<String>> {
        match &self.credentials {
            Credentials::None => Ok(None),
            Credentials::Token(t) => Ok(Some(t.clone())),
            Credentials::Password {
                user,
                password,
                project,
            } => {
                let mut cached = self.login_token.lock().await;
                if let Some(t) = cached.as_ref() {
                    return Ok(Some(t.clone()));
                }
                let (token, _) = self.login(user, password, project.as_deref()).await?;
                *cached = Some(token.clone());
                Ok(Some(token))
            }
        }
    }

    /// `POST /v3/auth/tokens` with the password method on the first endpoint that can be
    /// reached: the token and the answer's body.
    pub(crate) async fn login(
        &self,
        user: &str,
        password: &str,
        project: Option<&str>,
    ) -> anyhow::Result<(String, Value)> {
        let mut auth = serde_json::json!({
            "identity": {
                "methods": ["password"],
                "password": {"user": {"name": user, "domain": {"id": "default"}, "password": password}}
            }
        });
        if let Some(p) = project {
            // A 32-hex project is an id; anything else a name.
            let scope = if p.len() == 32 && p.bytes().all(|b| b.is_ascii_hexdigit()) {
                serde_json::json!({"project": {"id": p}})
            } else {
                serde_json::json!({"project": {"name": p, "domain": {"id": "default"}}})
            };
            auth["scope"] = scope;
        }
        let body = serde_json::json!({ "auth": auth });
        let mut failures = Vec::new();
        for endpoint in &self.endpoints {
            let url = format!("{endpoint}/v3/auth/tokens?nocatalog");
            let resp = match self.http.post(&url).json(&body).send().await {
                Ok(r) => r,
                Err(e) if e.is_connect() || e.is_timeout() => {
                    failures.push(format!("{endpoint}: {}", describe_transport_error(&e)));
                    continue;
                }
                Err(e) => bail!(
                    "login at {endpoint} failed: {}",
                    describe_transport_error(&e)
                ),
            };
            let status = resp.status();
            let token = resp
                .headers()
                .get("x-subject-token")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let text = resp.text().await.unwrap_or_default();
            let parsed: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            if status.is_success() {
                let token = token.ok_or_else(|| {
                    anyhow!("{endpoint} answered the login without an X-Subject-Token header")
                })?;
                return Ok((token, parsed));
            }
            let message = parsed
                .pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or(text.trim());
            let mut why = format!(
                "login as '{user}' failed: {message} [HTTP {}]",
                status.as_u16()
            );
            if status.as_u16() == 429 {
                let _ = write!(
                    why,
                    "\nretry in {} s",
                    retry_after.as_deref().unwrap_or("a few")
                );
            } else if status.as_u16() == 401 {
                why.push_str("\nfix: check --user and --password (DRPLANE_USER, DRPLANE_PASSWORD) and --login-project");
            }
            bail!(why);
        }
        Err(anyhow!(
            "cannot reach the cluster to log in: {}\nfix: check that a drplane server runs there, \
             or give other members with --endpoint URL[,URL…] (or DRPLANE_ENDPOINT)",
            failures.join("; ")
        ))
    }

    /// Sends `req` to the first endpoint that can be reached, with the credentials. A 2xx
    /// answer is returned; an error answer becomes an `Err` whose text is `<message>` then
    /// `fix: <fix>`.
    pub(crate) async fn send(&self, req: Req) -> anyhow::Result<Answer> {
        if req.anonymous_first {
            match self.send_with(&req, None).await? {
                Ok(answer) => return Ok(answer),
                Err(e) if e.status == 401 && !matches!(self.credentials, Credentials::None) => {}
                Err(e) => bail!(e.text),
            }
        }
        let token = self.token().await?;
        match self.send_with(&req, token.as_deref()).await? {
            Ok(answer) => Ok(answer),
            Err(e) => {
                let mut text = e.text;
                if e.status == 401 && matches!(self.credentials, Credentials::None) {
                    text.push_str(
                        "\nno credentials were given: pass --token (DRPLANE_TOKEN) or --user and \
                         --password (DRPLANE_USER, DRPLANE_PASSWORD)",
                    );
                }
                bail!(text)
            }
        }
    }

    async fn send_with(
        &self,
        req: &Req,
        token: Option<&str>,
    ) -> anyhow::Result<Result<Answer, ErrorAnswer>> {
        let mut failures: Vec<String> = Vec::new();
        for endpoint in &self.endpoints {
            let url = format!("{endpoint}{}", req.path);
            let mut rb = self.http.request(req.method.clone(), &url);
            if let Some(t) = token {
                rb = rb.header("X-Auth-Token", t);
            }
            if let Some(body) = &req.body {
                rb = rb.json(body);
            }
            if let Some(key) = &req.idempotency_key {
                rb = rb.header("Idempotency-Key", key);
            }
            let resp = match rb.send().await {
                Ok(r) => r,
                Err(e) => {
                    let why = describe_transport_error(&e);
                    if e.is_connect() || (e.is_timeout() && req.retry_on_timeout) {
                        failures.push(format!("{endpoint}: {why}"));
                        continue;
                    }
                    if e.is_timeout() {
                        bail!(
                            "{endpoint} did not answer {} {} within {} s; the change may or may \
                             not have been applied\nfix: check with `drplane cluster status` \
                             before trying again",
                            req.method,
                            req.path,
                            REQUEST_TIMEOUT.as_secs()
                        );
                    }
                    bail!("request to {endpoint} failed: {why}");
                }
            };
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let bytes = match resp.bytes().await {
                Ok(b) => b,
                Err(e) => bail!(
                    "reading the answer of {endpoint} failed: {}",
                    describe_transport_error(&e)
                ),
            };
            if status.is_success() {
                let body = if bytes.is_empty() {
                    None
                } else {
                    Some(serde_json::from_slice(&bytes).with_context(|| {
                        format!("{endpoint} answered {status} with a body that is not JSON")
                    })?)
                };
                return Ok(Ok(Answer {
                    endpoint: endpoint.clone(),
                    raw: String::from_utf8_lossy(&bytes).into_owned(),
                    body,
                }));
            }
            return Ok(Err(ErrorAnswer {
                status: status.as_u16(),
                text: describe_error_answer(
                    endpoint,
                    status.as_u16(),
                    retry_after.as_deref(),
                    &bytes,
                ),
            }));
        }
        Err(anyhow!(
            "cannot reach the cluster: {}\nfix: check that a drplane server runs there, or \
             give other members with --endpoint URL[,URL…] (or DRPLANE_ENDPOINT)",
            failures.join("; ")
        ))
    }
}

/// The innermost cause of a transport error, e.g. "Connection refused (os error 111)".
pub(crate) fn describe_transport_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".to_string();
    }
    let mut src: &dyn std::error::Error = e;
    while let Some(next) = src.source() {
        src = next;
    }
    let inner = src.to_string();
    if let Some(why) = tls_failure_hint(&inner) {
        return why;
    }
    if e.is_connect() {
        format!("cannot connect ({inner})")
    } else {
        inner
    }
}

/// What to say when the innermost cause of a transport error is a TLS failure: a
/// certificate that did not verify, or TLS spoken to a plain-HTTP port.
fn tls_failure_hint(inner: &str) -> Option<String> {
    if inner.contains("invalid peer certificate") || inner.contains("certificate verif") {
        Some(format!(
            "TLS certificate verification failed ({inner}); trust the cluster CA with --ca FILE \
             (or DRPLANE_CA), e.g. <dir>/tls/ca.pem of `drplane dev --tls`, and use a host name \
             or address the node's certificate is valid for"
        ))
    } else if inner.contains("invalid HTTP version parsed") {
        Some(format!(
            "the answer is not plain HTTP ({inner}); is the node serving HTTPS? use https:// \
             and --ca FILE"
        ))
    } else if inner.contains("InvalidContentType") || inner.contains("corrupt message") {
        Some(format!(
            "TLS handshake failed ({inner}); is the node serving plain HTTP? use http://"
        ))
    } else {
        None
    }
}

/// Text of an error answer: `<message> [code, HTTP status]`, then `fix: <fix>`; a 503
/// also says the cluster is unavailable and when to retry.
fn describe_error_answer(
    endpoint: &str,
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
) -> String {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let err = parsed.as_ref().and_then(|v| v.get("error"));
    let mut text = match err {
        Some(err) => {
            let message = err
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("(no message)");
            let code = err.get("code").and_then(Value::as_str).unwrap_or("?");
            let mut t = format!("{message} [{code}, HTTP {status}]");
            if let Some(fix) = err.get("fix").and_then(Value::as_str) {
                let _ = write!(t, "\nfix: {fix}");
            }
            t
        }
        None => {
            let raw = String::from_utf8_lossy(body);
            let raw = raw.trim();
            let shown: String = raw.chars().take(300).collect();
            format!("{endpoint} answered HTTP {status}: {shown}")
        }
    };
    if status == 503 {
        let after = retry_after.unwrap_or("a few");
        let _ = write!(
            text,
            "\nthe cluster is unavailable right now (no leader or no quorum); retry in {after} s"
        );
    }
    text
}

// ---- tables ----

/// Left-aligned columns separated by two spaces, no trailing spaces, one line per row.
pub(crate) fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            let w = cell.chars().count();
            if i < widths.len() {
                widths[i] = widths[i].max(w);
            } else {
                widths.push(w);
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(cell);
            let pad = widths[i].saturating_sub(cell.chars().count());
            l.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// A JSON scalar as a table cell: null -> `-`.
pub(crate) fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".to_string(),
        Some(Value::String(s)) if s.is_empty() => "-".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => if *b { "yes" } else { "no" }.to_string(),
        Some(other) => other.to_string(),
    }
}

/// The members table: ID SITE ROLE LEADER HTTP RAFT MATCHED LAG.
pub(crate) fn render_members(members: &Value) -> anyhow::Result<String> {
    let list = members
        .as_array()
        .ok_or_else(|| anyhow!("unexpected answer: members is not an array"))?;
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|m| {
            vec![
                cell(m.get("id")),
                cell(m.get("site")),
                cell(m.get("role")),
                cell(m.get("leader")),
                cell(m.get("http")),
                cell(m.get("raft")),
                cell(m.get("matched_index")),
                cell(m.get("lag")),
            ]
        })
        .collect();
    Ok(render_table(
        &[
            "ID", "SITE", "ROLE", "LEADER", "HTTP", "RAFT", "MATCHED", "LAG",
        ],
        &rows,
    ))
}

/// The whole-cluster view: a summary block, then the members table.
pub(crate) fn render_status(status: &Value) -> anyhow::Result<String> {
    let members = status
        .get("members")
        .ok_or_else(|| anyhow!("unexpected answer: no \"members\""))?;
    let list = members.as_array().map(Vec::as_slice).unwrap_or(&[]);
    let leader_id = status.get("leader_id").and_then(Value::as_u64);
    let leader = match leader_id {
        Some(id) => {
            let site = list
                .iter()
                .find(|m| m.get("id").and_then(Value::as_u64) == Some(id))
                .map(|m| format!(" ({}, {})", cell(m.get("site")), cell(m.get("http"))))
                .unwrap_or_default();
            format!("{id}{site}")
        }
        None => "none (no leader known: the cluster cannot take writes)".to_string(),
    };
    let count = |role: &str| {
        list.iter()
            .filter(|m| m.get("role").and_then(Value::as_str) == Some(role))
            .count()
    };
    let mut voter_sites: Vec<String> = list
        .iter()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("voter"))
        .map(|m| cell(m.get("site")))
        .collect();
    voter_sites.sort();
    voter_sites.dedup();

    let mut out = String::new();
    let kv = [
        ("leader", leader),
        ("term", cell(status.get("term"))),
        (
            "answered by",
            format!(
                "node {} ({})",
                cell(status.get("node_id")),
                cell(status.get("state"))
            ),
        ),
        ("last log index", cell(status.get("last_log_index"))),
        ("commit index", cell(status.get("commit_index"))),
        ("applied index", cell(status.get("applied_index"))),
        (
            "voters",
            format!("{} in sites: {}", count("voter"), voter_sites.join(", ")),
        ),
        ("learners", count("learner").to_string()),
    ];
    for (k, v) in kv {
        let _ = writeln!(out, "{:<16}{v}", format!("{k}:"));
    }
    out.push('\n');
    out.push_str(&render_members(members)?);
    Ok(out)
}

/// The sites table: NAME CREATED_AT DESCRIPTION (descriptions cut at 60 characters).
pub(crate) fn render_sites(sites: &[Value]) -> String {
    let rows: Vec<Vec<String>> = sites
        .iter()
        .map(|s| {
            let desc = cell(s.get("description"));
            let desc = if desc.chars().count() > 60 {
                let cut: String = desc.chars().take(57).collect();
                format!("{cut}...")
            } else {
                desc
            };
            // One line per row, whatever the description holds.
            let desc = desc.replace(['\n', '\r', '\t'], " ");
            vec![cell(s.get("name")), cell(s.get("created_at")), desc]
        })
        .collect();
    render_table(&["NAME", "CREATED_AT", "DESCRIPTION"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn endpoint_normalization() {
        assert_eq!(
            normalize_endpoint("127.0.0.1:7001").unwrap(),
            "http://127.0.0.1:7001"
        );
        assert_eq!(
            normalize_endpoint("http://127.0.0.1:7001/").unwrap(),
            "http://127.0.0.1:7001"
        );
        assert_eq!(
            normalize_endpoint("HTTP://node-a:7001").unwrap(),
            "http://node-a:7001"
        );
        assert_eq!(
            normalize_endpoint(" localhost ").unwrap(),
            "http://localhost"
        );
        assert_eq!(
            normalize_endpoint("http://proxy/drplane-a/").unwrap(),
            "http://proxy/drplane-a"
        );
        assert_eq!(
            normalize_endpoint("HTTPS://127.0.0.1:7001/").unwrap(),
            "https://127.0.0.1:7001"
        );
        assert!(normalize_endpoint("ftp://x:1").is_err());
        assert!(normalize_endpoint("https://").is_err());
        assert!(normalize_endpoint("http://").is_err());
        assert!(normalize_endpoint("http://x?y=1").is_err());
        assert!(normalize_endpoint("http://a b").is_err());
    }

    #[test]
    fn endpoint_lists() {
        assert_eq!(
            parse_endpoints("127.0.0.1:7001, http://127.0.0.1:7002,,").unwrap(),
            vec!["http://127.0.0.1:7001", "http://127.0.0.1:7002"]
        );
        assert!(parse_endpoints(" , ").is_err());
        assert_eq!(
            parse_endpoints("https://a:1,b:2").unwrap(),
            vec!["https://a:1", "http://b:2"]
        );
    }

    #[test]
    fn tls_failures_are_explained() {
        let why = tls_failure_hint("invalid peer certificate: UnknownIssuer").expect("hint");
        assert!(why.contains("--ca FILE"), "{why}");
        assert!(why.contains("UnknownIssuer"), "{why}");
        let why =
            tls_failure_hint("received corrupt message of type InvalidContentType").expect("hint");
        assert!(why.contains("http://"), "{why}");
        let why = tls_failure_hint("invalid HTTP version parsed").expect("hint");
        assert!(why.contains("https://"), "{why}");
        assert!(tls_failure_hint("Connection refused (os error 111)").is_none());
    }

    #[test]
    fn ca_file_is_read_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = crate::tls::generate_dev_pki(dir.path(), &["n1"], &[]).expect("pki");
        client_builder(Some(&pki.ca_cert))
            .expect("builder")
            .build()
            .expect("client");
        let missing = dir.path().join("nope.pem");
        let err = format!("{:#}", client_builder(Some(&missing)).expect_err("error"));
        assert!(err.contains("nope.pem"), "{err}");
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "not a certificate").expect("write");
        assert!(client_builder(Some(&bad)).is_err());
        assert!(client_builder(None).is_ok());
    }

    #[test]
    fn pretty_json_keeps_order_and_matches_serde_layout() {
        let raw = r#"{"z":1,"a":{"s":"x,{}:\"[","e":[],"o":{}},"l":[1, 2.50,null,true] }"#;
        let pretty = pretty_json(raw);
        assert!(pretty.starts_with("{\n  \"z\": 1,\n  \"a\": {"), "{pretty}");
        assert!(pretty.contains("2.50"));
        // Same value, and the same layout serde_json gives when the order is already sorted.
        let v: Value = serde_json::from_str(raw).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&pretty).unwrap(), v);
        let sorted = serde_json::to_string(&v).unwrap();
        assert_eq!(
            pretty_json(&sorted),
            serde_json::to_string_pretty(&v).unwrap()
        );
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode_path_segment("site-1.a_b~"), "site-1.a_b~");
        assert_eq!(encode_path_segment("a b/c?"), "a%20b%2Fc%3F");
        assert_eq!(encode_path_segment("é"), "%C3%A9");
    }

    #[test]
    fn table_is_aligned_without_trailing_spaces() {
        let t = render_table(
            &["ID", "NAME", "X"],
            &[
                vec!["1".into(), "alpha".into(), "".into()],
                vec!["10".into(), "b".into(), "z".into()],
            ],
        );
        assert_eq!(t, "ID  NAME   X\n1   alpha\n10  b      z\n");
    }

    #[test]
    fn members_table() {
        let members = serde_json::json!([
            {"id":1,"site":"site-1","http":"127.0.0.1:7001","raft":"127.0.0.1:7101",
             "role":"voter","leader":true,"matched_index":12,"lag":0},
            {"id":2,"site":"site-2","http":"127.0.0.1:7002","raft":"127.0.0.1:7102",
             "role":"learner","leader":false,"matched_index":null,"lag":null}
        ]);
        let t = render_members(&members).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "ID  SITE    ROLE     LEADER  HTTP            RAFT            MATCHED  LAG"
        );
        assert_eq!(
            lines[1],
            "1   site-1  voter    yes     127.0.0.1:7001  127.0.0.1:7101  12       0"
        );
        assert_eq!(
            lines[2],
            "2   site-2  learner  no      127.0.0.1:7002  127.0.0.1:7102  -        -"
        );
        assert!(render_members(&serde_json::json!({})).is_err());
    }

    #[test]
    fn status_view() {
        let status = serde_json::json!({
            "node_id": 2, "leader_id": 1, "term": 3, "state": "Follower",
            "last_log_index": 12, "commit_index": 12, "applied_index": 11,
            "members": [
                {"id":1,"site":"site-1","http":"127.0.0.1:7001","raft":"127.0.0.1:7101",
                 "role":"voter","leader":true,"matched_index":null,"lag":null}
            ]
        });
        let t = render_status(&status).unwrap();
        assert!(t.starts_with("leader:         1 (site-1, 127.0.0.1:7001)\n"));
        assert!(t.contains("answered by:    node 2 (Follower)\n"));
        assert!(t.contains("applied index:  11\n"));
        assert!(t.contains("voters:         1 in sites: site-1\n"));
        let no_leader = serde_json::json!({"leader_id": null, "term": 0, "members": []});
        assert!(render_status(&no_leader)
            .unwrap()
            .contains("leader:         none"));
    }

    #[test]
    fn sites_table() {
        let sites = vec![serde_json::json!({
            "name": "eu-1", "description": "x".repeat(100), "created_at": "2026-01-01T00:00:00.000Z"
        })];
        let t = render_sites(&sites);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "NAME  CREATED_AT                DESCRIPTION");
        assert!(lines[1].starts_with("eu-1  2026-01-01T00:00:00.000Z  xxx"));
        assert!(lines[1].ends_with("..."));
    }

    #[test]
    fn error_answers() {
        let body = br#"{"error":{"code":"DRP-3001","status":404,"message":"site 'x' not found","fix":"List sites."}}"#;
        assert_eq!(
            describe_error_answer("http://a", 404, None, body),
            "site 'x' not found [DRP-3001, HTTP 404]\nfix: List sites."
        );
        let t = describe_error_answer(
            "http://a",
            503,
            Some("2"),
            b"{\"error\":{\"message\":\"no leader\",\"code\":\"DRP-4001\",\"fix\":\"Retry.\"}}",
        );
        assert!(t.contains("cluster is unavailable"));
        assert!(t.contains("retry in 2 s"));
        assert_eq!(
            describe_error_answer("http://a", 502, None, b"bad gateway"),
            "http://a answered HTTP 502: bad gateway"
        );
    }

    #[derive(clap::Parser, Debug)]
    struct TestCli {
        #[command(subcommand)]
        cmd: TestCmd,
    }
    #[derive(clap::Subcommand, Debug)]
    enum TestCmd {
        Cluster(ClusterArgs),
        Sites(SitesArgs),
    }

    #[test]
    fn flags_parse_after_the_subcommand() {
        let cli = TestCli::try_parse_from([
            "drplane",
            "cluster",
            "promote",
            "--endpoint",
            "a:1,b:2",
            "--id",
            "3",
            "--force",
            "-o",
            "json",
        ])
        .unwrap();
        let TestCmd::Cluster(c) = cli.cmd else {
            panic!("not cluster")
        };
        assert_eq!(c.conn.endpoint, "a:1,b:2");
        assert_eq!(c.conn.output, Output::Json);
        match c.command {
            ClusterCommand::Promote(t) => {
                assert_eq!(t.id, 3);
                assert!(t.force);
            }
            other => panic!("{other:?}"),
        }
        let cli = TestCli::try_parse_from(["drplane", "sites", "show", "eu-1"]).unwrap();
        let TestCmd::Sites(s) = cli.cmd else {
            panic!("not sites")
        };
        assert_eq!(s.conn.output, Output::Table);
        assert!(matches!(s.command, SitesCommand::Show { name } if name == "eu-1"));
    }
}
