//! A private network for one test cluster, cut at the network layer.
//!
//! Every node runs in its own network namespace with one interface (`eth0`, address
//! `10.A.B.<id>`), all plugged into a bridge that lives in a hub namespace; the test process
//! reaches the nodes through one more veth pair whose host end has `10.A.B.254`. Nothing but
//! that host interface and the namespaces (named `drpc-<pid>-<n>-…`) is created outside the
//! namespaces, and dropping [`Net`] deletes all of it.
//!
//! Faults, all per direction (`from` → `to`):
//! - **cut**: `from`'s neighbour entry for `to` is replaced by a MAC address nobody has, so
//!   every frame `from` sends to `to` vanishes silently — established connections stall and
//!   new ones time out, as behind a real partition, while `to` → `from` still delivers.
//!   Cutting both directions is a partition; the test client (on the host) is never cut.
//! - **slow**: an HTB class on `from`'s `eth0` for packets to `to`, limited to a low rate
//!   with a short queue: added queueing latency and tail drops under load. (The kernel of the
//!   test machines has no `netem`, so this is the latency/loss fault we can make.)
//!
//! Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and `ip`/`tc` from iproute2; [`Net::available`]
//! says whether this machine can do it.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context};

/// The MAC address a cut link sends to (locally administered; no interface has it).
const NOWHERE_MAC: &str = "02:00:5e:de:ad:01";

