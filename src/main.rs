//! The `fairlead` binary: parse flags, set up logging, run the subcommand.
//! See the crate docs (`src/lib.rs`) for the map of the code.

use clap::Parser;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = fairlead::cli::Cli::parse();
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
