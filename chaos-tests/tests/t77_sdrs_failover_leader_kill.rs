//! Huawei SDRS (issue 5): the leader is killed in the middle of a group failover, and the
//! job still ends with each protected instance exactly once on the right side.
//!
//! Real processes only: three nodes, two `fs` agents (`h1` in site-a holds six stopped
//! production servers, `h2` in site-b receives their DR copies). Everything a Huawei
//! client does goes through the SDRS API with AK/SK signatures (`SDK-HMAC-SHA256`, signed
//! here: this crate links no drplane code), with an access key made through the native
//! identity API: active domains, the protection group, six protected instances, enable
//! protection, every pair synced.
//!
//! 1. Planned failover (`reverse-server-group` to `target`), made to last a few seconds,
//!    unevenly: each production disk gets a different number of new 1 MiB blocks and
//!    every pair a 1 MiB/s bandwidth limit (native pairs API), so the final syncs end one
//!    instance after another. As soon as the job is RUNNING with some sub-jobs SUCCESS and
//!    others not ended, the leader is killed (kill -9), a new leader is awaited and the
//!    old one restarted.
//! 2. Unplanned failover (`failover-server-group`) back to the source, the leader killed
//!    as soon as the call is answered.
//!
//! What a user checks after each: the job (`GET /v1/{p}/jobs/{id}`) ended SUCCESS with
//! every sub-job SUCCESS; the group and every instance show the expected status with
//! production on the expected side; each instance is listed once; each pair
//! (`GET /drplane/v1/pairs`) swapped exactly once (its writable copy on the new
//! production host, the other copy on the old one) and the writable copy holds exactly the
//! data written before the failovers; every task of the operation ran to success exactly
//! once on the agent it was assigned to, one promote per pair (the agents'
//! `completions.jsonl`), and in phase 1 the new leader assigned some of them. At the end:
//! each pair was promoted exactly twice in all, and each operation is a single job.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use chaos_tests::{Cluster, Reply};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];
const MIB: usize = 1 << 20;
/// Protected instances, one disk each.
const INSTANCES: usize = 6;
/// Each disk: room for the largest change (INSTANCES blocks of 1 MiB) plus one.
const DISK: usize = (INSTANCES + 1) * MIB;
/// The pairs' bandwidth limit during the failover: instance k's final sync moves k+1
/// blocks, so it lasts about k+1 seconds.
const BWLIMIT: u64 = MIB as u64;

// ---- SDK-HMAC-SHA256, as the Huawei SDK signs ----

