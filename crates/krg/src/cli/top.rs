//! `krg top`: the whole cluster live — nodes with load, capacity, memory
//! and state; jobs with their node, CPU and memory; recent migrations.
//! `--once` prints one snapshot as text, for scripts.

use super::block_on;
use super::output::{bytes, table};
use crate::api::client::request;
use crate::events::Event;
use crate::job::JobInfo;
use crate::node::now_ms;
use crate::wire::client::{ClientRequest, ClientResponse, NodeView};
use anyhow::bail;
use ratatui::crossterm::event::{self, Event as TermEvent, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const REFRESH: Duration = Duration::from_secs(1);
/// Migrations shown at the bottom.
const MIGRATIONS_SHOWN: usize = 8;

#[derive(clap::Args)]
pub struct TopArgs {
    /// Print one snapshot as text and exit.
    #[arg(long)]
    pub once: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SortKey {
    Cpu,
    Rss,
    Gpid,
    Node,
}

impl SortKey {
    fn next(self) -> SortKey {
        match self {
            SortKey::Cpu => SortKey::Rss,
            SortKey::Rss => SortKey::Gpid,
            SortKey::Gpid => SortKey::Node,
            SortKey::Node => SortKey::Cpu,
        }
    }

    fn name(self) -> &'static str {
        match self {
            SortKey::Cpu => "cpu",
            SortKey::Rss => "rss",
            SortKey::Gpid => "gpid",
            SortKey::Node => "node",
        }
    }
}

struct Snapshot {
    nodes: Vec<NodeView>,
    jobs: Vec<JobInfo>,
    migrations: Vec<Event>,
    /// CPU use of each job since the previous snapshot, in CPUs.
    cpu: HashMap<krg_types::Gpid, f64>,
}

fn fetch(prev: Option<(&Snapshot, Instant)>) -> anyhow::Result<Snapshot> {
    let ClientResponse::Nodes(nodes) = block_on(request(ClientRequest::Nodes))? else {
        bail!("krgd answered with something unexpected")
    };
    let ClientResponse::Jobs(jobs) = block_on(request(ClientRequest::Ps))? else {
        bail!("krgd answered with something unexpected")
    };
    let since = now_ms().saturating_sub(3_600_000);
    let ClientResponse::Events(ev) = block_on(request(ClientRequest::Events { since_ms: since }))?
    else {
        bail!("krgd answered with something unexpected")
    };
    let mut migrations: Vec<Event> = ev.into_iter().filter(|e| e.kind == "migration").collect();
    migrations.reverse();
    migrations.truncate(MIGRATIONS_SHOWN);
    let cpu = jobs
        .iter()
        .map(|j| {
            let avg = match prev {
                Some((p, at)) => p.jobs.iter().find(|q| q.gpid == j.gpid).map(|q| {
                    j.cpu_ns.saturating_sub(q.cpu_ns) as f64
                        / 1e9
                        / at.elapsed().as_secs_f64().max(0.1)
                }),
                None => None,
            };
            let lifetime = j.cpu_ns as f64
                / 1e9
                / (now_ms().saturating_sub(j.started_ms) as f64 / 1000.0).max(0.1);
            (j.gpid, avg.unwrap_or(lifetime))
        })
        .collect();
    Ok(Snapshot {
        nodes,
        jobs,
        migrations,
        cpu,
    })
}

fn node_row(n: &NodeView) -> Vec<String> {
    let l = n.load.clone().unwrap_or_default();
    vec![
        n.id.to_string(),
        if l.hostname.is_empty() {
            n.hostname.clone()
        } else {
            l.hostname
        },
        n.state.to_string(),
        format!("{:.2}", l.capacity),
        format!("{:.2}", l.load_short),
        format!("{:.2}", l.load1),
        l.jobs.to_string(),
        bytes(l.mem_total),
        bytes(l.mem_free),
        if l.jobs == 0 {
            "idle".into()
        } else {
            String::new()
        },
    ]
}

const NODE_HEADER: [&str; 10] = [
    "ID", "HOST", "STATE", "CAP", "LOAD", "LOAD1", "JOBS", "MEM", "FREE", "",
];
const JOB_HEADER: [&str; 7] = ["GPID", "USER", "NODE", "STATE", "CPU%", "RSS", "COMMAND"];

fn job_rows(s: &Snapshot, key: SortKey) -> Vec<Vec<String>> {
    let mut jobs: Vec<&JobInfo> = s.jobs.iter().collect();
    let cpu = |j: &JobInfo| s.cpu.get(&j.gpid).copied().unwrap_or(0.0);
    match key {
        SortKey::Cpu => jobs.sort_by(|a, b| {
            cpu(b)
                .partial_cmp(&cpu(a))
                .unwrap_or(std::cmp::Ordering::Equal)
        }),
        SortKey::Rss => jobs.sort_by_key(|j| std::cmp::Reverse(j.rss_bytes)),
        SortKey::Gpid => jobs.sort_by_key(|j| j.gpid),
        SortKey::Node => jobs.sort_by_key(|j| (j.node, j.gpid)),
    }
    jobs.iter()
        .map(|j| {
            vec![
                j.gpid.to_string(),
                j.user.clone(),
                j.node.map_or_else(|| "-".into(), |n| n.to_string()),
                j.state.as_str().to_string(),
                format!("{:.0}", cpu(j) * 100.0),
                bytes(j.rss_bytes),
                j.command.clone(),
            ]
        })
        .collect()
}

fn print_once() -> anyhow::Result<i32> {
    let s = fetch(None)?;
    println!("NODES");
    let rows: Vec<Vec<String>> = s.nodes.iter().map(node_row).collect();
    print!("{}", table(&NODE_HEADER, &rows));
    println!("\nJOBS");
    print!("{}", table(&JOB_HEADER, &job_rows(&s, SortKey::Cpu)));
    println!("\nRECENT MIGRATIONS");
    for e in &s.migrations {
        println!("{}", e.message);
    }
    Ok(0)
}

pub fn run(args: TopArgs) -> anyhow::Result<i32> {
    if args.once {
        return print_once();
    }
    let mut terminal = ratatui::init();
    let result = live(&mut terminal);
    ratatui::restore();
    result
}

fn live(terminal: &mut ratatui::DefaultTerminal) -> anyhow::Result<i32> {
    let mut key = SortKey::Cpu;
    let mut snap = fetch(None)?;
    let mut taken = Instant::now();
    loop {
        terminal.draw(|f| {
            let [head, nodes_area, jobs_area, moves_area] = Layout::vertical([
                Constraint::Length(1),
                Constraint::Length(snap.nodes.len() as u16 + 3),
                Constraint::Min(5),
                Constraint::Length(MIGRATIONS_SHOWN as u16 + 2),
            ])
            .areas(f.area());
            let up = snap
                .nodes
                .iter()
                .filter(|n| n.state == krg_types::NodeState::Up)
                .count();
            f.render_widget(
                Paragraph::new(format!(
                    "krg top — {} nodes ({up} up), {} jobs — sort: {} (s to change, q to quit)",
                    snap.nodes.len(),
                    snap.jobs.len(),
                    key.name()
                )),
                head,
            );
            let bold = Style::default().add_modifier(Modifier::BOLD);
            let rows = snap.nodes.iter().map(|n| Row::new(node_row(n)));
            let widths = [3, 12, 9, 6, 6, 6, 5, 8, 8, 5].map(Constraint::Length);
            f.render_widget(
                Table::new(rows, widths)
                    .header(Row::new(NODE_HEADER).style(bold))
                    .block(Block::default().borders(Borders::ALL).title("nodes")),
                nodes_area,
            );
            let rows = job_rows(&snap, key).into_iter().map(Row::new);
            let widths = [
                Constraint::Length(10),
                Constraint::Length(10),
                Constraint::Length(5),
                Constraint::Length(8),
                Constraint::Length(5),
                Constraint::Length(8),
                Constraint::Min(10),
            ];
            f.render_widget(
                Table::new(rows, widths)
                    .header(Row::new(JOB_HEADER).style(bold))
                    .block(Block::default().borders(Borders::ALL).title("jobs")),
                jobs_area,
            );
            let moves: Vec<String> = snap.migrations.iter().map(|e| e.message.clone()).collect();
            f.render_widget(
                Paragraph::new(moves.join("\n")).block(
                    Block::default()
                        .borders(Borders::ALL)
                        .title("recent migrations"),
                ),
                moves_area,
            );
        })?;
        let wait = REFRESH.saturating_sub(taken.elapsed());
        if event::poll(wait)? {
            if let TermEvent::Key(k) = event::read()? {
                if k.kind == KeyEventKind::Press {
                    match k.code {
                        KeyCode::Char('q') | KeyCode::Esc => return Ok(0),
                        KeyCode::Char('s') => key = key.next(),
                        _ => {}
                    }
                }
            }
            continue;
        }
        let fresh = fetch(Some((&snap, taken)))?;
        snap = fresh;
        taken = Instant::now();
    }
}
