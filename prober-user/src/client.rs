//! The commands that talk to a running daemon: `status`, `reload` and
//! `stats`.

use std::{path::Path, time::Duration};

use anyhow::Result;
use prober_user::{control, stats};

pub fn print_status(socket: &Path, json: bool, watch: Option<Duration>) -> Result<()> {
    loop {
        let status = match control::request(socket, control::Request::Status)? {
            control::Response::Status(status) => status,
            control::Response::Error(e) => anyhow::bail!("{e}"),
            other => anyhow::bail!("unexpected answer: {other:?}"),
        };
        let text = if json {
            serde_json::to_string_pretty(&status)?
        } else {
            prober_user::status::table(&status)
        };
        match watch {
            None => {
                println!("{text}");
                return Ok(());
            }
            Some(every) => {
                // Home and clear, then the new table: refreshed in place.
                println!("\x1b[H\x1b[2J{text}");
                std::thread::sleep(every);
            }
        }
    }
}

pub fn reload_daemon(socket: &Path) -> Result<()> {
    match control::request(socket, control::Request::Reload)? {
        control::Response::Reload { ok: true, message } => {
            println!("{message}");
            Ok(())
        }
        control::Response::Reload { ok: false, message } => {
            anyhow::bail!("reload refused, the running configuration stays: {message}")
        }
        control::Response::Error(e) => anyhow::bail!("{e}"),
        other => anyhow::bail!("unexpected answer: {other:?}"),
    }
}

pub fn print_stats(pin_dir: &Path, json: bool) -> Result<()> {
    let all = stats::read(pin_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    let stats = &all.counters;
    println!(
        "ingress: {} frames, {} bytes; replies matched {}, late {}, rejected {}; resets sent {} (and {} for unanswered SYNs); probes built {}, errors {}; wheel entries not due {}, held inside their last probe's timeout {}; events lost {}; timeouts excused (lost in the director's ring) {}; ARP replies {}",
        stats.packets,
        stats.bytes,
        stats.replies_matched,
        stats.replies_late,
        stats.replies_rejected,
        stats.resets_sent,
        stats.resets_before_probe,
        stats.probes_built,
        stats.probe_errors,
        stats.entries_not_due,
        stats.sends_held_for_timeout,
        stats.events_lost,
        stats.timeouts_excused,
        stats.arp_replies
    );
    let refused = stats.agent_unauthenticated + stats.agent_replayed;
    if stats.agent_reports + stats.agent_malformed + stats.agent_unknown + refused > 0 {
        println!(
            "agent datagrams: {} recorded, {} malformed, {} from outside the pool, {} with a wrong tag, {} replayed",
            stats.agent_reports,
            stats.agent_malformed,
            stats.agent_unknown,
            stats.agent_unauthenticated,
            stats.agent_replayed
        );
    }
    if !all.targets.is_empty() {
        println!(
            "{:>5}  {:<40} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10}",
            "id", "probe", "sent", "answered", "refused", "unreach", "timeout", "last rtt"
        );
        for t in &all.targets {
            let rtt = if t.paused {
                // A host's L3 probe, sent only while its checks fail.
                "paused".to_string()
            } else if t.last_rtt_ns == 0 {
                "-".to_string()
            } else {
                format!("{:.3} ms", t.last_rtt_ns as f64 / 1e6)
            };
            println!(
                "{:>5}  {:<40} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10}",
                t.id, t.probe, t.sent, t.answered, t.refused, t.unreachable, t.timed_out, rtt
            );
        }
    }
    Ok(())
}
