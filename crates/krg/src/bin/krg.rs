//! krg: the command-line tool.

fn main() {
    // Like other command-line tools, end quietly when the reader of our
    // output goes away (`krg nodes | head`).
    // SAFETY: called first thing in main, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Installed as `krg-rsh`, we are `krg rsh`.
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let invoked_as = argv.first().and_then(|a| {
        std::path::Path::new(a)
            .file_name()
            .map(|f| f.to_os_string())
    });
    if invoked_as.as_deref() == Some(std::ffi::OsStr::new("krg-rsh")) {
        argv[0] = "krg".into();
        argv.insert(1, "rsh".into());
    }
    let cli = krg::cli::Cli::parse_argv(argv);
    match krg::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("krg: {e:#}");
            std::process::exit(1);
        }
    }
}
