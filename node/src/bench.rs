//! `drplane bench`: the HTTP write path under load, and leader-kill recovery time.
//!
//! - `bench write` drives `POST /drplane/v1/sites` (a new site with a 256-byte description
//!   per request) from N concurrent workers for a fixed time, each worker with its own HTTP
//!   connection and one request in flight, spread over the endpoints round-robin. Only 2xx
//!   answers count as writes; latencies of those are kept in full (u32 microseconds) and
//!   sorted, so percentiles are exact.
//! - `bench failover` runs its own three-node cluster (the `drplane dev` layout from a
//!   different base port), then per trial: finds the leader, writes through the two other
//!   nodes every ~5 ms, SIGKILLs the leader and measures from the kill to the first
//!   acknowledged write that was *sent after* the kill; restarts the killed node and waits
//!   for all three to be ready before the next trial.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::cli::{describe_transport_error, parse_endpoints, render_table, Output};
use crate::dev::{local_specs, shutdown_signal, LocalCluster, READY_TIMEOUT, STOP_GRACE};

/// Bytes of the description every benchmark write carries.
const DESCRIPTION_BYTES: usize = 256;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub mode: BenchMode,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchMode {
    /// Throughput and latency of the write path of a running cluster.
    Write(WriteArgs),
    /// Leader kill to next acknowledged write, on a cluster this command starts.
    Failover(FailoverArgs),
    /// The scheduler with many simulated agents and pairs, on a cluster this command
    /// starts (see `bench_scale.rs`).
    Scale(crate::bench_scale::ScaleArgs),
    /// A Huawei SDRS group failover on simulated agents, split into control-plane and
    /// agent time, on a cluster this command starts (see `bench_sdrs.rs`).
    SdrsFailover(crate::bench_sdrs::SdrsFailoverArgs),
}

#[derive(clap::Args, Debug)]
pub struct WriteArgs {
    /// Node URL(s), comma-separated; workers are spread over them round-robin.
    #[arg(
        long,
        alias = "endpoint",
        env = "DRPLANE_ENDPOINT",
        default_value = crate::cli::DEFAULT_ENDPOINT,
        value_name = "URL[,URL…]"
    )]
    pub endpoints: String,
    /// Concurrent workers, each with its own connection and one request in flight.
    #[arg(short = 'c', long, default_value_t = 1)]
    pub connections: usize,
    /// Seconds per measured run.
    #[arg(short = 'd', long, default_value_t = 10)]
    pub duration: u64,
    /// Measured runs; the summary is the median of each figure over them.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Seconds of unmeasured load before the first run.
    #[arg(long, default_value_t = 1)]
    pub warmup: u64,
    /// Per-request timeout in seconds (a timed-out request counts as an error).
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Token sent as X-Auth-Token (a member or admin: the benchmark creates sites).
    #[arg(long, env = "DRPLANE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// User to log in as when no --token is given.
    #[arg(long, env = "DRPLANE_USER")]
    pub user: Option<String>,
    /// Password of --user.
    #[arg(long, env = "DRPLANE_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// PEM file of the cluster CA, trusted for https:// endpoints.
    #[arg(long, env = "DRPLANE_CA", value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct FailoverArgs {
    /// Leader kills to measure.
    #[arg(long, default_value_t = 20)]
    pub trials: usize,
    /// Parent directory of the cluster's temporary data (default: the system temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Node i listens on HTTP port base+i and Raft port base+100+i.
    #[arg(long, default_value_t = 7500)]
    pub base_port: u16,
    /// Milliseconds between writes of the writer loop.
    #[arg(long, default_value_t = 5)]
    pub interval_ms: u64,
    /// Extra argument for every `drplane server` (repeatable), e.g.
    /// `--server-arg=--election-min-ms=300`.
    #[arg(long = "server-arg", allow_hyphen_values = true, value_name = "ARG")]
    pub server_args: Vec<String>,
    /// Keep the data directory and logs afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.mode {
        BenchMode::Write(a) => run_write(a).await,
        BenchMode::Failover(a) => run_failover(a).await,
        BenchMode::Scale(a) => crate::bench_scale::run(a).await,
        BenchMode::SdrsFailover(a) => crate::bench_sdrs::run(a).await,
    }
}