/// Runs `ip`/`tc` with `args`; an error carries its stderr.
fn run(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn output(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A private network of namespaces; see the module documentation.
pub struct Net {
    /// `drpc-<pid>-<n>`: the prefix of every namespace of this network.
    pub tag: String,
    /// The first three octets of the subnet, `10.A.B`.
    pub prefix: String,
    hub: String,
    host_if: String,
    nodes: BTreeMap<u64, String>,
    cuts: BTreeSet<(u64, u64)>,
    slow: BTreeMap<(u64, u64), u32>,
}

impl Net {
    /// Whether this process can build namespaces (root with iproute2), and why not.
    pub fn available() -> Result<(), String> {
        let probe = format!("drpc-probe-{}", std::process::id());
        match run("ip", &["netns", "add", &probe]) {
            Ok(()) => {
                let _ = run("ip", &["netns", "del", &probe]);
                Ok(())
            }
            Err(e) => Err(format!("network namespaces are not available: {e:#}")),
        }
    }

    /// A new empty network (hub, bridge, host interface); removes what dead test processes
    /// left behind first.
    pub fn new() -> anyhow::Result<Net> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        clean_stale();
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("drpc-{pid}-{n}");
        let prefix = pick_subnet(pid, n)?;
        let hub = format!("{tag}-hub");
        let host_if = format!("dc{}x{n}", pid % 10_000_000);
        let net = Net {
            tag,
            prefix,
            hub,
            host_if,
            nodes: BTreeMap::new(),
            cuts: BTreeSet::new(),
            slow: BTreeMap::new(),
        };
        // From here on, dropping `net` removes whatever was made.
        let hub = net.hub.as_str();
        run("ip", &["netns", "add", hub])?;
        run("ip", &["-n", hub, "link", "set", "lo", "up"])?;
        run("ip", &["-n", hub, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", hub, "link", "set", "br0", "up"])?;
        run(
            "ip",
            &[
                "link",
                "add",
                "name",
                &net.host_if,
                "type",
                "veth",
                "peer",
                "name",
                "host",
                "netns",
                hub,
            ],
        )?;
        run("ip", &["-n", hub, "link", "set", "host", "master", "br0"])?;
        run("ip", &["-n", hub, "link", "set", "host", "up"])?;
        let host_addr = format!("{}.254/24", net.prefix);
        run("ip", &["addr", "add", &host_addr, "dev", &net.host_if])?;
        run("ip", &["link", "set", &net.host_if, "up"])?;
        Ok(net)
    }

    /// The namespace of node `id`, made (with its interface and address) on first use.
    pub fn add_node(&mut self, id: u64) -> anyhow::Result<String> {
        if let Some(ns) = self.nodes.get(&id) {
            return Ok(ns.clone());
        }
        if !(1..=250).contains(&id) {
            bail!("node ids of a namespaced cluster are 1-250, not {id}");
        }
        let ns = format!("{}-n{id}", self.tag);
        run("ip", &["netns", "add", &ns])?;
        self.nodes.insert(id, ns.clone());
        let port = format!("n{id}");
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        run(
            "ip",
            &[
                "link", "add", "name", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &self.hub,
            ],
        )?;
        run(
            "ip",
            &["-n", &self.hub, "link", "set", &port, "master", "br0"],
        )?;
        run("ip", &["-n", &self.hub, "link", "set", &port, "up"])?;
        let addr = format!("{}/24", self.ip(id));
        run("ip", &["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
        run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        Ok(ns)
    }

    /// Node `id`'s address.
    pub fn ip(&self, id: u64) -> String {
        format!("{}.{id}", self.prefix)
    }

    /// The namespace of node `id`, if it has one.
    pub fn namespace(&self, id: u64) -> Option<&str> {
        self.nodes.get(&id).map(String::as_str)
    }

    fn ns(&self, id: u64) -> anyhow::Result<&str> {
        self.namespace(id)
            .ok_or_else(|| anyhow!("node {id} has no namespace"))
    }

    /// Cut the direction `from` → `to` (see the module documentation).
    pub fn cut(&mut self, from: u64, to: u64) -> anyhow::Result<()> {
        if from == to {
            return Ok(());
        }
        let ns = self.ns(from)?.to_string();
        let ip = self.ip(to);
        run(
            "ip",
            &[
                "-n",
                &ns,
                "neigh",
                "replace",
                &ip,
                "lladdr",
                NOWHERE_MAC,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        )?;
        self.cuts.insert((from, to));
        Ok(())
    }

    /// Cut both directions between every node of `a` and every node of `b`.
    pub fn partition(&mut self, a: &[u64], b: &[u64]) -> anyhow::Result<()> {
        for &x in a {
            for &y in b {
                self.cut(x, y)?;
                self.cut(y, x)?;
            }
        }
        Ok(())
    }

    /// Restore the direction `from` → `to`.
    pub fn uncut(&mut self, from: u64, to: u64) -> anyhow::Result<()> {
        let ns = self.ns(from)?.to_string();
        let ip = self.ip(to);
        // The next packet resolves the real address again by ARP.
        let _ = run("ip", &["-n", &ns, "neigh", "del", &ip, "dev", "eth0"]);
        self.cuts.remove(&(from, to));
        Ok(())
    }

    /// Directions cut now.
    pub fn cuts(&self) -> Vec<(u64, u64)> {
        self.cuts.iter().copied().collect()
    }

    /// Make `from` → `to` a slow, lossy link of `kbit` kbit/s (None: full speed again).
    pub fn set_slow(&mut self, from: u64, to: u64, kbit: Option<u32>) -> anyhow::Result<()> {
        match kbit {
            Some(k) => self.slow.insert((from, to), k),
            None => self.slow.remove(&(from, to)),
        };
        self.apply_qdisc(from)
    }

    /// Rebuild node `from`'s egress queueing from the slow links it has.
    fn apply_qdisc(&self, from: u64) -> anyhow::Result<()> {
        let ns = self.ns(from)?.to_string();
        let _ = run("tc", &["-n", &ns, "qdisc", "del", "dev", "eth0", "root"]);
        let links: Vec<(u64, u32)> = self
            .slow
            .iter()
            .filter(|((f, _), _)| *f == from)
            .map(|((_, t), k)| (*t, *k))
            .collect();
        if links.is_empty() {
            return Ok(());
        }
        let tc = |args: &[&str]| {
            let mut full = vec!["-n", ns.as_str()];
            full.extend_from_slice(args);
            run("tc", &full)
        };
        tc(&[
            "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "1",
        ])?;
        tc(&[
            "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:1", "htb", "rate",
            "10gbit", "quantum", "60000",
        ])?;
        for (to, kbit) in links {
            let class = format!("1:{}", to + 10);
            let rate = format!("{kbit}kbit");
            tc(&[
                "class", "add", "dev", "eth0", "parent", "1:", "classid", &class, "htb", "rate",
                &rate, "ceil", &rate, "burst", "2k", "quantum", "1514",
            ])?;
            let handle = format!("{}:", to + 10);
            tc(&[
                "qdisc", "add", "dev", "eth0", "parent", &class, "handle", &handle, "pfifo",
                "limit", "20",
            ])?;
            let dst = format!("{}/32", self.ip(to));
            tc(&[
                "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "u32", "match",
                "ip", "dst", &dst, "flowid", &class,
            ])?;
        }
        Ok(())
    }

    /// Slow links now, as (from, to, kbit/s).
    pub fn slow_links(&self) -> Vec<(u64, u64, u32)> {
        self.slow.iter().map(|((f, t), k)| (*f, *t, *k)).collect()
    }

    /// Undo every cut and slow link.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        for (from, to) in self.cuts() {
            self.uncut(from, to)?;
        }
        let froms: BTreeSet<u64> = self.slow.keys().map(|(f, _)| *f).collect();
        self.slow.clear();
        for f in froms {
            self.apply_qdisc(f)?;
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.nodes.values() {
            let _ = run("ip", &["netns", "del", ns]);
        }
        // Deleting the hub destroys the host end of its veth pair too.
        let _ = run("ip", &["netns", "del", &self.hub]);
        let _ = run("ip", &["link", "del", &self.host_if]);
    }
}

/// `10.A.B` for this process's `n`th network: A and B from the pid and `n`, skipping a
/// subnet the host already has an address in.
fn pick_subnet(pid: u32, n: u32) -> anyhow::Result<String> {
    let used = output("ip", &["-4", "-o", "addr", "show"]).unwrap_or_default();
    for step in 0..200u32 {
        let a = 100 + (pid + step) % 100;
        let b = (n * 7 + pid / 100 + step) % 250;
        let prefix = format!("10.{a}.{b}");
        if !used.contains(&format!(" {prefix}.")) {
            return Ok(prefix);
        }
    }
    bail!("no free 10.x.y.0/24 subnet")
}

/// Delete namespaces `drpc-<pid>-…` of processes that no longer exist (a test process that
/// was killed never ran its drops) once nothing runs in them any more.
fn clean_stale() {
    let Ok(list) = output("ip", &["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix("drpc-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match output("ip", &["netns", "pids", name]) {
            Ok(pids) if pids.trim().is_empty() => {
                let _ = run("ip", &["netns", "del", name]);
            }
            _ => {}
        }
    }
}
