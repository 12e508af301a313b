//! `drplane bench scale`: the leader's scheduler under many agents and pairs.
//!
//! Starts its own three-node cluster (the `drplane dev` layout from `--base-port`), then
//! runs `--agents` agents with the `sim` driver inside this process (each with its own
//! control session to the leader, heartbeats and task stream, exactly as a real agent),
//! half of them in site `scale-a` holding the source volumes and half in `scale-b`.
//! It creates `--pairs` replication pairs (one source volume each) through the HTTP API,
//! waits until every pair finished its creation job, then measures a steady window of
//! `--duration` seconds in which every pair syncs every `--sleep-time` seconds:
//!
//! - tasks dispatched per second (the leader's `drplane_scheduler_tasks_dispatched_total`);
//! - dispatch latency p50/p99, from ready to the assignment committed (the leader's
//!   `drplane_scheduler_dispatch_latency_seconds` histogram over the window, linearly
//!   interpolated inside a bucket as Prometheus' `histogram_quantile` does);
//! - periodic syncs started per second, and the leader process's CPU (cores busy) and
//!   resident memory at the end.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use drplane_agent::runtime::{Agent, RuntimeConfig, StaticDiscovery};
use drplane_agent::{
    CancellationToken, Driver, SimConfig, SimDriver, SimNetwork, VolumeKind, VolumeSpec,
};
use serde_json::{json, Value};

use crate::cli::Output;
use crate::dev::{local_specs, LocalCluster, READY_TIMEOUT, STOP_GRACE};

const MIB: u64 = 1 << 20;

#[derive(clap::Args, Debug)]
pub struct ScaleArgs {
    /// Simulated agents (half per site).
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    /// Enabled replication pairs.
    #[arg(long, default_value_t = 10_000)]
    pub pairs: usize,
    /// Seconds between two syncs of a pair.
    #[arg(long, default_value_t = 10)]
    pub sleep_time: u32,
    /// Seconds of the measured window.
    #[arg(short = 'd', long, default_value_t = 60)]
    pub duration: u64,
    /// Concurrent pair creations.
    #[arg(long, default_value_t = 32)]
    pub create_concurrency: usize,
    /// Parent directory of the cluster's temporary data (default: the system temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Node i listens on HTTP port base+i and Raft port base+100+i.
    #[arg(long, default_value_t = 7700)]
    pub base_port: u16,
    /// Extra argument for every `drplane server` (repeatable).
    #[arg(long = "server-arg", allow_hyphen_values = true, value_name = "ARG")]
    pub server_args: Vec<String>,
    /// Keep the data directory and logs afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(args: ScaleArgs) -> anyhow::Result<()> {
    if args.agents < 2 || args.pairs == 0 || args.duration == 0 || args.sleep_time == 0 {
        bail!("need at least 2 agents, 1 pair, a positive duration and sleep time");
    }
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = parent.join(format!(
        "drplane-bench-scale-{}-{:06x}",
        std::process::id(),
        rand::random::<u32>() & 0xff_ffff
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let specs = local_specs(&dir, args.base_port)?;
    let mut cluster = LocalCluster::new(specs, args.server_args.clone())?;
    let shutdown = CancellationToken::new();
    let outcome = tokio::select! {
        r = measure(&mut cluster, &args, &dir, shutdown.clone()) => r,
        sig = crate::dev::shutdown_signal() => Err(anyhow!("{sig} received: stopped early")),
    };
    shutdown.cancel();
    cluster.stop_all(STOP_GRACE).await;
    if outcome.is_ok() && !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!(
            "drplane bench: data and node logs kept in {}",
            dir.display()
        );
    }
    let report = outcome?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => {
            for (k, v) in report.as_object().into_iter().flatten() {
                println!("{k:<34} {v}");
            }
        }
    }
    Ok(())
}

/// A counter's value, or the sum of a metric's series, from Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let base = key.split('{').next()?;
            (base == name).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Cumulative buckets `(le, count)` of a histogram.
fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, value) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, value.parse().ok()?))
        })
        .collect()
}

/// The `q` quantile of the observations between two scrapes of a histogram.
fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let deltas: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let prev = before
                .iter()
                .find(|(b, _)| b == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, n - prev)
        })
        .collect();
    let total = deltas.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (le, cum) in &deltas {
        if *cum >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let in_bucket = cum - lower.1;
            let frac = if in_bucket > 0.0 {
                (rank - lower.1) / in_bucket
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * frac);
        }
        lower = (*le, *cum);
    }
    None
}

/// (utime + stime) seconds and resident bytes of a process.
fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state is [0]; utime is field 14 overall, i.e. [11].
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let ticks = 100.0; // USER_HZ on Linux
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(((utime + stime) / ticks, rss_kb * 1024))
}

