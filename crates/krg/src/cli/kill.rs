//! `krg kill [-SIG] GPID...`: signal jobs wherever they run.

use super::block_on;
use crate::api::client::request;
use crate::wire::client::{ClientRequest, ClientResponse};
use anyhow::{bail, Context};
use krg_types::Gpid;

#[derive(clap::Args)]
pub struct KillArgs {
    /// The signal, by name or number (default TERM); `-9` or `-KILL` before
    /// the gpids works too, as with kill(1).
    #[arg(short = 's', long = "signal", value_name = "SIG")]
    pub signal: Option<String>,
    /// `[-SIG] GPID...`
    #[arg(allow_hyphen_values = true, required = true, value_name = "GPID")]
    pub args: Vec<String>,
}

/// `9`, `KILL`, `SIGKILL`, `kill` -> 9.
pub fn parse_signal(text: &str) -> anyhow::Result<i32> {
    let t = text.trim_start_matches('-');
    if let Ok(n) = t.parse::<i32>() {
        if (0..=64).contains(&n) {
            return Ok(n);
        }
        bail!("{n} is not a signal number (0 to 64)");
    }
    let upper = t.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|s| s as i32)
        .map_err(|_| {
            anyhow::anyhow!(
                "unknown signal '{text}' (try TERM, KILL, INT, HUP, STOP, CONT or a number)"
            )
        })
}

pub fn run(args: KillArgs) -> anyhow::Result<i32> {
    let mut words = args.args.as_slice();
    let mut signal = match &args.signal {
        Some(s) => parse_signal(s)?,
        None => libc::SIGTERM,
    };
    if args.signal.is_none() {
        if let Some(first) = words.first().filter(|w| w.starts_with('-')) {
            signal = parse_signal(first)?;
            words = &words[1..];
        }
    }
    if words.is_empty() {
        bail!("no job given: krg kill [-SIG] GPID...");
    }
    let gpids = words
        .iter()
        .map(|w| {
            w.parse::<Gpid>()
                .with_context(|| format!("cannot signal '{w}'"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ClientResponse::Signaled(results) =
        block_on(request(ClientRequest::Signal { gpids, signal }))?
    else {
        bail!("krgd answered with something unexpected")
    };
    let mut code = 0;
    for (gpid, r) in results {
        if let Err(e) = r {
            eprintln!("krg: kill {gpid}: {}", e.message);
            code = 1;
        }
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_as_kill_does() {
        assert_eq!(parse_signal("-9").unwrap(), 9);
        assert_eq!(parse_signal("KILL").unwrap(), 9);
        assert_eq!(parse_signal("-SIGTERM").unwrap(), 15);
        assert_eq!(parse_signal("int").unwrap(), 2);
        assert!(parse_signal("-BOGUS").is_err());
        assert!(parse_signal("99").is_err());
    }
}
