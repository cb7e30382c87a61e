//! `prober ipvs list`: every virtual service and real server as the kernel
//! has them, laid out like `ipvsadm -Ln` with traffic counters on the right.

use std::fmt::Write as _;

use anyhow::Result;
use prober_ipvs::{
    Destination, Forwarding, IpvsClient, IpvsInfo, Service, ServiceKey, Stats, VirtualService,
};
use serde::Serialize;

/// IP_VS_SVC_F_* bits that ipvsadm shows by name.
const SVC_F_PERSISTENT: u32 = 0x1;
const SVC_F_ONEPACKET: u32 = 0x4;

#[derive(Serialize)]
struct Listing<'a> {
    version: String,
    connection_table_size: u32,
    services: &'a [VirtualService],
}

pub fn run(json: bool) -> Result<()> {
    let mut client = IpvsClient::connect()?;
    let info = client.info()?;
    let mut services = client.dump()?;
    // The kernel dumps in hash order; operators read sorted lists.
    services.sort_by_key(|s| s.service.key);
    for service in &mut services {
        service.destinations.sort_by_key(|d| d.key());
    }
    if json {
        let listing = Listing {
            version: info.version_string(),
            connection_table_size: info.connection_table_size,
            services: &services,
        };
        println!("{}", serde_json::to_string_pretty(&listing)?);
    } else {
        print!("{}", table(&info, &services));
    }
    Ok(())
}

/// Left part as ipvsadm prints it, padded to this width before the counters.
const LEFT_WIDTH: usize = 70;

pub fn table(info: &IpvsInfo, services: &[VirtualService]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "IP Virtual Server version {} (size={})",
        info.version_string(),
        info.connection_table_size
    );
    let _ = writeln!(
        out,
        "{:<LEFT_WIDTH$} {}",
        "Prot LocalAddress:Port Scheduler Flags",
        stats_header()
    );
    let _ = writeln!(
        out,
        "{:<LEFT_WIDTH$} {} Settings",
        "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn",
        stats_header()
    );
    for entry in services {
        let _ = writeln!(
            out,
            "{:<LEFT_WIDTH$} {}",
            service_line(&entry.service),
            stats_columns(&entry.service.stats)
        );
        for dest in &entry.destinations {
            let left = format!(
                "  -> {:<28} {:<7} {:<6} {:<10} {:<10}",
                dest.key().to_string(),
                dest.forwarding.name(),
                dest.weight,
                dest.active_conns,
                dest.inactive_conns
            );
            let settings = destination_settings(dest);
            let line = format!(
                "{left:<LEFT_WIDTH$} {} {settings}",
                stats_columns(&dest.stats)
            );
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }
    out
}

fn service_line(service: &Service) -> String {
    let mut line = match service.key {
        ServiceKey::Address {
            protocol,
            addr,
            port,
        } => format!(
            "{:<4} {} {}",
            protocol.name(),
            std::net::SocketAddr::new(addr, port),
            service.scheduler
        ),
        ServiceKey::Fwmark { mark, family } => {
            let ipv6 = if family == prober_ipvs::Family::Ipv6 {
                " IPv6"
            } else {
                ""
            };
            format!("FWM  {mark}{ipv6} {}", service.scheduler)
        }
    };
    if service.flags & SVC_F_PERSISTENT != 0 {
        let _ = write!(line, " persistent {}", service.timeout);
        let full_mask = match service.key.family() {
            prober_ipvs::Family::Ipv4 => 0xffff_ffff,
            prober_ipvs::Family::Ipv6 => 128,
        };
        if service.netmask != full_mask {
            match service.key.family() {
                prober_ipvs::Family::Ipv4 => {
                    let _ = write!(line, " mask {}", std::net::Ipv4Addr::from(service.netmask));
                }
                prober_ipvs::Family::Ipv6 => {
                    let _ = write!(line, " mask {}", service.netmask);
                }
            }
        }
    }
    if service.flags & SVC_F_ONEPACKET != 0 {
        line.push_str(" ops");
    }
    if let Some(engine) = &service.persistence_engine {
        let _ = write!(line, " pe {engine}");
    }
    line
}

/// Thresholds and tunnel settings, shown only where they are set.
fn destination_settings(dest: &Destination) -> String {
    let mut parts = Vec::new();
    if dest.upper_threshold != 0 || dest.lower_threshold != 0 {
        parts.push(format!(
            "thresholds upper {} lower {}",
            dest.upper_threshold, dest.lower_threshold
        ));
    }
    if dest.forwarding == Forwarding::Tunnel {
        let mut tunnel = format!("tunnel {}", dest.tunnel.kind.name());
        if dest.tunnel.port != 0 {
            let _ = write!(tunnel, " port {}", dest.tunnel.port);
        }
        // IP_VS_TUNNEL_ENCAP_FLAG_CSUM / _REMCSUM
        match dest.tunnel.flags {
            0 => tunnel.push_str(" nocsum"),
            1 => tunnel.push_str(" csum"),
            2 => tunnel.push_str(" remcsum"),
            other => {
                let _ = write!(tunnel, " flags {other:#x}");
            }
        }
        parts.push(tunnel);
    }
    parts.join(", ")
}

fn stats_header() -> String {
    format!(
        "{:>10} {:>10} {:>10} {:>12} {:>12}",
        "Conns", "InPkts", "OutPkts", "InBytes", "OutBytes"
    )
}

fn stats_columns(stats: &Stats) -> String {
    format!(
        "{:>10} {:>10} {:>10} {:>12} {:>12}",
        stats.conns, stats.in_packets, stats.out_packets, stats.in_bytes, stats.out_bytes
    )
}

#[cfg(test)]
mod tests {
    use prober_ipvs::{Protocol, Tunnel, TunnelType};

    use super::*;

    #[test]
    fn table_lines_start_as_ipvsadm_prints_them() {
        let info = IpvsInfo {
            version: 0x010201,
            connection_table_size: 4096,
        };
        let services = vec![VirtualService {
            service: Service {
                key: ServiceKey::Address {
                    protocol: Protocol::Tcp,
                    addr: "192.0.2.1".parse().unwrap(),
                    port: 80,
                },
                scheduler: "wrr".into(),
                flags: 0x3,
                timeout: 300,
                netmask: 0xffff_ff00,
                persistence_engine: None,
                stats: Stats {
                    conns: 12,
                    ..Stats::default()
                },
            },
            destinations: vec![Destination {
                addr: "192.0.2.10".parse().unwrap(),
                port: 80,
                forwarding: Forwarding::Tunnel,
                weight: 3,
                upper_threshold: 100,
                lower_threshold: 10,
                tunnel: Tunnel {
                    kind: TunnelType::Gue,
                    port: 6080,
                    flags: 1,
                },
                active_conns: 2,
                inactive_conns: 5,
                persistent_conns: 0,
                stats: Stats::default(),
            }],
        }];
        let text = table(&info, &services);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "IP Virtual Server version 1.2.1 (size=4096)");
        assert!(lines[3].starts_with("TCP  192.0.2.1:80 wrr persistent 300 mask 255.255.255.0 "));
        assert!(lines[3].contains("        12 "), "{}", lines[3]);
        assert!(lines[4].starts_with(
            "  -> 192.0.2.10:80                Tunnel  3      2          5          "
        ));
        assert!(
            lines[4].ends_with("thresholds upper 100 lower 10, tunnel gue port 6080 csum"),
            "{}",
            lines[4]
        );
    }
}
