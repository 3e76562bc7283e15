//! The cluster as one machine's /proc files, computed from every up node's
//! own files (pure functions: text in, text out).
//!
//! As under Kerrighed: `cpuinfo` lists every CPU of every node, renumbered;
//! `meminfo` sums memory; `loadavg` sums load; `stat` sums counters and
//! lists every CPU; `cpu/online` spans all CPUs.

/// One node's files, as read from its /proc.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcTexts {
    pub cpuinfo: String,
    pub meminfo: String,
    pub stat: String,
    pub uptime: String,
    pub loadavg: String,
}

/// Bytes accepted for one file from a peer.
pub const PROC_TEXT_BYTES_MAX: usize = 1 << 20;

impl ProcTexts {
    pub fn read_local() -> ProcTexts {
        let read = |p: &str| {
            let mut t = std::fs::read_to_string(p).unwrap_or_default();
            t.truncate(PROC_TEXT_BYTES_MAX);
            t
        };
        ProcTexts {
            cpuinfo: read("/proc/cpuinfo"),
            meminfo: read("/proc/meminfo"),
            stat: read("/proc/stat"),
            uptime: read("/proc/uptime"),
            loadavg: read("/proc/loadavg"),
        }
    }

    pub fn fits(&self) -> bool {
        [
            &self.cpuinfo,
            &self.meminfo,
            &self.stat,
            &self.uptime,
            &self.loadavg,
        ]
        .iter()
        .all(|t| t.len() <= PROC_TEXT_BYTES_MAX)
    }

    /// CPUs this node lists.
    pub fn cpu_count(&self) -> usize {
        self.cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count()
    }
}

/// Every processor block of every node, numbered 0.. across the cluster;
/// physical ids are shifted per node so sockets stay distinct. The texts
/// come from other nodes: every sum saturates rather than overflow.
pub fn cpuinfo(nodes: &[&ProcTexts]) -> String {
    let mut out = String::new();
    let mut next_cpu = 0;
    let mut socket_base: usize = 0;
    for n in nodes {
        let mut max_socket: usize = 0;
        for block in n.cpuinfo.split("\n\n").filter(|b| !b.trim().is_empty()) {
            for line in block.lines() {
                let (key, value) = line.split_once(':').unwrap_or((line, ""));
                match key.trim() {
                    "processor" => {
                        out.push_str(&format!("{key}: {next_cpu}\n"));
                        next_cpu += 1;
                    }
                    "physical id" => {
                        let id: usize = value.trim().parse().unwrap_or(0);
                        max_socket = max_socket.max(id.saturating_add(1));
                        out.push_str(&format!("{key}: {}\n", socket_base.saturating_add(id)));
                    }
                    _ => {
                        out.push_str(line);
                        out.push('\n');
                    }
                }
            }
            out.push('\n');
        }
        socket_base = socket_base.saturating_add(max_socket.max(1));
    }
    out
}

