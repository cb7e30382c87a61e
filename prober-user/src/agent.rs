//! `prober agent`: runs on a real server and reports its state and weight
//! to the director every few seconds, one 16-byte UDP datagram each time
//! (format: `prober_common::agent_wire`, also in the README).
//!
//! What it reports comes from its flags, or, when `--from-file` is given
//! and the file exists, from the file's first line: `up 80`, `drain`,
//! `down` (so a deploy script can drain a server by writing one line).

use std::{
    net::{SocketAddr, UdpSocket},
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use prober_common::agent_wire;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub state: u8,
    pub weight: u32,
}

pub fn encode(report: Report, sequence: u32) -> [u8; agent_wire::LEN] {
    let mut wire = [0u8; agent_wire::LEN];
    wire[0..4].copy_from_slice(&agent_wire::MAGIC);
    wire[4] = agent_wire::VERSION;
    wire[5] = report.state;
    wire[8..12].copy_from_slice(&report.weight.to_be_bytes());
    wire[12..16].copy_from_slice(&sequence.to_be_bytes());
    wire
}

/// "up", "up 80", "drain", "down" (the weight only matters when up).
pub fn parse_report(text: &str, default_weight: u32) -> Result<Report, String> {
    let mut words = text.split_whitespace();
    let state = match words.next() {
        Some("up") => agent_wire::STATE_UP,
        Some("down") => agent_wire::STATE_DOWN,
        Some("drain") => agent_wire::STATE_DRAIN,
        other => {
            return Err(format!(
                "'{}' is not a state (up [WEIGHT], drain or down)",
                other.unwrap_or("")
            ))
        }
    };
    let weight = match words.next() {
        Some(w) => w
            .parse::<u32>()
            .ok()
            .filter(|w| *w <= 65_535)
            .ok_or_else(|| format!("'{w}' is not a weight from 0 to 65535"))?,
        None => default_weight,
    };
    if let Some(extra) = words.next() {
        return Err(format!("unexpected '{extra}' after the weight"));
    }
    Ok(Report { state, weight })
}

pub fn run(
    director: SocketAddr,
    interval: Duration,
    fixed: Report,
    from_file: Option<&Path>,
    count: Option<u64>,
) -> Result<()> {
    if interval.is_zero() {
        bail!("--interval must be above zero");
    }
    if !director.is_ipv4() {
        bail!("--director {director}: agents report over IPv4 (the datapath records IPv4 reports only)");
    }
    let local: SocketAddr = if director.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(local).context("opening a UDP socket")?;
    let mut sequence: u32 = 0;
    let mut sent = 0u64;
    let mut last_problem = None;
    loop {
        let report = match from_file.map(std::fs::read_to_string) {
            Some(Ok(text)) => {
                let line = text.lines().next().unwrap_or("");
                match parse_report(line, fixed.weight) {
                    Ok(report) => report,
                    Err(e) => {
                        let file = from_file.expect("some").display();
                        let problem = format!("{file}, line 1: {e}; reporting down");
                        if last_problem.as_ref() != Some(&problem) {
                            eprintln!("prober agent: {problem}");
                            last_problem = Some(problem);
                        }
                        Report {
                            state: agent_wire::STATE_DOWN,
                            weight: 0,
                        }
                    }
                }
            }
            _ => fixed,
        };
        sequence = sequence.wrapping_add(1);
        if let Err(e) = socket.send_to(&encode(report, sequence), director) {
            // The director may be briefly unreachable: keep going.
            eprintln!("prober agent: sending to {director}: {e}");
        }
        sent += 1;
        if count.is_some_and(|c| sent >= c) {
            return Ok(());
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_parse_and_encode() {
        assert_eq!(
            parse_report("up 80", 100),
            Ok(Report {
                state: agent_wire::STATE_UP,
                weight: 80
            })
        );
        assert_eq!(
            parse_report("drain", 100).unwrap().state,
            agent_wire::STATE_DRAIN
        );
        assert!(parse_report("sideways", 1).is_err());
        assert!(parse_report("up 70000", 1).is_err());
        assert!(parse_report("up 1 2", 1).is_err());
        let wire = encode(
            Report {
                state: agent_wire::STATE_UP,
                weight: 300,
            },
            7,
        );
        assert_eq!(
            &wire[..],
            b"PRAG\x01\x01\x00\x00\x00\x00\x01\x2c\x00\x00\x00\x07"
        );
    }
}
