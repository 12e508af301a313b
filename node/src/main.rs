//! `drplane`: the control-plane server, the operator's CLI, a local dev cluster and the
//! write-path benchmark, in one binary.

mod agent_cmd;
mod agent_service;
mod bench;
mod bench_scale;
mod bench_sdrs;
mod cli;
mod control;
mod dev;
mod dev_identity;
mod identity_cli;
mod scheduler;
mod server;
mod tls;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc malloc: the write path allocates many small, short-lived
/// buffers across threads (HTTP bodies, batches, RocksDB keys), where glibc's arenas
/// showed up as the top symbols in profiles of the leader under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "drplane",
    version,
    about = "A highly available control plane for disaster recovery"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a control-plane node.
    Server(server::ServerArgs),
    /// Manage cluster membership through any member's HTTP API.
    Cluster(cli::ClusterArgs),
    /// Manage sites through any member's HTTP API.
    Sites(cli::SitesArgs),
    /// Log in; manage projects, users, roles, AK/SK pairs, API keys and tokens.
    Identity(identity_cli::IdentityArgs),
    /// Run a local three-node cluster in ./.drplane-dev until Ctrl-C.
    Dev(dev::DevArgs),
    /// Drive the HTTP write path of a cluster and print throughput and latency.
    Bench(bench::BenchArgs),
    /// Run a host's agent: register it, follow the leader, run its tasks.
    Agent(agent_cmd::AgentArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Server(args) => server::run(args).await,
            Command::Cluster(args) => cli::run_cluster(args).await,
            Command::Sites(args) => cli::run_sites(args).await,
            Command::Identity(args) => identity_cli::run(args).await,
            Command::Dev(args) => dev::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Agent(args) => agent_cmd::run(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
