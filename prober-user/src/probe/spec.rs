//! What to probe, as an operator writes it:
//!
//! - `icmp:ADDR`: L3 echo to ADDR.
//! - `tcp:ADDR:PORT`: L4 SYN to ADDR:PORT (a NAT real server, or any host).
//! - `tcp:VIP:PORT,dr=RS`: direct routing: the frame goes to RS's MAC with
//!   destination VIP, so it checks exactly what IPVS sends RS.
//! - `tcp:VIP:PORT,tun=RS`: tunnel: IPIP to RS around a packet to VIP.

use std::{fmt, net::IpAddr, str::FromStr};

use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProbeKind {
    IcmpEcho,
    TcpSyn { port: u16 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Forwarding {
    /// The probe goes to the destination's own address (NAT real servers,
    /// L3 checks).
    Direct,
    /// IPVS direct routing: the real server's MAC, the VIP as destination.
    DirectRouting { real_server: IpAddr },
    /// IPVS tunnelling: IPIP to the real server, inner destination the VIP.
    Tunnel { real_server: IpAddr },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProbeSpec {
    pub kind: ProbeKind,
    /// Destination of the probe packet: the real server, or the VIP.
    pub destination: IpAddr,
    pub forwarding: Forwarding,
}

impl ProbeSpec {
    /// The host the probe physically reaches.
    pub fn real_server(&self) -> IpAddr {
        match self.forwarding {
            Forwarding::Direct => self.destination,
            Forwarding::DirectRouting { real_server } | Forwarding::Tunnel { real_server } => {
                real_server
            }
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "probe '{spec}': {problem} (expected icmp:ADDR, tcp:ADDR:PORT, or tcp:VIP:PORT,dr=RS / tun=RS)"
)]
pub struct SpecError {
    spec: String,
    problem: String,
}

impl FromStr for ProbeSpec {
    type Err = SpecError;

    fn from_str(text: &str) -> Result<Self, SpecError> {
        let fail = |problem: String| SpecError {
            spec: text.to_string(),
            problem,
        };
        let mut parts = text.split(',');
        let main = parts.next().unwrap_or_default();
        let (kind_text, rest) = main
            .split_once(':')
            .ok_or_else(|| fail("missing the kind (icmp: or tcp:)".into()))?;
        let (kind, destination) = match kind_text {
            "icmp" => (ProbeKind::IcmpEcho, rest),
            "tcp" => {
                let (addr, port) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| fail("a tcp probe needs a port: tcp:ADDR:PORT".into()))?;
                let port: u16 = port
                    .parse()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| fail(format!("bad port '{port}' (1-65535)")))?;
                (ProbeKind::TcpSyn { port }, addr)
            }
            other => return Err(fail(format!("unknown kind '{other}'"))),
        };
        let destination: IpAddr = destination
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| fail(format!("bad address '{destination}'")))?;
        let mut forwarding = Forwarding::Direct;
        for option in parts {
            let (key, value) = option
                .split_once('=')
                .ok_or_else(|| fail(format!("option '{option}' is not key=value")))?;
            let real_server: IpAddr = value
                .parse()
                .map_err(|_| fail(format!("bad real server address '{value}' in {key}=")))?;
            forwarding = match key {
                "dr" => Forwarding::DirectRouting { real_server },
                "tun" => Forwarding::Tunnel { real_server },
                other => return Err(fail(format!("unknown option '{other}' (dr= or tun=)"))),
            };
        }
        let spec = Self {
            kind,
            destination,
            forwarding,
        };
        if !destination.is_ipv4() || !spec.real_server().is_ipv4() {
            return Err(fail("IPv6 probes are not implemented yet".into()));
        }
        Ok(spec)
    }
}

impl fmt::Display for ProbeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ProbeKind::IcmpEcho => write!(f, "icmp:{}", self.destination)?,
            ProbeKind::TcpSyn { port } => write!(f, "tcp:{}:{port}", self.destination)?,
        }
        match self.forwarding {
            Forwarding::Direct => Ok(()),
            Forwarding::DirectRouting { real_server } => write!(f, ",dr={real_server}"),
            Forwarding::Tunnel { real_server } => write!(f, ",tun={real_server}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_prints_it_back() {
        for text in [
            "icmp:192.0.2.2",
            "tcp:192.0.2.2:80",
            "tcp:203.0.113.10:443,dr=192.0.2.3",
            "tcp:203.0.113.10:80,tun=192.0.2.4",
        ] {
            let spec: ProbeSpec = text.parse().unwrap();
            assert_eq!(spec.to_string(), text);
        }
        let dr: ProbeSpec = "tcp:203.0.113.10:443,dr=192.0.2.3".parse().unwrap();
        assert_eq!(dr.real_server(), "192.0.2.3".parse::<IpAddr>().unwrap());
        assert_eq!(dr.destination, "203.0.113.10".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn errors_name_the_spec_and_the_problem() {
        let cases = [
            ("udp:1.2.3.4:5", "unknown kind 'udp'"),
            ("tcp:1.2.3.4", "needs a port"),
            ("tcp:1.2.3.4:0", "bad port '0'"),
            ("tcp:1.2.3.4:99999", "bad port '99999'"),
            ("icmp:nothost", "bad address 'nothost'"),
            ("tcp:1.2.3.4:80,via=1.2.3.5", "unknown option 'via'"),
            ("tcp:1.2.3.4:80,dr=x", "bad real server address 'x'"),
            ("icmp:2001:db8::1", "IPv6 probes are not implemented yet"),
        ];
        for (text, problem) in cases {
            let err = text.parse::<ProbeSpec>().unwrap_err().to_string();
            assert!(err.contains(text) && err.contains(problem), "{text}: {err}");
        }
    }
}