/// Median of 50 fdatasync'ed 4 KiB writes to a file in `dir`, in ms: the disk's sync
/// latency, printed beside benchmark figures.
pub(crate) fn fsync_probe_ms(dir: &std::path::Path) -> anyhow::Result<f64> {
    use std::io::Write as _;
    let path = dir.join(".fsync-probe");
    let mut f =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let block = [0x5au8; 4096];
    let mut samples = Vec::with_capacity(50);
    for _ in 0..50 {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = std::fs::remove_file(&path);
    Ok((median(&samples) * 1000.0).round() / 1000.0)
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

// ---- statistics ----

/// Nearest-rank percentile of sorted samples: the smallest value with at least `p`% of
/// the samples at or below it. `None` for no samples.
pub(crate) fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, sorted.len()) - 1;
    Some(sorted[idx])
}

/// Median of unsorted values (mean of the two middle ones for an even count).
pub(crate) fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

fn ms(micros: u32) -> f64 {
    f64::from(micros) / 1000.0
}

/// One measured run of `bench write`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RunStats {
    pub writes: u64,
    pub errors: u64,
    pub elapsed_s: f64,
    pub writes_per_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl RunStats {
    /// From every successful write's latency (any order), the error count and the run time.
    pub(crate) fn from_samples(mut micros: Vec<u32>, errors: u64, elapsed: Duration) -> Self {
        micros.sort_unstable();
        let elapsed_s = elapsed.as_secs_f64();
        let writes = micros.len() as u64;
        let p = |q: f64| percentile(&micros, q).map(ms).unwrap_or(0.0);
        RunStats {
            writes,
            errors,
            elapsed_s,
            writes_per_s: if elapsed_s > 0.0 {
                writes as f64 / elapsed_s
            } else {
                0.0
            },
            p50_ms: p(50.0),
            p90_ms: p(90.0),
            p99_ms: p(99.0),
            max_ms: micros.last().copied().map(ms).unwrap_or(0.0),
        }
    }

    /// The median of each figure over runs.
    pub(crate) fn median_of(runs: &[RunStats]) -> RunStats {
        let m = |f: fn(&RunStats) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        RunStats {
            writes: m(|r| r.writes as f64).round() as u64,
            errors: m(|r| r.errors as f64).round() as u64,
            elapsed_s: m(|r| r.elapsed_s),
            writes_per_s: m(|r| r.writes_per_s),
            p50_ms: m(|r| r.p50_ms),
            p90_ms: m(|r| r.p90_ms),
            p99_ms: m(|r| r.p99_ms),
            max_ms: m(|r| r.max_ms),
        }
    }

    fn row(&self, label: &str) -> Vec<String> {
        vec![
            label.to_string(),
            format!("{:.0}", self.writes_per_s),
            format!("{:.2}", self.p50_ms),
            format!("{:.2}", self.p90_ms),
            format!("{:.2}", self.p99_ms),
            format!("{:.2}", self.max_ms),
            self.writes.to_string(),
            self.errors.to_string(),
        ]
    }

    fn to_json(&self) -> Value {
        json!({
            "writes": self.writes,
            "errors": self.errors,
            "elapsed_s": self.elapsed_s,
            "writes_per_s": self.writes_per_s,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
        })
    }
}

const WRITE_HEADERS: [&str; 8] = [
    "RUN", "WRITES/S", "P50_MS", "P90_MS", "P99_MS", "MAX_MS", "OK", "ERRORS",
];

// ---- bench write ----

/// A unique site name: `b<tag>-<run>-<worker>-<seq>`, within the 63-character limit.
fn site_name(tag: &str, run: usize, worker: usize, seq: u64) -> String {
    format!("b{tag}-{run}-{worker}-{seq}")
}