async fn get_json(c: &LocalCluster, url: &str) -> anyhow::Result<Value> {
    let mut req = c.http().get(url);
    if let Some(t) = c.token() {
        req = req.header("X-Auth-Token", t);
    }
    let resp = req.send().await.with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("GET {url}: {status} {text}");
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn get_text(c: &LocalCluster, url: &str) -> anyhow::Result<String> {
    let resp = c
        .http()
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    Ok(resp.text().await?)
}

async fn post_json(c: &LocalCluster, url: &str, body: &Value) -> anyhow::Result<(u16, String)> {
    let mut req = c.http().post(url).json(body);
    if let Some(t) = c.token() {
        req = req.header("X-Auth-Token", t);
    }
    let resp = req.send().await.with_context(|| format!("POST {url}"))?;
    let status = resp.status().as_u16();
    Ok((status, resp.text().await?))
}

async fn measure(
    cluster: &mut LocalCluster,
    args: &ScaleArgs,
    dir: &std::path::Path,
    shutdown: CancellationToken,
) -> anyhow::Result<Value> {
    cluster.start_all().await?;
    cluster.form().await?;
    cluster.wait_ready_all(READY_TIMEOUT).await?;
    let base = cluster.nodes[0].spec.url();
    for site in ["scale-a", "scale-b"] {
        let (s, t) = post_json(
            cluster,
            &format!("{base}/drplane/v1/sites"),
            &json!({"name": site}),
        )
        .await?;
        if s != 201 && s != 409 {
            bail!("creating site {site}: {s} {t}");
        }
    }

    // The simulated hosts and the pairs' source volumes.
    let net = SimNetwork::new();
    let half = args.agents / 2;
    let hosts: Vec<(String, &str)> = (0..args.agents)
        .map(|i| {
            if i < half {
                (format!("scale-a-{i}"), "scale-a")
            } else {
                (format!("scale-b-{}", i - half), "scale-b")
            }
        })
        .collect();
    let mut drivers: Vec<Arc<SimDriver>> = Vec::new();
    for (i, (host, _)) in hosts.iter().enumerate() {
        drivers.push(Arc::new(SimDriver::new(
            SimConfig {
                host: host.clone(),
                seed: i as u64 + 1,
                latency: Duration::from_millis(1),
                ..SimConfig::default()
            },
            net.clone(),
        )));
    }
    for k in 0..args.pairs {
        drivers[k % half]
            .create_volume(&VolumeSpec {
                id: format!("v{k}"),
                kind: VolumeKind::Disk,
                pool: "default".into(),
                size_bytes: MIB,
                reserve: false,
                read_only: false,
            })
            .await
            .with_context(|| format!("sim source volume v{k}"))?;
    }
    let raft: Vec<String> = cluster.nodes.iter().map(|n| n.spec.raft.clone()).collect();
    let mut servers = Vec::new();
    let started = Instant::now();
    for (i, (host, site)) in hosts.iter().enumerate() {
        let driver: Arc<dyn Driver> = drivers[i].clone();
        let server = driver
            .serve_sync_source("127.0.0.1:0".parse()?)
            .await
            .context("sim data service")?;
        let mut cfg = RuntimeConfig::new(host.clone(), *site, dir.join("agents").join(host));
        cfg.vcpus = 64;
        cfg.ram_mb = 256 * 1024;
        cfg.data_address = server.endpoint().to_string();
        servers.push(server);
        let agent = Agent::new(cfg, driver, Arc::new(StaticDiscovery(raft.clone())))?;
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = agent.run(stop).await {
                tracing::warn!(error = %e, "sim agent stopped");
            }
        });
    }
    // Every host online.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let doc = get_json(cluster, &format!("{base}/drplane/v1/hosts")).await?;
        let online = doc["hosts"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|h| h["state"] == "online").count());
        if online >= args.agents {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {online} of {} hosts online after 300 s", args.agents);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let agents_online_s = started.elapsed().as_secs_f64();

    // The pairs.
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..args.create_concurrency.max(1) {
        let http = cluster.http().clone();
        let token = cluster.token().map(str::to_string);
        let url = format!("{}/drplane/v1/pairs", cluster.nodes[w % 3].spec.url());
        let next = next.clone();
        let (pairs, half, sleep) = (args.pairs, half, args.sleep_time);
        workers.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if k >= pairs {
                    return Ok::<(), anyhow::Error>(());
                }
                let body = json!({
                    "id": format!("pair-{k}"),
                    "project": "scale",
                    "source": {"host": format!("scale-a-{}", k % half), "pool": "default",
                               "volume_id": format!("v{k}"), "size_bytes": MIB, "layout": "block"},
                    "target": {"host": format!("scale-b-{}", k % half), "pool": "default"},
                    "sleep_time": sleep,
                });
                let mut attempt = 0;
                loop {
                    let mut req = http.post(&url).json(&body);
                    if let Some(t) = &token {
                        req = req.header("X-Auth-Token", t);
                    }
                    let r = req.send().await;
                    match r {
                        Ok(resp) if resp.status().is_success() || resp.status().as_u16() == 409 => {
                            break
                        }
                        Ok(resp) if attempt < 5 => {
                            tracing::warn!(status = %resp.status(), "pair create retry");
                        }
                        Ok(resp) => {
                            let s = resp.status();
                            bail!(
                                "creating pair-{k}: {s} {}",
                                resp.text().await.unwrap_or_default()
                            )
                        }
                        Err(e) if attempt < 5 => tracing::warn!(error = %e, "pair create retry"),
                        Err(e) => return Err(anyhow!("creating pair-{k}: {e}")),
                    }
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }));
    }
    for w in workers {
        w.await.map_err(|e| anyhow!("create worker: {e}"))??;
    }
    let create_s = started.elapsed().as_secs_f64();
    // Every pair through its creation job.
    let deadline = Instant::now() + Duration::from_secs(600);
    let active_s = loop {
        let doc = get_json(cluster, &format!("{base}/drplane/v1/pairs?project=scale")).await?;
        let states: BTreeMap<String, usize> =
            doc["pairs"]
                .as_array()
                .into_iter()
                .flatten()
                .fold(BTreeMap::new(), |mut m, p| {
                    *m.entry(p["state"].as_str().unwrap_or("?").to_string())
                        .or_default() += 1;
                    m
                });
        if states.get("active").copied().unwrap_or(0) >= args.pairs {
            break started.elapsed().as_secs_f64();
        }
        if Instant::now() > deadline {
            bail!("pairs not all active after 600 s: {states:?}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };

    // The measured window, on the leader.
    let (leader, _) = cluster.wait_agreed_leader(Duration::from_secs(10)).await?;
    let idx = cluster
        .index_of(leader)
        .ok_or_else(|| anyhow!("leader {leader} is not a local node"))?;
    let leader_url = cluster.nodes[idx].spec.url();
    let pid = cluster
        .pid(idx)
        .ok_or_else(|| anyhow!("the leader's process is not running"))?;
    let m0 = get_text(cluster, &format!("{leader_url}/metrics")).await?;
    let u0 = proc_usage(pid);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    let m1 = get_text(cluster, &format!("{leader_url}/metrics")).await?;
    let u1 = proc_usage(pid);
    let secs = t0.elapsed().as_secs_f64();
    let dispatched = metric(&m1, "drplane_scheduler_tasks_dispatched_total")
        - metric(&m0, "drplane_scheduler_tasks_dispatched_total");
    let syncs = metric(&m1, "drplane_scheduler_periodic_syncs_started_total")
        - metric(&m0, "drplane_scheduler_periodic_syncs_started_total");
    let h = "drplane_scheduler_dispatch_latency_seconds";
    let (b0, b1) = (buckets(&m0, h), buckets(&m1, h));
    let cpu = match (u0, u1) {
        (Some((c0, _)), Some((c1, _))) => Some((c1 - c0) / secs),
        _ => None,
    };
    let rss_mib = u1.map(|(_, rss)| rss as f64 / MIB as f64);
    let fsync = crate::bench::fsync_probe_ms(dir).ok();
    Ok(json!({
        "agents": args.agents,
        "pairs": args.pairs,
        "sleep_time_s": args.sleep_time,
        "window_s": (secs * 10.0).round() / 10.0,
        "agents_online_s": (agents_online_s * 10.0).round() / 10.0,
        "pairs_created_per_s": (args.pairs as f64 / create_s).round(),
        "pairs_active_after_s": (active_s * 10.0).round() / 10.0,
        "tasks_dispatched_per_s": (dispatched / secs).round(),
        "periodic_syncs_started_per_s": (syncs / secs).round(),
        "dispatch_latency_p50_ms": quantile(&b0, &b1, 0.5).map(|v| (v * 1e4).round() / 10.0),
        "dispatch_latency_p99_ms": quantile(&b0, &b1, 0.99).map(|v| (v * 1e4).round() / 10.0),
        "leader_cpu_cores": cpu.map(|c| (c * 100.0).round() / 100.0),
        "leader_rss_mib": rss_mib.map(|m| m.round()),
        "fsync_p50_ms": fsync,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_interpolate_within_buckets() {
        let text0 = "h_bucket{le=\"0.1\"} 0\nh_bucket{le=\"1\"} 0\nh_bucket{le=\"+Inf\"} 0\n";
        let text1 = "h_bucket{le=\"0.1\"} 50\nh_bucket{le=\"1\"} 100\nh_bucket{le=\"+Inf\"} 100\n";
        let (b0, b1) = (buckets(text0, "h"), buckets(text1, "h"));
        assert_eq!(b1.len(), 3);
        let p50 = quantile(&b0, &b1, 0.5).expect("p50");
        assert!((p50 - 0.1).abs() < 1e-9, "{p50}");
        let p75 = quantile(&b0, &b1, 0.75).expect("p75");
        assert!((p75 - 0.55).abs() < 1e-9, "{p75}");
        assert_eq!(quantile(&b1, &b1, 0.5), None);
        assert_eq!(metric("a 1\na{x=\"y\"} 2\n# a 5\nab 7\n", "a"), 3.0);
    }
}
