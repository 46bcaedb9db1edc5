//! The `fairlead` binary: parse flags, set up logging, run the subcommand.
//! See the crate docs (`src/lib.rs`) for the map of the code.

use clap::Parser;

fn main() {
    let cli = fairlead::cli::Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        fairlead::cli::LogFormat::Text => logs
            // Colours only on a terminal (not in log files, e.g. a pod's).
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        fairlead::cli::LogFormat::Json => logs.json().init(),
    }
    raise_open_files_limit();
    limit_malloc_arenas();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(fairlead::cli::run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Raise the open-files limit as far as allowed (what Go programs such as
/// kube-proxy get from their runtime): the userspace proxy holds a socket
/// per frontend (30,000 Services need 30,000) plus two per connection, and
/// the API server one per client. As root, up to the kernel's `fs.nr_open`
/// (at most 1,048,576); otherwise the soft limit up to the hard one.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
            .unwrap_or(lim.rlim_max)
            .min(1 << 20);
        let want = libc::rlimit {
            rlim_cur: nr_open.max(lim.rlim_cur),
            rlim_max: nr_open.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
            let soft = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        }
    }
}

/// Cap glibc's malloc arenas at the number of CPUs (its default is 8 per
/// CPU): each arena keeps its own free memory, so with many of them a
/// long-running daemon holds far more than it uses.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        // SAFETY: mallopt only changes allocator tuning, before threads start.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, cpus.max(2) as libc::c_int);
        }
    }
}
