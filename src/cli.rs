//! The `fairlead` command line: one binary, one subcommand per role.
//! Errors print as one line and exit non-zero (`main.rs`).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::api::service::ServiceCidr;
use crate::apiserver;

#[derive(Parser, Debug)]
#[command(
    name = "fairlead",
    version,
    about = "Kubernetes Service proxy + cluster DNS, with the minimal control plane that feeds them"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Everything on one node: embedded store + API server (+ controllers
    /// and node daemon as they land). Prints the kubeconfig path.
    Up(ApiServerArgs),
    /// The Kubernetes-compatible API server alone.
    Apiserver(ApiServerArgs),
}

fn default_data_dir() -> PathBuf {
    // Root gets the system location (like k3s's /var/lib/rancher/k3s);
    // anyone else a directory in their home.
    if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/var/lib/fairlead")
    } else {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."))
            .join(".fairlead")
    }
}

#[derive(Args, Debug, Clone)]
pub struct ApiServerArgs {
    /// Directory for the PKI, the kubeconfig and the embedded store.
    #[arg(long, env = "FAIRLEAD_DATA_DIR", default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,
    /// Address the API server listens on.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind_address: IpAddr,
    /// HTTPS port of the API server (0 = any free port).
    #[arg(long, default_value_t = 6443)]
    pub secure_port: u16,
    /// CIDR that Service ClusterIPs are allocated from.
    #[arg(long, default_value = "10.96.0.0/12")]
    pub service_cluster_ip_range: ServiceCidr,
    /// etcd endpoints (comma-separated); empty = the embedded store.
    #[arg(long, value_delimiter = ',')]
    pub etcd_servers: Vec<String>,
    /// Static bearer tokens, CSV: token,user,uid,"group1,group2".
    #[arg(long)]
    pub token_auth_file: Option<PathBuf>,
    /// Seconds between store compactions.
    #[arg(long, default_value_t = 300)]
    pub compaction_interval_seconds: u64,
}

impl ApiServerArgs {
    pub fn config(&self) -> apiserver::Config {
        apiserver::Config {
            data_dir: self.data_dir.clone(),
            bind_address: self.bind_address,
            secure_port: self.secure_port,
            service_cidr: self.service_cluster_ip_range,
            etcd_servers: self.etcd_servers.clone(),
            token_auth_file: self.token_auth_file.clone(),
            compaction_interval: Duration::from_secs(self.compaction_interval_seconds.max(1)),
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Run a parsed command line to completion.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(args) => {
            let running = apiserver::start(args.config()).await?;
            println!("fairlead is up");
            println!("  kubeconfig: {}", running.kubeconfig.display());
            println!("  API server: https://{}", running.addr);
            println!(
                "  metrics:    https://{}/metrics (API server)",
                running.addr
            );
            println!(
                "  try:        kubectl --kubeconfig {} get svc -A",
                running.kubeconfig.display()
            );
            shutdown_signal().await;
            running.shutdown();
            Ok(())
        }
        Command::Apiserver(args) => {
            let running = apiserver::start(args.config()).await?;
            println!("kubeconfig: {}", running.kubeconfig.display());
            shutdown_signal().await;
            running.shutdown();
            Ok(())
        }
    }
}