/// The fixed 256-byte description (visible ASCII, no JSON escaping needed).
fn description() -> String {
    let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..DESCRIPTION_BYTES)
        .map(|i| alphabet[i % alphabet.len()] as char)
        .collect()
}

/// What one worker saw in one run.
#[derive(Default)]
struct WorkerResult {
    micros: Vec<u32>,
    errors: u64,
    /// Error kind -> count, e.g. "HTTP 503" or "timed out".
    kinds: BTreeMap<String, u64>,
}

async fn worker(
    client: reqwest::Client,
    url: String,
    tag: String,
    run: usize,
    id: usize,
    desc: String,
    until: Instant,
) -> WorkerResult {
    let mut out = WorkerResult::default();
    let mut seq = 0u64;
    while Instant::now() < until {
        seq += 1;
        let body = format!(
            "{{\"name\":\"{}\",\"description\":\"{desc}\"}}",
            site_name(&tag, run, id, seq)
        );
        let t0 = Instant::now();
        let res = client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        match res {
            Ok(resp) => {
                let status = resp.status();
                // Read the whole answer: the write is acknowledged when its answer is in.
                let read = resp.bytes().await;
                let took = t0.elapsed();
                match read {
                    Ok(_) if status.is_success() => out
                        .micros
                        .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX)),
                    Ok(_) => {
                        out.errors += 1;
                        *out.kinds
                            .entry(format!("HTTP {}", status.as_u16()))
                            .or_default() += 1;
                    }
                    Err(e) => {
                        out.errors += 1;
                        *out.kinds.entry(describe_transport_error(&e)).or_default() += 1;
                    }
                }
            }
            Err(e) => {
                out.errors += 1;
                *out.kinds.entry(describe_transport_error(&e)).or_default() += 1;
                // A dead endpoint must not turn the loop into a busy spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    out
}

/// One run of every worker for `duration`; returns latencies, errors, kinds, elapsed.
async fn one_run(
    clients: &[reqwest::Client],
    urls: &[String],
    tag: &str,
    run: usize,
    duration: Duration,
) -> anyhow::Result<(RunStats, BTreeMap<String, u64>)> {
    let desc = description();
    let start = Instant::now();
    let until = start + duration;
    let tasks: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, client)| {
            tokio::spawn(worker(
                client.clone(),
                urls[i % urls.len()].clone(),
                tag.to_string(),
                run,
                i,
                desc.clone(),
                until,
            ))
        })
        .collect();
    let mut micros = Vec::new();
    let mut errors = 0;
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    for t in futures::future::join_all(tasks).await {
        let r = t.map_err(|e| anyhow!("a benchmark worker failed: {e}"))?;
        micros.extend(r.micros);
        errors += r.errors;
        for (k, v) in r.kinds {
            *kinds.entry(k).or_default() += v;
        }
    }
    Ok((
        RunStats::from_samples(micros, errors, start.elapsed()),
        kinds,
    ))
}

