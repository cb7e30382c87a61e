//! What the benchmarks read of processes and threads in /proc.

/// Every process and kernel thread: pid and command name.
pub fn processes() -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            Some((pid, comm.trim().to_string()))
        })
        .collect()
}

/// A process's or thread's command name and user and system CPU seconds
/// so far, from its `stat` file at `path`.
pub fn stat_cpu_seconds(path: &str) -> Option<(String, f64, f64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // utime and stime: fields 14 and 15 of stat, 11 and 12 after the
    // command name.
    Some((
        stat[open + 1..close].to_string(),
        field(11) / ticks,
        field(12) / ticks,
    ))
}
