//! `krg migrate`, `krg checkpoint`, `krg restart`, `krg images`: moving and
//! saving running jobs.

use super::block_on;
use super::output::{bytes, table};
use crate::api::client::request;
use crate::job::migrate::{CheckpointAfter, MigrateMode};
use crate::wire::client::{ClientRequest, ClientResponse};
use anyhow::{bail, Context};
use clap::Subcommand;
use krg_types::{Gpid, NodeId};

#[derive(clap::Args)]
pub struct MigrateArgs {
    /// The job, by its gpid as `krg ps` shows it.
    pub gpid: Gpid,
    /// The node to move it to.
    pub node: NodeId,
    /// stop: freeze, copy, restore; lazy: restore at once, memory follows;
    /// precopy: copy while it runs (needs soft-dirty tracking); auto: the
    /// fastest this node can do.
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: MigrateMode,
    /// Print the result as a JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn migrate(args: MigrateArgs) -> anyhow::Result<i32> {
    let req = ClientRequest::Migrate {
        gpid: args.gpid,
        node: args.node,
        mode: args.mode,
    };
    let ClientResponse::Migrated(r) = block_on(request(req))? else {
        bail!("krgd answered with something unexpected")
    };
    if args.json {
        let mut v = serde_json::to_value(&r)?;
        v["gpid"] = serde_json::Value::String(r.gpid.to_string());
        println!("{v}");
    } else {
        println!(
            "migrated {} from node {} to node {} ({}): frozen {} ms, {} moved, {} ms in all",
            r.gpid,
            r.source,
            r.target,
            serde_json::to_value(r.mode)?.as_str().unwrap_or("?"),
            r.freeze_ms,
            bytes(r.bytes),
            r.total_ms
        );
        if !r.left_behind.is_empty() {
            println!(
                "left behind, as node {} has nothing there: the mounts at {}",
                r.target,
                r.left_behind.join(", ")
            );
        }
    }
    Ok(0)
}

#[derive(clap::Args)]
pub struct CheckpointArgs {
    /// The job, by its gpid as `krg ps` shows it.
    pub gpid: Gpid,
    /// Let the job go on after the checkpoint (the default).
    #[arg(long, group = "after")]
    pub leave_running: bool,
    /// Leave the job stopped (krg kill -CONT resumes it).
    #[arg(long, group = "after")]
    pub stop: bool,
    /// End the job after the checkpoint; `krg restart` brings it back.
    #[arg(long, group = "after")]
    pub kill: bool,
    /// Print the saved image as a JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn checkpoint(args: CheckpointArgs) -> anyhow::Result<i32> {
    let after = if args.kill {
        CheckpointAfter::Kill
    } else if args.stop {
        CheckpointAfter::Stop
    } else {
        CheckpointAfter::LeaveRunning
    };
    let ClientResponse::ImageSaved(r) = block_on(request(ClientRequest::Checkpoint {
        gpid: args.gpid,
        after,
    }))?
    else {
        bail!("krgd answered with something unexpected")
    };
    if args.json {
        let mut v = serde_json::to_value(&r)?;
        v["gpid"] = serde_json::Value::String(r.gpid.to_string());
        println!("{v}");
    } else {
        println!(
            "checkpointed {} as version {} ({}) in {}",
            r.gpid,
            r.version,
            bytes(r.bytes),
            r.path
        );
    }
    Ok(0)
}

/// `2:17` or `2:17@v3`.
fn parse_target(s: &str) -> anyhow::Result<(Gpid, Option<u32>)> {
    match s.split_once('@') {
        Some((g, v)) => {
            let v = v.trim_start_matches('v');
            Ok((
                g.parse()?,
                Some(
                    v.parse()
                        .with_context(|| format!("'{v}' is not an image version"))?,
                ),
            ))
        }
        None => Ok((s.parse()?, None)),
    }
}

#[derive(clap::Args)]
pub struct RestartArgs {
    /// GPID or GPID@vN (default: the latest version).
    pub image: String,
    /// Restart it on this node (default: the scheduler's choice).
    #[arg(long, short = 'n')]
    pub node: Option<NodeId>,
}

pub fn restart(args: RestartArgs) -> anyhow::Result<i32> {
    let (gpid, version) = parse_target(&args.image)?;
    let req = ClientRequest::Restart {
        gpid,
        version,
        node: args.node,
    };
    let ClientResponse::Restarted {
        gpid,
        version,
        node,
    } = block_on(request(req))?
    else {
        bail!("krgd answered with something unexpected")
    };
    println!("restarted {gpid} from version {version} on node {node}");
    Ok(0)
}

#[derive(clap::Args)]
pub struct ImagesArgs {
    #[command(subcommand)]
    pub command: Option<ImagesCommand>,
    /// Only this job's images.
    pub gpid: Option<Gpid>,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum ImagesCommand {
    /// Remove a job's images (all, or GPID@vN).
    Rm { image: String },
}

pub fn images(args: ImagesArgs) -> anyhow::Result<i32> {
    if let Some(ImagesCommand::Rm { image }) = args.command {
        let (gpid, version) = parse_target(&image)?;
        block_on(request(ClientRequest::ImagesRm { gpid, version }))?;
        return Ok(0);
    }
    let ClientResponse::Images(list) =
        block_on(request(ClientRequest::Images { gpid: args.gpid }))?
    else {
        bail!("krgd answered with something unexpected")
    };
    if args.json {
        let arr: Vec<serde_json::Value> = list
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["gpid"] = serde_json::Value::String(r.gpid.to_string());
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&arr)?);
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            vec![
                r.gpid.to_string(),
                format!("v{}", r.version),
                r.user.clone(),
                r.node.to_string(),
                bytes(r.bytes),
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.created_ms),
                )
                .to_string(),
                r.command.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["GPID", "VERSION", "USER", "NODE", "SIZE", "TIME", "COMMAND"],
            &rows
        )
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_parse() {
        let (g, v) = parse_target("2:17@v3").unwrap();
        assert_eq!((g.to_string(), v), ("2:17".to_string(), Some(3)));
        assert_eq!(parse_target("2:17").unwrap().1, None);
        assert!(parse_target("2:17@vx").is_err());
    }
}
