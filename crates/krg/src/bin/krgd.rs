//! krgd: the krg node daemon.

use clap::Parser;
use krg::node::config::NodeConfig;

#[derive(Parser)]
#[command(
    name = "krgd",
    version,
    about = "The krg node daemon: one per machine of the cluster"
)]
struct Args {
    #[command(flatten)]
    config: NodeConfig,
}

fn main() {
    let args = Args::parse();
    // Colours only for a person watching; a log file gets plain text.
    // SAFETY: isatty only inspects the descriptor.
    let terminal = unsafe { libc::isatty(2) } == 1 && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(terminal)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KRG_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("krgd: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(krg::daemon::run(args.config)) {
        eprintln!("krgd: {e:#}");
        std::process::exit(1);
    }
}
