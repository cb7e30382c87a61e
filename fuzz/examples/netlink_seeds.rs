//! Writes the seed corpus of the `netlink` fuzz target: kernel-style
//! replies built with prober-ipvs's own message builder. The seeds are
//! committed (fuzz/seeds/netlink); rerun this after a change of the wire
//! format:
//!
//! ```sh
//! cargo +nightly run --manifest-path fuzz/Cargo.toml --example netlink_seeds
//! ```

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use prober_ipvs::{
    netlink::{
        self, MessageBuilder, GENL_ID_CTRL, IPVS_CMD_NEW_DEST, IPVS_CMD_NEW_SERVICE,
        IPVS_CMD_SET_INFO, NLMSG_DONE, NLMSG_ERROR, NLM_F_MULTI,
    },
    Destination, Forwarding, Protocol, ServiceKey, Stats, Tunnel, TunnelType,
};

/// What a GET_FAMILY reply says IPVS is called on this kernel.
const FAMILY: u16 = 0x1c;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;
const IPPROTO_UDP: u16 = 17;

// Attribute numbers (include/uapi/linux/ip_vs.h, genetlink.h).
const CTRL_CMD_NEWFAMILY: u8 = 1;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CMD_ATTR_SERVICE: u16 = 1;
const CMD_ATTR_DEST: u16 = 2;
const SVC_AF: u16 = 1;
const SVC_PROTOCOL: u16 = 2;
const SVC_ADDR: u16 = 3;
const SVC_PORT: u16 = 4;
const SVC_FWMARK: u16 = 5;
const SVC_SCHED_NAME: u16 = 6;
const SVC_FLAGS: u16 = 7;
const SVC_TIMEOUT: u16 = 8;
const SVC_NETMASK: u16 = 9;
const SVC_STATS: u16 = 10;
const SVC_PE_NAME: u16 = 11;
const SVC_STATS64: u16 = 12;
const DEST_ADDR: u16 = 1;
const DEST_PORT: u16 = 2;
const DEST_FWD_METHOD: u16 = 3;
const DEST_WEIGHT: u16 = 4;
const DEST_U_THRESH: u16 = 5;
const DEST_L_THRESH: u16 = 6;
const DEST_ACTIVE_CONNS: u16 = 7;
const DEST_INACT_CONNS: u16 = 8;
const DEST_PERSIST_CONNS: u16 = 9;
const DEST_STATS: u16 = 10;
const DEST_ADDR_FAMILY: u16 = 11;
const DEST_STATS64: u16 = 12;
const DEST_TUN_TYPE: u16 = 13;
const DEST_TUN_PORT: u16 = 14;
const DEST_TUN_FLAGS: u16 = 15;
const INFO_VERSION: u16 = 1;
const INFO_CONN_TAB_SIZE: u16 = 2;

fn stats(msg: &mut MessageBuilder, kind: u16, wide: bool) {
    msg.begin_nest(kind);
    for field in 1..=10u16 {
        let value = u64::from(field) * 1000;
        if wide {
            msg.bytes(field, &value.to_ne_bytes());
        } else {
            msg.u32(field, value as u32);
        }
    }
    msg.end_nest();
}

fn service(seq: u32, key: &ServiceKey, wide_stats: bool) -> Vec<u8> {
    let mut msg = MessageBuilder::new(FAMILY, NLM_F_MULTI, seq, IPVS_CMD_NEW_SERVICE, 1);
    msg.begin_nest(CMD_ATTR_SERVICE);
    match key {
        ServiceKey::Address {
            protocol,
            addr,
            port,
        } => {
            let (af, proto) = (
                if addr.is_ipv4() { AF_INET } else { AF_INET6 },
                if *protocol == Protocol::Tcp {
                    IPPROTO_TCP
                } else {
                    IPPROTO_UDP
                },
            );
            msg.u16(SVC_AF, af)
                .u16(SVC_PROTOCOL, proto)
                .addr(SVC_ADDR, addr)
                .be16(SVC_PORT, *port);
            if addr.is_ipv4() {
                msg.bytes(SVC_NETMASK, &0xffff_ff00u32.to_be_bytes());
            } else {
                msg.u32(SVC_NETMASK, 64);
                msg.string(SVC_PE_NAME, "sip");
            }
        }
        ServiceKey::Fwmark { mark, .. } => {
            msg.u16(SVC_AF, AF_INET).u32(SVC_FWMARK, *mark);
        }
    }
    let mut flags = [0u8; 8];
    flags[..4].copy_from_slice(&1u32.to_ne_bytes());
    flags[4..].copy_from_slice(&u32::MAX.to_ne_bytes());
    msg.string(SVC_SCHED_NAME, "wlc")
        .bytes(SVC_FLAGS, &flags)
        .u32(SVC_TIMEOUT, 300);
    stats(&mut msg, SVC_STATS, false);
    if wide_stats {
        stats(&mut msg, SVC_STATS64, true);
    }
    msg.end_nest();
    msg.finish()
}

fn destination(seq: u32, addr: IpAddr, forwarding: u32, tunnel: bool) -> Vec<u8> {
    let mut msg = MessageBuilder::new(FAMILY, NLM_F_MULTI, seq, IPVS_CMD_NEW_DEST, 1);
    msg.begin_nest(CMD_ATTR_DEST)
        .addr(DEST_ADDR, &addr)
        .be16(DEST_PORT, 80)
        .u32(DEST_FWD_METHOD, forwarding)
        .u32(DEST_WEIGHT, 100)
        .u32(DEST_U_THRESH, 0)
        .u32(DEST_L_THRESH, 0)
        .u32(DEST_ACTIVE_CONNS, 3)
        .u32(DEST_INACT_CONNS, 7)
        .u32(DEST_PERSIST_CONNS, 1)
        .u16(
            DEST_ADDR_FAMILY,
            if addr.is_ipv4() { AF_INET } else { AF_INET6 },
        );
    if tunnel {
        msg.u8(DEST_TUN_TYPE, 1)
            .be16(DEST_TUN_PORT, 6080)
            .u16(DEST_TUN_FLAGS, 1);
    }
    stats(&mut msg, DEST_STATS, false);
    stats(&mut msg, DEST_STATS64, true);
    msg.end_nest();
    msg.finish()
}

