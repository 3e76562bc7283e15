//! krg: the command-line tool.

use clap::Parser;

fn main() {
    // Like other command-line tools, end quietly when the reader of our
    // output goes away (`krg nodes | head`).
    // SAFETY: called first thing in main, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = krg::cli::Cli::parse();
    match krg::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("krg: {e:#}");
            std::process::exit(1);
        }
    }
}