/// `MemTotal: 123 kB` lines summed over the nodes, in the first node's order.
pub fn meminfo(nodes: &[&ProcTexts]) -> String {
    let Some(first) = nodes.first() else {
        return String::new();
    };
    let mut out = String::new();
    for line in first.meminfo.lines() {
        let Some((key, _)) = line.split_once(':') else {
            continue;
        };
        let sum: u64 = nodes
            .iter()
            .filter_map(|n| {
                n.meminfo
                    .lines()
                    .find(|l| l.split_once(':').is_some_and(|(k, _)| k == key))
                    .and_then(|l| l.split_once(':'))
                    .and_then(|(_, v)| v.split_whitespace().next())
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .fold(0, u64::saturating_add);
        let unit = if line.trim_end().ends_with("kB") {
            " kB"
        } else {
            ""
        };
        out.push_str(&format!("{:<16}{:>8}{unit}\n", format!("{key}:"), sum));
    }
    out
}

/// Load averages and task counts summed; the last pid is the first node's.
pub fn loadavg(nodes: &[&ProcTexts]) -> String {
    let mut l = [0.0f64; 3];
    let (mut running, mut total) = (0u64, 0u64);
    let mut last_pid = "0".to_string();
    for (i, n) in nodes.iter().enumerate() {
        let f: Vec<&str> = n.loadavg.split_whitespace().collect();
        for (k, slot) in l.iter_mut().enumerate() {
            *slot += f.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        }
        if let Some((r, t)) = f.get(3).and_then(|v| v.split_once('/')) {
            running = running.saturating_add(r.parse::<u64>().unwrap_or(0));
            total = total.saturating_add(t.parse::<u64>().unwrap_or(0));
        }
        if i == 0 {
            last_pid = f.get(4).unwrap_or(&"0").to_string();
        }
    }
    format!(
        "{:.2} {:.2} {:.2} {running}/{total} {last_pid}\n",
        l[0], l[1], l[2]
    )
}

fn numbers(rest: &str) -> Vec<u64> {
    rest.split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect()
}

fn add_into(acc: &mut Vec<u64>, v: &[u64]) {
    if acc.len() < v.len() {
        acc.resize(v.len(), 0);
    }
    for (a, b) in acc.iter_mut().zip(v) {
        *a = a.saturating_add(*b);
    }
}

fn join(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
}

/// `cpu` summed, `cpuN` for every CPU of every node renumbered, counters
/// summed, `btime` the earliest.
pub fn stat(nodes: &[&ProcTexts]) -> String {
    let mut cpu_total = Vec::new();
    let mut cpus: Vec<Vec<u64>> = Vec::new();
    let mut summed: Vec<(String, Vec<u64>)> = Vec::new();
    let mut btime: Option<u64> = None;
    for n in nodes {
        for line in n.stat.lines() {
            let (key, rest) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "cpu" => add_into(&mut cpu_total, &numbers(rest)),
                k if k.starts_with("cpu") => cpus.push(numbers(rest)),
                "btime" => {
                    let b = numbers(rest).first().copied().unwrap_or(0);
                    btime = Some(btime.map_or(b, |x| x.min(b)));
                }
                k => match summed.iter_mut().find(|(name, _)| name == k) {
                    Some((_, acc)) => add_into(acc, &numbers(rest)),
                    None => summed.push((k.to_string(), numbers(rest))),
                },
            }
        }
    }
    let mut out = format!("cpu  {}\n", join(&cpu_total));
    for (i, c) in cpus.iter().enumerate() {
        out.push_str(&format!("cpu{i} {}\n", join(c)));
    }
    for (k, v) in &summed {
        if k == "ctxt" {
            if let Some(b) = btime {
                out.push_str(&format!("{k} {}\nbtime {b}\n", join(v)));
                continue;
            }
        }
        out.push_str(&format!("{k} {}\n", join(v)));
    }
    out
}

/// The longest uptime; idle time summed over the nodes.
pub fn uptime(nodes: &[&ProcTexts]) -> String {
    let (mut up, mut idle) = (0.0f64, 0.0f64);
    for n in nodes {
        let f: Vec<f64> = n
            .uptime
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        up = up.max(f.first().copied().unwrap_or(0.0));
        idle += f.get(1).copied().unwrap_or(0.0);
    }
    format!("{up:.2} {idle:.2}\n")
}

/// `/sys/devices/system/cpu/online` for `count` CPUs.
pub fn online(count: usize) -> String {
    match count {
        0 | 1 => "0\n".to_string(),
        n => format!("0-{}\n", n - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(cpus: usize, mem_kb: u64, load: &str) -> ProcTexts {
        let mut cpuinfo = String::new();
        for i in 0..cpus {
            cpuinfo.push_str(&format!(
                "processor\t: {i}\nmodel name\t: Test CPU\nphysical id\t: 0\n\n"
            ));
        }
        let mut stat = "cpu  10 0 10 100 0 0 0 0 0 0\n".to_string();
        for i in 0..cpus {
            stat.push_str(&format!("cpu{i} 5 0 5 50 0 0 0 0 0 0\n"));
        }
        stat.push_str("intr 100 1 2\nctxt 1000\nbtime 1700000000\nprocesses 50\nprocs_running 1\n");
        ProcTexts {
            cpuinfo,
            meminfo: format!(
                "MemTotal:       {mem_kb} kB\nMemFree:        {} kB\nHugePages_Total:       0\n",
                mem_kb / 2
            ),
            stat,
            uptime: "100.00 150.00\n".into(),
            loadavg: format!("{load} 1/100 4242\n"),
        }
    }

    #[test]
    fn numbers_too_large_from_a_peer_saturate() {
        let mut a = node(1, u64::MAX, "1.00 0.50 0.25");
        a.cpuinfo = format!("processor\t: 0\nphysical id\t: {}\n\n", usize::MAX);
        a.loadavg = format!("1.00 0.50 0.25 {0}/{0} 1\n", u64::MAX);
        a.stat = format!("cpu  {} 0 0 0\n", u64::MAX);
        let b = node(1, 10, "1.00 0.50 0.25");
        let nodes = [&a, &b];
        assert!(cpuinfo(&nodes).contains(&format!("physical id\t: {}\n", usize::MAX)));
        assert!(meminfo(&nodes).contains(&format!("MemTotal:       {} kB", u64::MAX)));
        assert!(loadavg(&nodes).contains(&format!(" {0}/{0} ", u64::MAX)));
        assert!(stat(&nodes).starts_with(&format!("cpu  {} ", u64::MAX)));
    }

    #[test]
    fn three_nodes_look_like_one_machine() {
        let (a, b, c) = (
            node(2, 1000, "1.00 0.50 0.25"),
            node(4, 2000, "2.00 1.00 0.50"),
            node(2, 1000, "0.00 0.00 0.00"),
        );
        let nodes = [&a, &b, &c];
        let ci = cpuinfo(&nodes);
        assert_eq!(ci.matches("processor").count(), 8);
        assert!(ci.contains("processor\t: 7\n"));
        assert!(ci.contains("physical id\t: 2\n"));
        let mi = meminfo(&nodes);
        assert!(mi.contains("MemTotal:           4000 kB"), "{mi}");
        assert!(mi.contains("MemFree:            2000 kB"));
        assert!(mi.contains("HugePages_Total:       0\n"));
        assert_eq!(loadavg(&nodes), "3.00 1.50 0.75 3/300 4242\n");
        let st = stat(&nodes);
        assert!(st.starts_with("cpu  30 0 30 300 0 0 0 0 0 0\n"));
        assert!(st.contains("cpu7 5 0 5 50"));
        assert!(st.contains("ctxt 3000\nbtime 1700000000\n"));
        assert!(st.contains("intr 300 3 6\n"));
        assert_eq!(uptime(&nodes), "100.00 450.00\n");
        assert_eq!(online(8), "0-7\n");
        assert_eq!(online(1), "0\n");
    }

    #[test]
    fn this_machine_renders_like_itself() {
        let me = ProcTexts::read_local();
        let one = [&me];
        assert_eq!(cpuinfo(&one).matches("processor").count(), me.cpu_count());
        assert!(meminfo(&one).starts_with("MemTotal:"));
    }
}
