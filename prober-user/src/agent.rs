//! `prober agent`: runs on a real server and reports its state and weight
//! to the director every few seconds, one 32-byte UDP datagram each time
//! (format: `prober_common::agent_wire`, also in the README), tagged
//! under the key shared with the director when `--key-file` is given.
//!
//! What it reports comes from its flags, or, when `--from-file` is given
//! and the file exists, from the file's first line: `up 80`, `drain`,
//! `down` (so a deploy script can drain a server by writing one line).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::unix::fs::MetadataExt,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use prober_common::agent_wire;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub state: u8,
    pub weight: u32,
}

/// The key shared by the director and its agents (SipHash-2-4 key words).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AgentKey(pub [u64; 2]);

impl fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentKey(..)")
    }
}

/// 32 hex digits (128 bits), surrounding whitespace ignored.
pub fn parse_key(text: &str) -> Result<AgentKey, String> {
    let text = text.trim();
    if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "a key is 32 hex digits (e.g. from `od -An -tx1 -N16 /dev/urandom | tr -d ' \\n'`), found {} characters",
            text.len()
        ));
    }
    let byte = |i: usize| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("hex digits");
    let word = |at: usize| u64::from_le_bytes(std::array::from_fn(|i| byte(at + i)));
    Ok(AgentKey([word(0), word(8)]))
}

/// Reads a key file, which only its owner may read or write (it lets
/// anyone who has it steer weights).
pub fn read_key(path: &Path) -> Result<AgentKey, String> {
    let at = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("key file {at}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("key file {at}: not a regular file"));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "key file {at}: mode {:o} lets others read it; chmod 600 it",
            meta.mode() & 0o777
        ));
    }
    // A key is 32 digits: reading more than a line's worth proves nothing.
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| std::io::Read::read_to_string(&mut std::io::Read::take(f, 256), &mut text))
        .map_err(|e| format!("key file {at}: {e}"))?;
    parse_key(&text).map_err(|e| format!("key file {at}: {e}"))
}

/// The datagram of one report. The tag binds it to the sender's and the
/// director's addresses; without a key it is 0.
pub fn encode(
    report: Report,
    sequence: u64,
    key: Option<AgentKey>,
    source: Ipv4Addr,
    director: SocketAddr,
) -> [u8; agent_wire::LEN] {
    let mut signed = [0u8; agent_wire::SIGNED_LEN];
    signed[0..4].copy_from_slice(&agent_wire::MAGIC);
    signed[4] = agent_wire::VERSION;
    signed[5] = report.state;
    signed[8..12].copy_from_slice(&report.weight.to_be_bytes());
    signed[16..24].copy_from_slice(&sequence.to_be_bytes());
    let tag = match (key, director.ip()) {
        (Some(AgentKey(key)), IpAddr::V4(director_ip)) => agent_wire::tag(
            key,
            &signed,
            source.octets(),
            director_ip.octets(),
            director.port(),
        ),
        _ => 0,
    };
    let mut wire = [0u8; agent_wire::LEN];
    wire[..agent_wire::SIGNED_LEN].copy_from_slice(&signed);
    wire[agent_wire::SIGNED_LEN..].copy_from_slice(&tag.to_le_bytes());
    wire
}

/// The next sequence: microseconds since the Unix epoch, so a restarted
/// agent goes on above its last report, and at least one above `last`.
fn next_sequence(last: u64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    now.max(last.wrapping_add(1))
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
    key: Option<AgentKey>,
) -> Result<()> {
    if interval.is_zero() {
        bail!("--interval must be above zero");
    }
    if !director.is_ipv4() {
        bail!("--director {director}: agents report over IPv4 (the datapath records IPv4 reports only)");
    }
    // Reports go out of an unconnected socket: on a connected one, the
    // ICMP error that a refused report brings back would make the next
    // send fail, and that report would be lost. A second socket, connected
    // but never sending, tells which source address the kernel picks.
    let socket = UdpSocket::bind("0.0.0.0:0").context("opening a UDP socket")?;
    let route = UdpSocket::bind("0.0.0.0:0").context("opening a UDP socket")?;
    let mut sequence = 0u64;
    let mut sent = 0u64;
    let mut last_problem = None;
    let mut send_problem = None;
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
        sequence = next_sequence(sequence);
        // The route looked up again each time, so the tag names the
        // address the kernel sends from now (routes and addresses change);
        // the director may be briefly unreachable: say so once, go on.
        let sending = route
            .connect(director)
            .and_then(|()| route.local_addr())
            .and_then(|local| match local.ip() {
                IpAddr::V4(source) => {
                    socket.send_to(&encode(report, sequence, key, source, director), director)
                }
                IpAddr::V6(_) => Err(std::io::Error::other("no IPv4 source address")),
            });
        match sending {
            Ok(_) => {
                if send_problem.take().is_some() {
                    eprintln!("prober agent: sending to {director} again");
                }
            }
            Err(e) => {
                let problem = format!("sending to {director}: {e}");
                if send_problem.as_ref() != Some(&problem) {
                    eprintln!("prober agent: {problem}");
                    send_problem = Some(problem);
                }
            }
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
        let up_300 = Report {
            state: agent_wire::STATE_UP,
            weight: 300,
        };
        let source = Ipv4Addr::new(192, 0, 2, 10);
        let director: SocketAddr = "10.0.0.1:5555".parse().unwrap();
        let wire = encode(up_300, 7, None, source, director);
        assert_eq!(
            &wire[..],
            b"PRAG\x02\x01\x00\x00\x00\x00\x01\x2c\0\0\0\0\0\0\0\0\0\0\0\x07\0\0\0\0\0\0\0\0"
        );
        let key = parse_key("000102030405060708090a0b0c0d0e0f\n").unwrap();
        assert_eq!(key.0[0], 0x0706_0504_0302_0100);
        let tagged = encode(up_300, 7, Some(key), source, director);
        assert_eq!(tagged[..24], wire[..24], "the tag only adds bytes");
        assert_ne!(tagged[24..], [0; 8]);
        // The tag depends on the key, the sender and the director.
        let other_key = parse_key("ff0102030405060708090a0b0c0d0e0f").unwrap();
        assert_ne!(encode(up_300, 7, Some(other_key), source, director), tagged);
        let other_source = Ipv4Addr::new(192, 0, 2, 11);
        assert_ne!(encode(up_300, 7, Some(key), other_source, director), tagged);
        let other_port: SocketAddr = "10.0.0.1:5556".parse().unwrap();
        assert_ne!(encode(up_300, 7, Some(key), source, other_port), tagged);
        assert!(parse_key("0001").is_err());
        assert!(parse_key("zz0102030405060708090a0b0c0d0e0f").is_err());
        assert!(format!("{key:?}").contains(".."), "Debug hides the key");
        assert!(
            next_sequence(u64::MAX - 1) == u64::MAX && next_sequence(5) > 1_700_000_000_000_000
        );
    }
}
