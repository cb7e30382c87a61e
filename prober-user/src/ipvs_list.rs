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