async fn run_write(args: WriteArgs) -> anyhow::Result<()> {
    let endpoints = parse_endpoints(&args.endpoints)?;
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if args.duration == 0 {
        bail!("--duration must be at least 1 second");
    }
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let urls: Vec<String> = endpoints
        .iter()
        .map(|e| format!("{e}/drplane/v1/sites"))
        .collect();
    // Log in once (if asked to) before the clock starts; every request carries the token.
    let credentials = match (&args.token, &args.user, &args.password) {
        (Some(t), _, _) => crate::cli::Credentials::Token(t.clone()),
        (None, Some(user), Some(password)) => crate::cli::Credentials::Password {
            user: user.clone(),
            password: password.clone(),
            project: None,
        },
        _ => crate::cli::Credentials::None,
    };
    let token = crate::cli::Api::with_ca(&args.endpoints, args.ca.as_deref())?
        .with_credentials(credentials)
        .token()
        .await?;
    let headers = crate::cli::auth_headers(token.as_deref())?;
    // One client (so one connection) per worker, like wrk's connections.
    let clients = (0..args.connections)
        .map(|_| {
            crate::cli::client_builder(args.ca.as_deref())?
                .default_headers(headers.clone())
                .timeout(Duration::from_secs(args.timeout.max(1)))
                .connect_timeout(Duration::from_secs(3))
                .pool_max_idle_per_host(1)
                .tcp_nodelay(true)
                .build()
                .context("cannot build the HTTP clients")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Names unique across invocations against the same cluster.
    let tag = format!("{:08x}", rand::random::<u32>());

    let context = format!(
        "cores={} connections={} duration={}s runs={} warmup={}s endpoints={} write=POST /drplane/v1/sites description={}B",
        cores(),
        args.connections,
        args.duration,
        args.runs,
        args.warmup,
        endpoints.join(","),
        DESCRIPTION_BYTES
    );
    let table = args.output == Output::Table;
    if table {
        println!("{context}");
    }
    if args.warmup > 0 {
        let (w, kinds) =
            one_run(&clients, &urls, &tag, 0, Duration::from_secs(args.warmup)).await?;
        if table {
            println!(
                "warmup: {:.0} writes/s, {} errors (not counted)",
                w.writes_per_s, w.errors
            );
        }
        if w.writes == 0 {
            bail!(
                "no write succeeded during the warmup ({}); is the cluster at {} up and ready?",
                kinds
                    .iter()
                    .map(|(k, v)| format!("{v} x {k}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                endpoints.join(",")
            );
        }
    }
    let mut runs = Vec::new();
    let mut rows = Vec::new();
    let mut error_kinds: Vec<BTreeMap<String, u64>> = Vec::new();
    for run in 1..=args.runs {
        let (stats, kinds) = one_run(
            &clients,
            &urls,
            &tag,
            run,
            Duration::from_secs(args.duration),
        )
        .await?;
        if table {
            rows.push(stats.row(&run.to_string()));
            if !kinds.is_empty() {
                let list: Vec<String> = kinds.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                eprintln!("run {run} errors: {}", list.join(", "));
            }
        }
        runs.push(stats);
        error_kinds.push(kinds);
    }
    let med = RunStats::median_of(&runs);
    match args.output {
        Output::Table => {
            rows.push(med.row("median"));
            print!("{}", render_table(&WRITE_HEADERS, &rows));
        }
        Output::Json => {
            let doc = json!({
                "cores": cores(),
                "endpoints": endpoints,
                "connections": args.connections,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "description_bytes": DESCRIPTION_BYTES,
                "runs": runs.iter().zip(&error_kinds).map(|(r, k)| {
                    let mut v = r.to_json();
                    v["error_kinds"] = json!(k);
                    v
                }).collect::<Vec<_>>(),
                "median": med.to_json(),
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
    }
    Ok(())
}

// ---- bench failover ----

/// One write of the failover writer: when it was sent, when its answer came, whether 2xx.
struct Sent {
    at: Instant,
    done: Instant,
    ok: bool,
}

/// Writes through `urls` (alternating) every `interval`, each write independent of the
/// others (a write stuck on the dead leader does not delay the next), until dropped.
fn spawn_writer(
    urls: Vec<String>,
    interval: Duration,
    tag: String,
    tx: mpsc::UnboundedSender<Sent>,
    token: Option<String>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let client = reqwest::Client::builder()
        .default_headers(crate::cli::auth_headers(token.as_deref())?)
        .timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .build()
        .context("cannot build the HTTP client")?;
    let desc = description();
    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        let mut in_flight = tokio::task::JoinSet::new();
        loop {
            tick.tick().await;
            // Reap finished writes so the set does not grow.
            while in_flight.try_join_next().is_some() {}
            seq += 1;
            let url = urls[(seq as usize) % urls.len()].clone();
            let body = format!(
                "{{\"name\":\"{}\",\"description\":\"{desc}\"}}",
                site_name(&tag, 0, 0, seq)
            );
            let client = client.clone();
            let tx = tx.clone();
            in_flight.spawn(async move {
                let at = Instant::now();
                let res = client
                    .post(&url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body)
                    .send()
                    .await;
                let ok = match res {
                    Ok(resp) => {
                        let success = resp.status().is_success();
                        resp.bytes().await.is_ok() && success
                    }
                    Err(_) => false,
                };
                let _ = tx.send(Sent {
                    at,
                    done: Instant::now(),
                    ok,
                });
            });
        }
    }))
}

/// One trial's outcome.
#[derive(Debug, Clone)]
struct Trial {
    killed: u64,
    term_before: u64,
    new_leader: Option<u64>,
    recovery: Duration,
}

/// Deadline for the first acknowledged write after a kill.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);

async fn one_trial(
    cluster: &mut LocalCluster,
    interval: Duration,
    tag: &str,
    n: usize,
) -> anyhow::Result<Trial> {
    let (leader, term_before) = cluster.wait_agreed_leader(Duration::from_secs(30)).await?;
    let li = cluster
        .index_of(leader)
        .ok_or_else(|| anyhow!("the leader {leader} is not one of our nodes"))?;
    let survivors: Vec<String> = cluster
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != li)
        .map(|(_, node)| format!("{}/drplane/v1/sites", node.spec.url()))
        .collect();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let writer = spawn_writer(
        survivors,
        interval,
        format!("{tag}f{n}"),
        tx,
        cluster.token().map(str::to_string),
    )?;
    let result = async {
        // The write path works before the kill: a few acknowledged writes first.
        let warm_deadline = Instant::now() + Duration::from_secs(10);
        let mut acked = 0;
        while acked < 5 {
            let left = warm_deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(s)) if s.ok => acked += 1,
                Ok(Some(_)) => {}
                Ok(None) => bail!("the writer stopped"),
                Err(_) => bail!("no write was acknowledged in 10 s before the kill"),
            }
        }
        let killed_at = cluster.kill_hard(li).await?;
        let deadline = killed_at + RECOVERY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(s)) if s.ok && s.at >= killed_at => {
                    return Ok(s.done.duration_since(killed_at));
                }
                Ok(Some(_)) => {}
                Ok(None) => bail!("the writer stopped"),
                Err(_) => bail!(
                    "no write sent after killing leader {leader} was acknowledged within {} s",
                    RECOVERY_TIMEOUT.as_secs()
                ),
            }
        }
    }
    .await;
    writer.abort();
    let recovery = result?;
    let new_leader = cluster
        .wait_agreed_leader(Duration::from_secs(5))
        .await
        .ok()
        .map(|(id, _)| id);
    cluster.spawn(li).await?;
    cluster.wait_livez(li).await?;
    cluster.wait_ready_all(READY_TIMEOUT).await?;
    Ok(Trial {
        killed: leader,
        term_before,
        new_leader,
        recovery,
    })
}

