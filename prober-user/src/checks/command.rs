//! A user-defined check: an external program (keepalived's MISC_CHECK).
//! Exit status 0 means up. If the first line it prints is a number
//! (`42`, or `weight=42`), that is the real server's weight.
//!
//! A run never outlives its timeout: the program gets its own process
//! group, and the whole group is killed and reaped when time is up, so a
//! hung check cannot pile up processes; the next run only starts after.

use std::{process::Stdio, time::Duration};

use tokio::{io::AsyncReadExt, process::Command};

use super::CheckSpec;

/// Largest weight IPVS takes.
const MAX_WEIGHT: u32 = 65535;

pub async fn run(
    argv: &[String],
    spec: &CheckSpec,
    timeout: Duration,
) -> Result<Option<u32>, String> {
    let args: Vec<String> = argv
        .iter()
        .map(|a| {
            a.replace("{address}", &spec.address.to_string())
                .replace("{port}", &spec.port.to_string())
        })
        .collect();
    let mut child = Command::new(&args[0])
        .args(&args[1..])
        .env("PROBER_ADDRESS", spec.address.to_string())
        .env("PROBER_PORT", spec.port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", args[0]))?;
    let group = child.id().map(|pid| pid as i32);
    // Dropped first (declared after `child`): kills the whole group
    // however this run ends: leftover children of a finished check, or all
    // of it when the check is stopped mid-run (its leader not yet reaped).
    let _group = group.map(GroupGuard);
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    // Slightly inside the check's own timeout, so the group is killed
    // here and not merely abandoned.
    let deadline = timeout.saturating_sub(timeout / 10);
    let mut out = Vec::new();
    let mut err = Vec::new();
    let finished = tokio::time::timeout(deadline, async {
        let mut stdout = (&mut stdout).take(4096);
        let mut stderr = (&mut stderr).take(4096);
        let (status, _, _) = tokio::join!(
            child.wait(),
            stdout.read_to_end(&mut out),
            stderr.read_to_end(&mut err),
        );
        status
    })
    .await;
    let status = match finished {
        Ok(status) => status.map_err(|e| format!("waiting for {}: {e}", args[0]))?,
        Err(_) => {
            if let Some(group) = group {
                kill_group(group);
            }
            let _ = child.wait().await;
            return Err(format!(
                "{} still running after {deadline:?}: killed",
                args[0]
            ));
        }
    };
    if !status.success() {
        let why = String::from_utf8_lossy(&err);
        let why = why.lines().next().unwrap_or("").trim();
        return Err(match status.code() {
            Some(code) if why.is_empty() => format!("{} exited with {code}", args[0]),
            Some(code) => format!("{} exited with {code}: {why}", args[0]),
            None => format!("{} killed by a signal", args[0]),
        });
    }
    Ok(weight(&String::from_utf8_lossy(&out)))
}

/// Kills a check's process group on drop: no child of a check outlives it.
struct GroupGuard(i32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.0);
    }
}

fn kill_group(group: i32) {
    // SAFETY: signals the check's own process group (ESRCH once empty).
    unsafe { libc::kill(-group, libc::SIGKILL) };
}

/// The weight in a check's output, if its first line gives one.
fn weight(output: &str) -> Option<u32> {
    let line = output.lines().next()?.trim();
    let number = line.strip_prefix("weight=").unwrap_or(line).trim();
    number.parse::<u32>().ok().map(|w| w.min(MAX_WEIGHT))
}

#[cfg(test)]
mod tests {
    use super::weight;

    #[test]
    fn first_line_may_give_the_weight() {
        assert_eq!(weight("42\n"), Some(42));
        assert_eq!(weight("weight=7\nmore"), Some(7));
        assert_eq!(weight("ok\n42"), None);
        assert_eq!(weight(""), None);
        assert_eq!(weight("99999999"), Some(65535));
    }
}