/// `quote(s, safe='~')`: only `A-Z a-z 0-9 - _ . ~` unescaped, upper-case hex.
fn enc(s: &str) -> String {
    let mut out = String::new();
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `%Y%m%dT%H%M%SZ` of a Unix time (UTC).
fn sdk_date(unix: u64) -> String {
    let (days, secs) = ((unix / 86_400) as i64, unix % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// The headers of a signed request (`Authorization` included).
#[allow(clippy::too_many_arguments)]
fn sign(
    ak: &str,
    sk: &str,
    method: &str,
    host: &str,
    path: &str,
    query: &[(String, String)],
    project: &str,
    body: &[u8],
    unix: u64,
) -> Vec<(String, String)> {
    let date = sdk_date(unix);
    // Sorted by name: they are also the signed headers, in this order.
    let headers = [
        ("content-type", "application/json;charset=UTF-8".to_string()),
        ("host", host.to_string()),
        ("x-project-id", project.to_string()),
        ("x-sdk-date", date.clone()),
    ];
    let signed = headers
        .iter()
        .map(|(k, _)| *k)
        .collect::<Vec<_>>()
        .join(";");
    let mut uri = path.split('/').map(enc).collect::<Vec<_>>().join("/");
    if !uri.ends_with('/') {
        uri.push('/');
    }
    let mut q = query.to_vec();
    q.sort();
    let canonical_query = q
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&");
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let canonical = format!(
        "{method}\n{uri}\n{canonical_query}\n{canonical_headers}\n{signed}\n{}",
        hex::encode(Sha256::digest(body))
    );
    let to_sign = format!(
        "SDK-HMAC-SHA256\n{date}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(sk.as_bytes()).expect("HMAC takes any key");
    mac.update(to_sign.as_bytes());
    let signature = hex::encode(mac.finalize().into_bytes());
    let mut out: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    out.push((
        "authorization".into(),
        format!("SDK-HMAC-SHA256 Access={ak}, SignedHeaders={signed}, Signature={signature}"),
    ));
    out
}

/// A Huawei client: the project and AK/SK of a `member` user.
struct Hw {
    project: String,
    ak: String,
    sk: String,
    http: reqwest::Client,
}

impl Hw {
    /// A signed SDRS call to node `id`; `path` is relative to `/v1/{project_id}`.
    async fn call(
        &self,
        c: &Cluster,
        id: u64,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> anyhow::Result<Reply> {
        let host = c.spec(id)?.http.clone();
        let path = format!("/v1/{}{path}", self.project);
        let query: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let unix = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let headers = sign(
            &self.ak,
            &self.sk,
            method.as_str(),
            &host,
            &path,
            &query,
            &self.project,
            &bytes,
            unix,
        );
        let mut url = format!("http://{host}{path}");
        if !query.is_empty() {
            let q: Vec<String> = query
                .iter()
                .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
                .collect();
            url = format!("{url}?{}", q.join("&"));
        }
        let mut req = self.http.request(method, url).body(bytes);
        for (k, v) in &headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        Ok(Reply {
            status,
            retry_after: None,
            content_type: None,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
            text,
        })
    }

    /// A call that must answer 200, through the current leader.
    async fn ok(
        &self,
        c: &mut Cluster,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let leader = c.wait_leader(Duration::from_secs(20)).await?;
        let r = self
            .call(c, leader, method.clone(), path, query, body)
            .await?;
        if r.status != 200 {
            bail!("{method} {path}: {} {}", r.status, r.text);
        }
        Ok(r.body)
    }

    /// An asynchronous call: its job id.
    async fn job_call(&self, c: &mut Cluster, path: &str, body: &Value) -> anyhow::Result<String> {
        let b = self
            .ok(c, reqwest::Method::POST, path, &[], Some(body))
            .await?;
        b["job_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("POST {path}: no job_id in {b}"))
    }

    /// `GET /v1/{p}/jobs/{id}` through any running node.
    async fn job(&self, c: &mut Cluster, id: &str) -> anyhow::Result<Value> {
        let mut last = String::from("no node running");
        for n in c.ids() {
            if !c.is_running(n) {
                continue;
            }
            match self
                .call(
                    c,
                    n,
                    reqwest::Method::GET,
                    &format!("/jobs/{id}"),
                    &[],
                    None,
                )
                .await
            {
                Ok(r) if r.status == 200 => return Ok(r.body),
                Ok(r) => last = format!("node {n}: {} {}", r.status, r.text),
                Err(e) => last = format!("node {n}: {e}"),
            }
        }
        bail!("cannot read job {id}: {last}")
    }

    /// Polls the job until it ends.
    async fn wait_job(
        &self,
        c: &mut Cluster,
        id: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let j = self.job(c, id).await;
            if let Ok(j) = &j {
                if j["status"] == "SUCCESS" || j["status"] == "FAIL" {
                    return Ok(j.clone());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "job {id} did not end within {timeout:?}: {j:?}\n{}",
                    agent_logs(c)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn wait_success(
        &self,
        c: &mut Cluster,
        id: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let j = self.wait_job(c, id, timeout).await?;
        if j["status"] != "SUCCESS" {
            bail!("job {id} failed: {j}");
        }
        Ok(j)
    }
}

fn agent_logs(c: &Cluster) -> String {
    c.agents
        .keys()
        .map(|h| {
            let text = c.agent_log(h);
            let lines: Vec<&str> = text.lines().collect();
            format!(
                "--- agent {h}:\n{}",
                lines[lines.len().saturating_sub(20)..].join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A native admin call that must answer `want`.
async fn native(
    c: &mut Cluster,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
    want: u16,
) -> anyhow::Result<Value> {
    let leader = c.wait_leader(Duration::from_secs(20)).await?;
    let r = c.request(leader, method.clone(), path, body, &[]).await?;
    if r.status != want {
        bail!("{method} {path}: {} {}", r.status, r.text);
    }
    Ok(r.body)
}

fn image(c: &Cluster, host: &str, volume: &str) -> PathBuf {
    c.dir
        .path()
        .join(format!("agent-{host}"))
        .join("volumes/pools/default")
        .join(volume)
        .join("data")
}

/// Deterministic bytes (xorshift).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sub_jobs(job: &Value) -> Vec<Value> {
    job["entities"]["sub_jobs"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn count_status(subs: &[Value], pred: impl Fn(&str) -> bool) -> usize {
    subs.iter()
        .filter(|s| s["status"].as_str().is_some_and(&pred))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_mid_group_failover_each_instance_fails_over_once() -> anyhow::Result<()> {
    let mut c = Cluster::start(&SITES, &[]).await?;

    // A project, a member user and its AK/SK (native identity API, as an admin).
    let p = native(
        &mut c,
        reqwest::Method::POST,
        "/drplane/v1/identity/projects",
        Some(&json!({"name": "hw"})),
        201,
    )
    .await?;
    let project = p["id"].as_str().context("project id")?.to_string();
    native(
        &mut c,
        reqwest::Method::POST,
        "/drplane/v1/identity/users",
        Some(
            &json!({"name": "hw-op", "password": "hw-op-password-1", "project": "hw",
                     "role": "member"}),
        ),
        201,
    )
    .await?;
    let k = native(
        &mut c,
        reqwest::Method::POST,
        "/drplane/v1/identity/access-keys",
        Some(&json!({"user": "hw-op"})),
        201,
    )
    .await?;
    let hw = Hw {
        project: project.clone(),
        ak: k["access_key"].as_str().context("ak")?.to_string(),
        sk: k["secret_key"].as_str().context("sk")?.to_string(),
        http: c.client_with_token(None)?,
    };

    // h1 (site-a) declares six stopped servers of one disk; h2 (site-b) is empty.
    let servers: Vec<String> = (0..INSTANCES).map(|i| format!("vm-{i}")).collect();
    let mut toml = String::from("vcpus = 16\nram_mb = 16384\n");
    for s in &servers {
        toml.push_str(&format!(
            "\n[[servers]]\nid = \"{s}\"\nproject = \"{project}\"\nname = \"{s}\"\n\
             status = \"SHUTOFF\"\nvcpus = 1\nram_mb = 256\n\
             disks = [{{ id = \"{s}-root\", size_bytes = {DISK} }}]\n"
        ));
    }
    let h1_config = c.dir.path().join("h1.toml");
    std::fs::write(&h1_config, toml)?;
    let h2_config = c.dir.path().join("h2.toml");
    std::fs::write(&h2_config, "vcpus = 16\nram_mb = 16384\n")?;
    let (h1_config, h2_config) = (
        h1_config.to_string_lossy().into_owned(),
        h2_config.to_string_lossy().into_owned(),
    );
    c.spawn_agent_with("h1", "site-a", "fs", &["--config", &h1_config])?;
    c.spawn_agent_with("h2", "site-b", "fs", &["--config", &h2_config])?;
    c.wait_hosts_state(&["h1", "h2"], "online", Duration::from_secs(30))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for s in &servers {
        loop {
            let leader = c.wait_leader(Duration::from_secs(20)).await?;
            let r = c.get(leader, &format!("/drplane/v1/servers/{s}")).await?;
            if r.status == 200 {
                break;
            }
            if Instant::now() > deadline {
                bail!("server {s} not registered: {} {}", r.status, r.text);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // The domain joining site-a and site-b, the group, six instances, protection on.
    let domains = hw
        .ok(&mut c, reqwest::Method::GET, "/active-domains", &[], None)
        .await?;
    let domain = domains["domains"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| {
            let zones: BTreeSet<&str> = [
                d["local_replication_cluster"]["availability_zone"].as_str(),
                d["remote_replication_cluster"]["availability_zone"].as_str(),
            ]
            .into_iter()
            .flatten()
            .collect();
            zones == BTreeSet::from(["site-a", "site-b"])
        })
        .and_then(|d| d["id"].as_str())
        .ok_or_else(|| anyhow!("no domain joins site-a and site-b: {domains}"))?
        .to_string();
    let job = hw
        .job_call(
            &mut c,
            "/server-groups",
            &json!({"server_group": {"name": "pg-1", "source_availability_zone": "site-a",
                    "target_availability_zone": "site-b", "domain_id": domain,
                    "source_vpc_id": "vpc-1", "dr_type": "migration"}}),
        )
        .await?;
    let j = hw
        .wait_success(&mut c, &job, Duration::from_secs(30))
        .await?;
    let group = j["entities"]["server_group_id"]
        .as_str()
        .context("group id")?
        .to_string();
    let mut create_jobs = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        create_jobs.push(
            hw.job_call(
                &mut c,
                "/protected-instances",
                &json!({"protected_instance": {"server_group_id": group, "server_id": s,
                        "name": format!("pi-{i}")}}),
            )
            .await?,
        );
    }
    let mut instances = Vec::new();
    for job in &create_jobs {
        let j = hw
            .wait_success(&mut c, job, Duration::from_secs(90))
            .await?;
        instances.push(
            j["entities"]["protected_instance_id"]
                .as_str()
                .context("instance id")?
                .to_string(),
        );
    }
    let job = hw
        .job_call(
            &mut c,
            &format!("/server-groups/{group}/action"),
            &json!({"start-server-group": {}}),
        )
        .await?;
    hw.wait_success(&mut c, &job, Duration::from_secs(60))
        .await?;

    // Every pair synced; each instance's pair and volumes.
    let reps = hw
        .ok(
            &mut c,
            reqwest::Method::GET,
            "/replications",
            &[("server_group_id", &group)],
            None,
        )
        .await?;
    let reps = reps["replications"].as_array().cloned().unwrap_or_default();
    assert_eq!(reps.len(), INSTANCES, "{reps:?}");
    for r in &reps {
        assert_eq!(r["status"], "protected", "{r}");
        assert_eq!(r["progress"], 100, "not synced: {r}");
    }
    // instance -> (pair, production volume, DR volume)
    let mut pair_of: BTreeMap<String, (String, String, String)> = BTreeMap::new();
    for r in &reps {
        let pi = r["attachment"][0]["protected_instance"]
            .as_str()
            .context("attachment")?;
        let (prod, dr) = r["volume_ids"]
            .as_str()
            .and_then(|v| v.split_once(','))
            .context("volume_ids")?;
        pair_of.insert(
            pi.to_string(),
            (
                r["id"].as_str().context("pair id")?.to_string(),
                prod.to_string(),
                dr.to_string(),
            ),
        );
    }
    assert_eq!(
        pair_of.keys().cloned().collect::<BTreeSet<_>>(),
        instances.iter().cloned().collect::<BTreeSet<_>>()
    );

    // Make the final syncs last 1..6 s: instance k gets k+1 new blocks, every pair 1 MiB/s.
    let mut written: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (k, pi) in instances.iter().enumerate() {
        let (pair, prod, _) = &pair_of[pi];
        native(
            &mut c,
            reqwest::Method::PATCH,
            &format!("/drplane/v1/pairs/{pair}"),
            Some(&json!({"bwlimit": BWLIMIT})),
            200,
        )
        .await?;
        let path = image(&c, "h1", prod);
        let mut data = std::fs::read(&path).with_context(|| format!("{}", path.display()))?;
        let fresh = pattern((k + 1) * MIB, 100 + k as u64);
        data[..fresh.len()].copy_from_slice(&fresh);
        std::fs::write(&path, &data)?;
        written.insert(pi.clone(), data);
    }

    // 1. The group failover (planned: reverse to the target), through the SDRS API; the
    // leader is killed while some instances are done and others are not.
    let world = World {
        group: group.clone(),
        project: project.clone(),
        instances: instances.clone(),
        pair_of: pair_of.clone(),
        written: written.clone(),
    };
    let job = hw
        .job_call(
            &mut c,
            &format!("/server-groups/{group}/action"),
            &json!({"reverse-server-group": {"priority_station": "target"}}),
        )
        .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (done_at_kill, open_at_kill) = loop {
        let j = hw.job(&mut c, &job).await?;
        let subs = sub_jobs(&j);
        let done = count_status(&subs, |s| s == "SUCCESS");
        let open = count_status(&subs, |s| s != "SUCCESS" && s != "FAIL");
        if j["status"] == "RUNNING" && done >= 1 && open >= 1 {
            break (done, open);
        }
        if j["status"] == "SUCCESS" || j["status"] == "FAIL" {
            bail!("the failover ended before the leader could be killed mid-way: {j}");
        }
        if Instant::now() > deadline {
            bail!("no sub-job ended within 60 s: {j}\n{}", agent_logs(&c));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let old_term = kill_leader(&mut c).await?;
    eprintln!("reverse: leader killed with {done_at_kill} instances failed over, {open_at_kill} under way");
    let new_term_tasks = check_group_operation(
        &mut c,
        &hw,
        &world,
        &job,
        old_term,
        &Expect {
            job_type: "reverseProtectionGroupNoCG",
            group_status: "protected",
            station: "target",
            writable: "h2",
            pair_state: "active",
            tasks: &["sync", "fence", "promote"],
        },
    )
    .await?;
    assert!(
        new_term_tasks > 0,
        "the new leader assigned none of the failover's tasks (old term {old_term})"
    );

    // 2. An unplanned failover back to the source (the DR copies on h1 promoted from
    // their last synced point), the leader killed as soon as the call is answered.
    let job = hw
        .job_call(
            &mut c,
            &format!("/server-groups/{group}/action"),
            &json!({"failover-server-group": {}}),
        )
        .await?;
    let j = hw.job(&mut c, &job).await?;
    let old_term = kill_leader(&mut c).await?;
    eprintln!(
        "failover: leader killed with the job {} ({} of {INSTANCES} instances done)",
        j["status"],
        count_status(&sub_jobs(&j), |s| s == "SUCCESS")
    );
    let new_term_tasks = check_group_operation(
        &mut c,
        &hw,
        &world,
        &job,
        old_term,
        &Expect {
            job_type: "failoverProtectionGroupNoCG",
            group_status: "failed-over",
            station: "source",
            writable: "h1",
            pair_state: "failed_over",
            tasks: &["promote"],
        },
    )
    .await?;
    eprintln!("failover: {new_term_tasks} tasks assigned by the new leader");

    // Each pair was promoted exactly twice in all (once per failover), and each group
    // operation is one job, not a retried second one.
    let mut promoted_ever: BTreeMap<String, usize> = BTreeMap::new();
    for r in completions(&c).values().flatten() {
        if r["kind"] == "promote" && r["outcome"] == "succeeded" {
            let pair = r["task_id"]
                .as_str()
                .and_then(|t| t.split(':').nth(1))
                .context("task id")?;
            *promoted_ever.entry(pair.to_string()).or_default() += 1;
        }
    }
    for pi in &instances {
        let pair = &pair_of[pi].0;
        assert_eq!(
            promoted_ever.get(pair),
            Some(&2),
            "pair {pair} promoted other than once per failover: {promoted_ever:?}"
        );
    }
    for t in ["reverseProtectionGroupNoCG", "failoverProtectionGroupNoCG"] {
        let jobs = native(
            &mut c,
            reqwest::Method::GET,
            &format!("/drplane/v1/jobs?type={t}"),
            None,
            200,
        )
        .await?;
        assert_eq!(jobs["jobs"].as_array().map(Vec::len), Some(1), "{jobs}");
    }
    Ok(())
}

/// What the test set up: the group, its instances and their pairs and data.
struct World {
    group: String,
    project: String,
    instances: Vec<String>,
    /// instance -> (pair, production volume on h1, DR volume on h2)
    pair_of: BTreeMap<String, (String, String, String)>,
    /// instance -> the bytes its disk held before the failovers
    written: BTreeMap<String, Vec<u8>>,
}

/// Where everything must be after a group operation.
struct Expect {
    job_type: &'static str,
    group_status: &'static str,
    station: &'static str,
    /// The host of every pair's writable copy.
    writable: &'static str,
    pair_state: &'static str,
    /// Each sub-job's task kinds.
    tasks: &'static [&'static str],
}

/// kill -9 of the leader; waits for another one and restarts the old one. The old
/// leader's term.
async fn kill_leader(c: &mut Cluster) -> anyhow::Result<u64> {
    let old_leader = c.wait_leader(Duration::from_secs(10)).await?;
    let old_term = c.status(old_leader).await?["term"]
        .as_u64()
        .context("term")?;
    c.kill(old_leader)?;
    let new_leader = c.wait_leader(Duration::from_secs(30)).await?;
    assert_ne!(new_leader, old_leader);
    c.restart(old_leader)?;
    Ok(old_term)
}

/// Every agent's completion records, by task id.
fn completions(c: &Cluster) -> BTreeMap<String, Vec<Value>> {
    let mut recs: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for h in ["h1", "h2"] {
        for r in c.agent_completions(h) {
            if let Some(id) = r["task_id"].as_str() {
                recs.entry(id.to_string()).or_default().push(r.clone());
            }
        }
    }
    recs
}

/// Waits for the group operation `job` to end and checks what a user would: see the
/// module documentation. Returns how many of its tasks carry a token of a term after
/// `old_term` (assigned by the new leader).
async fn check_group_operation(
    c: &mut Cluster,
    hw: &Hw,
    w: &World,
    job: &str,
    old_term: u64,
    e: &Expect,
) -> anyhow::Result<usize> {
    // The job ends SUCCESS, every instance's sub-job too.
    let j = hw.wait_job(c, job, Duration::from_secs(120)).await?;
    assert_eq!(j["status"], "SUCCESS", "{j}");
    assert_eq!(j["job_type"], e.job_type, "{j}");
    let subs = sub_jobs(&j);
    assert_eq!(subs.len(), INSTANCES, "{j}");
    assert_eq!(count_status(&subs, |s| s == "SUCCESS"), INSTANCES, "{j}");
    let sub_instances: BTreeSet<&str> = subs
        .iter()
        .filter_map(|s| s["entities"]["protected_instance_id"].as_str())
        .collect();
    assert_eq!(sub_instances.len(), INSTANCES, "{j}");

    // The group and every instance: production on the expected side, each listed once.
    let group = &w.group;
    let g = hw
        .ok(
            c,
            reqwest::Method::GET,
            &format!("/server-groups/{group}"),
            &[],
            None,
        )
        .await?;
    assert_eq!(g["server_group"]["status"], e.group_status, "{g}");
    assert_eq!(g["server_group"]["priority_station"], e.station, "{g}");
    assert_eq!(
        g["server_group"]["protected_instance_num"], INSTANCES,
        "{g}"
    );
    let list = hw
        .ok(
            c,
            reqwest::Method::GET,
            "/protected-instances",
            &[("server_group_id", group)],
            None,
        )
        .await?;
    let listed = list["protected_instances"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(list["count"], INSTANCES, "{list}");
    let ids: Vec<&str> = listed.iter().filter_map(|i| i["id"].as_str()).collect();
    assert_eq!(
        ids.iter().copied().collect::<BTreeSet<_>>(),
        w.instances
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        "{list}"
    );
    assert_eq!(ids.len(), INSTANCES, "an instance is listed twice: {list}");
    for i in &listed {
        assert_eq!(i["status"], e.group_status, "{i}");
        assert_eq!(i["priority_station"], e.station, "{i}");
    }

    // Each pair swapped exactly once: its writable copy on the expected host, the other
    // copy fenced on the other one, and the writable copy holds exactly the data written
    // before the failovers. After an unplanned failover each pair first fences its old
    // primary (a `fenceOldPrimary` job, run as soon as that agent answers): wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let pairs = loop {
        let doc = native(
            c,
            reqwest::Method::GET,
            &format!("/drplane/v1/pairs?project={}", w.project),
            None,
            200,
        )
        .await?;
        let pairs = doc["pairs"].as_array().cloned().unwrap_or_default();
        let fencing = pairs.iter().any(|p| p["operation"] == "fence_old_primary");
        if !fencing || Instant::now() > deadline {
            break pairs;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (replica, on_h1) = if e.writable == "h1" {
        ("h2", true)
    } else {
        ("h1", false)
    };
    for pi in &w.instances {
        let (pair, prod, dr) = &w.pair_of[pi];
        let (wvol, rvol) = if on_h1 { (prod, dr) } else { (dr, prod) };
        let found: Vec<&Value> = pairs.iter().filter(|p| p["id"] == pair.as_str()).collect();
        assert_eq!(found.len(), 1, "pair {pair}: {found:?}");
        let p = found[0];
        assert_eq!(
            p["source"]["host"], e.writable,
            "pair {pair} on the wrong side: {p}"
        );
        assert_eq!(p["source"]["volume_id"], wvol.as_str(), "{p}");
        assert_eq!(p["target"]["host"], replica, "{p}");
        assert_eq!(p["target"]["volume_id"], rvol.as_str(), "{p}");
        assert_eq!(p["state"], e.pair_state, "{p}");
        assert!(p["busy_job"].is_null(), "{p}");
        let copy = std::fs::read(image(c, e.writable, wvol))?;
        assert!(
            copy == w.written[pi],
            "the writable copy of {pi} on {} differs from the data written before the failovers",
            e.writable
        );
    }

    // Every task ran to success exactly once, on its assigned agent, under its final
    // attempt; each sub-job promoted its instance's copy once, on the writable side.
    let recs = completions(c);
    let ok = |id: &str| -> Vec<Value> {
        recs.get(id)
            .map(|v| {
                v.iter()
                    .filter(|r| r["outcome"] == "succeeded")
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut promotes: BTreeMap<String, usize> = BTreeMap::new();
    let mut new_term_tasks = 0;
    for s in &subs {
        let sid = s["job_id"].as_str().context("sub-job id")?;
        let sj = native(
            c,
            reqwest::Method::GET,
            &format!("/drplane/v1/jobs/{sid}"),
            None,
            200,
        )
        .await?;
        let tasks = sj["tasks"].as_array().cloned().unwrap_or_default();
        let kinds: Vec<&str> = tasks
            .iter()
            .filter_map(|t| t["kind"]["type"].as_str())
            .collect();
        assert_eq!(kinds, e.tasks, "{sj}");
        for t in &tasks {
            let id = t["id"].as_str().context("task id")?;
            assert_eq!(t["status"], "succeeded", "{t}");
            let done = ok(id);
            assert_eq!(
                done.len(),
                1,
                "task {id} completed {} times: {done:?}",
                done.len()
            );
            assert_eq!(done[0]["attempt"], t["attempt"], "{t} / {}", done[0]);
            assert_eq!(done[0]["host"], t["assigned_agent"], "{t} / {}", done[0]);
            if t["fencing_token"]["term"].as_u64().context("term")? > old_term {
                new_term_tasks += 1;
            }
            if t["kind"]["type"] == "promote" {
                let pair = t["kind"]["pair_id"].as_str().context("pair_id")?;
                *promotes.entry(pair.to_string()).or_default() += 1;
                assert_eq!(
                    done[0]["host"], e.writable,
                    "promoted on the wrong side: {t}"
                );
            }
        }
    }
    for pi in &w.instances {
        let pair = &w.pair_of[pi].0;
        assert_eq!(promotes.get(pair), Some(&1), "pair {pair}: {promotes:?}");
    }
    Ok(new_term_tasks)
}