async fn run_failover(args: FailoverArgs) -> anyhow::Result<()> {
    if args.trials == 0 {
        bail!("--trials must be at least 1");
    }
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = parent.join(format!(
        "drplane-bench-failover-{}-{:06x}",
        std::process::id(),
        rand::random::<u32>() & 0xff_ffff
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let specs = local_specs(&dir, args.base_port)?;
    let mut cluster = LocalCluster::new(specs, args.server_args.clone())?;
    let table = args.output == Output::Table;
    if table {
        println!(
            "cores={} trials={} interval={}ms base-port={} dir={} server={}",
            cores(),
            args.trials,
            args.interval_ms,
            args.base_port,
            dir.display(),
            cluster.exe().display()
        );
    }

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut trials: Vec<Trial> = Vec::new();
    let outcome = tokio::select! {
        r = failover_trials(&mut cluster, &args, table, &mut trials) => r,
        sig = &mut shutdown => Err(anyhow!("{sig} received: stopped early")),
    };
    cluster.stop_all(STOP_GRACE).await;
    if outcome.is_ok() && !args.keep {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            eprintln!("drplane bench: cannot remove {}: {e}", dir.display());
        }
    } else {
        eprintln!(
            "drplane bench: data and node logs kept in {}",
            dir.display()
        );
    }

    let mut micros: Vec<u32> = trials
        .iter()
        .map(|t| u32::try_from(t.recovery.as_micros()).unwrap_or(u32::MAX))
        .collect();
    micros.sort_unstable();
    let p = |q: f64| percentile(&micros, q).map(ms);
    match args.output {
        Output::Table => {
            if !micros.is_empty() {
                println!(
                    "leader kill -> next acknowledged write over {} trials: p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
                    micros.len(),
                    p(50.0).unwrap_or(0.0),
                    p(99.0).unwrap_or(0.0),
                    p(100.0).unwrap_or(0.0)
                );
            }
        }
        Output::Json => {
            let doc = json!({
                "cores": cores(),
                "trials": trials.iter().map(|t| json!({
                    "killed_leader": t.killed,
                    "term_before": t.term_before,
                    "new_leader": t.new_leader,
                    "ms": t.recovery.as_secs_f64() * 1000.0,
                })).collect::<Vec<_>>(),
                "p50_ms": p(50.0),
                "p99_ms": p(99.0),
                "max_ms": p(100.0),
                "complete": outcome.is_ok(),
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
    }
    outcome
}

async fn failover_trials(
    cluster: &mut LocalCluster,
    args: &FailoverArgs,
    table: bool,
    trials: &mut Vec<Trial>,
) -> anyhow::Result<()> {
    cluster.start_all().await?;
    cluster.form().await?;
    cluster.wait_ready_all(READY_TIMEOUT).await?;
    let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let interval = Duration::from_millis(args.interval_ms.max(1));
    for n in 1..=args.trials {
        let t = one_trial(cluster, interval, &tag, n)
            .await
            .with_context(|| format!("trial {n}"))?;
        if table {
            println!(
                "trial {n:>2}: killed leader {} (term {}) -> first acknowledged write after {:.1} ms; new leader {}",
                t.killed,
                t.term_before,
                t.recovery.as_secs_f64() * 1000.0,
                t.new_leader.map_or("-".to_string(), |x| x.to_string()),
            );
        }
        trials.push(t);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 90.0), Some(90));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        let one = [7u32];
        assert_eq!(percentile(&one, 50.0), Some(7));
        assert_eq!(percentile(&one, 99.0), Some(7));
        let empty: [u32; 0] = [];
        assert_eq!(percentile(&empty, 50.0), None);
        // 20 trials: p99 is the maximum, p50 the 10th.
        let t: Vec<u32> = (1..=20).collect();
        assert_eq!(percentile(&t, 99.0), Some(20));
        assert_eq!(percentile(&t, 50.0), Some(10));
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn run_stats() {
        let micros: Vec<u32> = (1..=1000).rev().map(|x| x * 1000).collect();
        let s = RunStats::from_samples(micros, 3, Duration::from_secs(2));
        assert_eq!(s.writes, 1000);
        assert_eq!(s.errors, 3);
        assert_eq!(s.writes_per_s, 500.0);
        assert_eq!(s.p50_ms, 500.0);
        assert_eq!(s.p90_ms, 900.0);
        assert_eq!(s.p99_ms, 990.0);
        assert_eq!(s.max_ms, 1000.0);
        let empty = RunStats::from_samples(Vec::new(), 5, Duration::from_secs(1));
        assert_eq!(empty.writes_per_s, 0.0);
        assert_eq!(empty.p99_ms, 0.0);
        let med = RunStats::median_of(&[s.clone(), empty.clone(), s.clone()]);
        assert_eq!(med.writes_per_s, 500.0);
        assert_eq!(med.errors, 3);
    }

    #[test]
    fn names_and_descriptions_are_valid() {
        let name = site_name("ffffffff", 1000, 99_999, u64::MAX);
        assert!(name.len() <= 63, "{name} is {} chars", name.len());
        assert!(name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')));
        let d = description();
        assert_eq!(d.len(), DESCRIPTION_BYTES);
        assert!(d.chars().all(|c| c.is_ascii_alphanumeric()));
        let failover = site_name("abcdef", 0, 0, 1);
        assert_eq!(failover, "babcdef-0-0-1");
    }
}