/// NLMSG_DONE or NLMSG_ERROR: a bare netlink header and a code.
fn control(kind: u16, seq: u32, code: i32, echo_request: bool) -> Vec<u8> {
    let mut msg = Vec::new();
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&NLM_F_MULTI.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&code.to_ne_bytes());
    if echo_request {
        msg.extend_from_slice(&[0u8; netlink::NLMSG_HDR_LEN]);
    }
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_ne_bytes());
    msg
}

/// The seeds are what they claim: the parsers read the replies whole.
fn check(seeds: &[(&str, Vec<u8>)]) {
    let replies = |name: &str| -> Vec<(u8, Vec<u8>)> {
        let (_, bytes) = seeds.iter().find(|(n, _)| *n == name).unwrap();
        netlink::messages(bytes)
            .filter_map(|m| match netlink::reply(&m.unwrap()).unwrap() {
                netlink::Reply::Data { cmd, attributes } => Some((cmd, attributes.to_vec())),
                _ => None,
            })
            .collect()
    };
    assert_eq!(
        netlink::parse_family_id(&replies("family-reply")[0].1).unwrap(),
        FAMILY
    );
    assert_eq!(
        netlink::parse_info(&replies("info-reply")[0].1)
            .unwrap()
            .version_string(),
        "1.2.1"
    );
    let services = replies("service-dump");
    assert_eq!(services.len(), 3);
    for (_, attributes) in &services {
        netlink::parse_service(attributes).unwrap();
    }
    let destinations = replies("destination-dump");
    assert_eq!(destinations.len(), 3);
    for (_, attributes) in &destinations {
        netlink::parse_destination(attributes, prober_ipvs::Family::Ipv4).unwrap();
    }
}

fn main() -> std::io::Result<()> {
    let v4 = |d| IpAddr::V4(Ipv4Addr::new(192, 0, 2, d));
    let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10));
    let tcp = ServiceKey::Address {
        protocol: Protocol::Tcp,
        addr: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)),
        port: 80,
    };
    let udp6 = ServiceKey::Address {
        protocol: Protocol::Udp,
        addr: v6,
        port: 53,
    };
    let fwmark = ServiceKey::Fwmark {
        family: prober_ipvs::Family::Ipv4,
        mark: 7,
    };
    let done = control(NLMSG_DONE, 3, 0, false);

    let mut family = MessageBuilder::new(GENL_ID_CTRL, 0, 1, CTRL_CMD_NEWFAMILY, 2);
    family
        .u16(CTRL_ATTR_FAMILY_ID, FAMILY)
        .string(CTRL_ATTR_FAMILY_NAME, "IPVS");
    let mut info = MessageBuilder::new(FAMILY, 0, 2, IPVS_CMD_SET_INFO, 1);
    info.u32(INFO_VERSION, 0x010201)
        .u32(INFO_CONN_TAB_SIZE, 4096);

    let mut services = service(3, &tcp, true);
    services.extend(service(3, &udp6, false));
    services.extend(service(3, &fwmark, true));
    services.extend(&done);
    let mut destinations = destination(4, v4(10), 0, false);
    destinations.extend(destination(4, v4(11), 3, false));
    destinations.extend(destination(4, v6, 2, true));
    destinations.extend(&done);

    let dest = Destination {
        addr: v4(12),
        port: 8080,
        forwarding: Forwarding::Tunnel,
        weight: 50,
        upper_threshold: 10,
        lower_threshold: 5,
        tunnel: Tunnel {
            kind: TunnelType::Gue,
            port: 6080,
            flags: 1,
        },
        active_conns: 0,
        inactive_conns: 0,
        persistent_conns: 0,
        stats: Stats::default(),
    };
    let service_message = service(5, &tcp, true);
    let destination_message = destination(6, v4(10), 3, false);

    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("family-reply", family.finish()),
        ("info-reply", info.finish()),
        ("service-dump", services),
        ("destination-dump", destinations),
        ("ack", control(NLMSG_ERROR, 7, 0, true)),
        ("error-enoent", control(NLMSG_ERROR, 8, -2, true)),
        ("done-eintr", control(NLMSG_DONE, 9, -4, false)),
        // The attributes alone, as parse_service/parse_destination take them.
        (
            "service-attributes",
            service_message[netlink::NLMSG_HDR_LEN + netlink::GENL_HDR_LEN..].to_vec(),
        ),
        (
            "destination-attributes",
            destination_message[netlink::NLMSG_HDR_LEN + netlink::GENL_HDR_LEN..].to_vec(),
        ),
        // Requests carry a service key and a destination nest too.
        (
            "set-destination-request",
            netlink::set_destination_request(FAMILY, 10, &tcp, &dest, 75),
        ),
        (
            "get-service-request",
            netlink::get_service_request(FAMILY, 11, &udp6),
        ),
    ];
    check(&seeds);
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds/netlink"));
    std::fs::create_dir_all(&dir)?;
    for (name, bytes) in seeds {
        let path = dir.join(format!("{name}.bin"));
        std::fs::write(&path, &bytes)?;
        println!("{} ({} bytes)", path.display(), bytes.len());
    }
    Ok(())
}
