use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::reply::{u16_at, u32_at, AttributeTable};
use super::*;
use crate::{Destination, Family, Forwarding, Protocol, ServiceKey, Stats, Tunnel, TunnelType};

fn hex(text: &str) -> Vec<u8> {
    let digits: String = text.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
        .collect()
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn dr_destination() -> Destination {
    Destination {
        addr: v4(10, 0, 0, 2),
        port: 80,
        forwarding: Forwarding::DirectRoute,
        weight: 1,
        upper_threshold: 0,
        lower_threshold: 0,
        tunnel: Tunnel::default(),
        active_conns: 0,
        inactive_conns: 0,
        persistent_conns: 0,
        stats: Stats::default(),
    }
}

fn tcp_service() -> ServiceKey {
    ServiceKey::Address {
        protocol: Protocol::Tcp,
        addr: v4(10, 0, 0, 1),
        port: 80,
    }
}

/// The worked example of shared/docs/ipvs-netlink.md, byte for byte.
#[test]
fn set_dest_matches_the_worked_example() {
    let message = set_destination_request(0x22, 7, &tcp_service(), &dr_destination(), 50);
    let expected_attributes = hex("30000100
           0600010002000000
           0600020006000000
           140003000a000001000000000000000000000000
           0600040000500000
         48000200
           140001000a000002000000000000000000000000
           0600020000500000
           06000b0002000000
           0800030003000000
           0800040032000000
           0800050000000000
           0800060000000000");
    assert_eq!(&message[20..], &expected_attributes[..]);
    // netlink header: length, family id, REQUEST|ACK, seq, port 0;
    // genl header: SET_DEST, version 1.
    assert_eq!(u32_at(&message, 0) as usize, message.len());
    assert_eq!(u16_at(&message, 4), 0x22);
    assert_eq!(u16_at(&message, 6), NLM_F_REQUEST | NLM_F_ACK);
    assert_eq!(u32_at(&message, 8), 7);
    assert_eq!(u32_at(&message, 12), 0);
    assert_eq!(&message[16..20], &[IPVS_CMD_SET_DEST, 1, 0, 0]);
}

#[test]
fn set_dest_keeps_tunnel_settings_and_thresholds() {
    let dest = Destination {
        forwarding: Forwarding::Tunnel,
        upper_threshold: 100,
        lower_threshold: 10,
        tunnel: Tunnel {
            kind: TunnelType::Gue,
            port: 6080,
            flags: 1,
        },
        ..dr_destination()
    };
    let message = set_destination_request(0x22, 1, &tcp_service(), &dest, 9);
    let top = AttributeTable::parse("test", &message[20..], IPVS_CMD_ATTR_DEST).unwrap();
    let nest = top.required(IPVS_CMD_ATTR_DEST, "DEST").unwrap();
    let table = AttributeTable::parse("dest", nest, IPVS_DEST_ATTR_TUN_FLAGS).unwrap();
    let u32_of = |k| table.u32(k, "").unwrap().unwrap();
    assert_eq!(u32_of(IPVS_DEST_ATTR_FWD_METHOD), 2);
    assert_eq!(u32_of(IPVS_DEST_ATTR_WEIGHT), 9);
    assert_eq!(u32_of(IPVS_DEST_ATTR_U_THRESH), 100);
    assert_eq!(u32_of(IPVS_DEST_ATTR_L_THRESH), 10);
    assert_eq!(table.u8(IPVS_DEST_ATTR_TUN_TYPE, "").unwrap(), Some(1));
    assert_eq!(
        table.get(IPVS_DEST_ATTR_TUN_PORT),
        Some(&6080u16.to_be_bytes()[..])
    );
    assert_eq!(table.u16(IPVS_DEST_ATTR_TUN_FLAGS, "").unwrap(), Some(1));
}

#[test]
fn fwmark_and_ipv6_service_keys() {
    let key = ServiceKey::Fwmark {
        family: Family::Ipv6,
        mark: 7,
    };
    let message = dump_destinations_request(0x22, 3, &key);
    assert_eq!(u16_at(&message, 6), NLM_F_REQUEST | NLM_F_DUMP);
    assert_eq!(
        &message[20..],
        &hex("14000100 06000100 0a000000 08000500 07000000")[..]
    );

    let key = ServiceKey::Address {
        protocol: Protocol::Udp,
        addr: "2001:db8::1".parse().unwrap(),
        port: 53,
    };
    let message = get_service_request(0x22, 3, &key);
    assert_eq!(u16_at(&message, 6), NLM_F_REQUEST);
    assert_eq!(
        &message[20..],
        &hex("30000100 06000100 0a000000 06000200 11000000
             14000300 20010db8000000000000000000000001 06000400 00350000")[..]
    );
}

/// A GET_SERVICE reply as a 6.1 kernel sends it: TCP 10.0.0.1:80, wrr,
/// persistent 300 s, with STATS and STATS64.
fn service_reply_attributes() -> Vec<u8> {
    let mut msg = MessageBuilder::new(0x22, NLM_F_MULTI, 1, IPVS_CMD_NEW_SERVICE, 1);
    msg.begin_nest(IPVS_CMD_ATTR_SERVICE)
        .u16(IPVS_SVC_ATTR_AF, 2)
        .u16(IPVS_SVC_ATTR_PROTOCOL, 6)
        .addr(IPVS_SVC_ATTR_ADDR, &v4(10, 0, 0, 1))
        .be16(IPVS_SVC_ATTR_PORT, 80)
        .string(IPVS_SVC_ATTR_SCHED_NAME, "wrr")
        .bytes(IPVS_SVC_ATTR_FLAGS, &hex("03000000 ffffffff"))
        .u32(IPVS_SVC_ATTR_TIMEOUT, 300)
        .bytes(IPVS_SVC_ATTR_NETMASK, &[255, 255, 255, 0]);
    msg.begin_nest(IPVS_SVC_ATTR_STATS);
    for kind in 1..=10 {
        msg.u32(kind, kind as u32);
    }
    msg.end_nest();
    msg.begin_nest(IPVS_SVC_ATTR_STATS64);
    msg.bytes(11, &[]); // PAD
    for kind in 1..=10u16 {
        msg.bytes(kind, &(u64::from(kind) << 33).to_ne_bytes());
    }
    msg.end_nest().end_nest();
    msg.finish()[20..].to_vec()
}

#[test]
fn parses_a_service_with_64_bit_stats() {
    let service = parse_service(&service_reply_attributes()).unwrap();
    assert_eq!(service.key, tcp_service());
    assert_eq!(service.scheduler, "wrr");
    assert_eq!(service.flags, 3);
    assert_eq!(service.timeout, 300);
    assert_eq!(service.netmask, 0xffff_ff00);
    assert_eq!(service.persistence_engine, None);
    assert_eq!(service.stats.conns, 1 << 33);
    assert_eq!(service.stats.out_bps, 10 << 33);
}

fn destination_reply_attributes(family: Option<u16>, addr: &IpAddr) -> Vec<u8> {
    let mut msg = MessageBuilder::new(0x22, NLM_F_MULTI, 1, IPVS_CMD_NEW_DEST, 1);
    msg.begin_nest(IPVS_CMD_ATTR_DEST)
        .addr(IPVS_DEST_ATTR_ADDR, addr)
        .be16(IPVS_DEST_ATTR_PORT, 8080)
        .u32(IPVS_DEST_ATTR_FWD_METHOD, 2)
        .u32(IPVS_DEST_ATTR_WEIGHT, 7)
        .u8(IPVS_DEST_ATTR_TUN_TYPE, 1)
        .be16(IPVS_DEST_ATTR_TUN_PORT, 6080)
        .u16(IPVS_DEST_ATTR_TUN_FLAGS, 2)
        .u32(IPVS_DEST_ATTR_U_THRESH, 100)
        .u32(IPVS_DEST_ATTR_L_THRESH, 10)
        .u32(IPVS_DEST_ATTR_ACTIVE_CONNS, 4)
        .u32(IPVS_DEST_ATTR_INACT_CONNS, 5)
        .u32(IPVS_DEST_ATTR_PERSIST_CONNS, 6);
    if let Some(family) = family {
        msg.u16(IPVS_DEST_ATTR_ADDR_FAMILY, family);
    }
    msg.begin_nest(IPVS_DEST_ATTR_STATS);
    msg.u32(2, 77);
    msg.end_nest();
    msg.end_nest();
    msg.finish()[20..].to_vec()
}

#[test]
fn parses_a_gue_tunnel_destination() {
    let attrs = destination_reply_attributes(Some(2), &v4(10, 0, 0, 2));
    let dest = parse_destination(&attrs, Family::Ipv4).unwrap();
    assert_eq!(dest.addr, v4(10, 0, 0, 2));
    assert_eq!(dest.port, 8080);
    assert_eq!(dest.forwarding, Forwarding::Tunnel);
    assert_eq!(dest.weight, 7);
    assert_eq!(
        dest.tunnel,
        Tunnel {
            kind: TunnelType::Gue,
            port: 6080,
            flags: 2
        }
    );
    assert_eq!((dest.upper_threshold, dest.lower_threshold), (100, 10));
    assert_eq!(
        (
            dest.active_conns,
            dest.inactive_conns,
            dest.persistent_conns
        ),
        (4, 5, 6)
    );
    // Only the 32-bit STATS: widened.
    assert_eq!(dest.stats.in_packets, 77);
}

#[test]
fn an_ipv6_destination_in_an_ipv4_service_follows_its_addr_family() {
    let addr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2));
    let attrs = destination_reply_attributes(Some(10), &addr);
    assert_eq!(parse_destination(&attrs, Family::Ipv4).unwrap().addr, addr);
    // Without ADDR_FAMILY (old kernels) the service's family applies.
    let attrs = destination_reply_attributes(None, &addr);
    assert_eq!(parse_destination(&attrs, Family::Ipv6).unwrap().addr, addr);
}

#[test]
fn parses_messages_acks_errors_and_done() {
    let mut datagram = Vec::new();
    // NLMSG_ERROR 0 (ack) for seq 5, NLMSG_ERROR -ESRCH for seq 6, DONE.
    for (seq, code) in [(5u32, 0i32), (6, -libc::ESRCH)] {
        datagram.extend_from_slice(&36u32.to_ne_bytes());
        datagram.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        datagram.extend_from_slice(&0u16.to_ne_bytes());
        datagram.extend_from_slice(&seq.to_ne_bytes());
        datagram.extend_from_slice(&0u32.to_ne_bytes());
        datagram.extend_from_slice(&code.to_ne_bytes());
        datagram.extend_from_slice(&[0u8; 16]);
    }
    datagram.extend_from_slice(&hex("14000000 0300 0200 07000000 00000000 00000000"));
    let parsed: Vec<_> = messages(&datagram).map(Result::unwrap).collect();
    assert_eq!(parsed.len(), 3);
    assert_eq!(parsed[0].seq, 5);
    assert_eq!(reply(&parsed[0]).unwrap(), Reply::Ack);
    assert_eq!(
        reply(&parsed[1]).unwrap(),
        Reply::Error { errno: libc::ESRCH }
    );
    assert_eq!(reply(&parsed[2]).unwrap(), Reply::Done);
    assert_eq!(parsed[2].flags, NLM_F_MULTI);
}

#[test]
fn family_id_from_a_controller_reply() {
    let mut msg = MessageBuilder::new(GENL_ID_CTRL, 0, 1, 1, 2);
    msg.string(CTRL_ATTR_FAMILY_NAME, "IPVS")
        .u16(CTRL_ATTR_FAMILY_ID, 0x1f)
        .u32(3, 1); // CTRL_ATTR_VERSION, ignored
    assert_eq!(parse_family_id(&msg.finish()[20..]).unwrap(), 0x1f);
    assert_eq!(
        get_family_request(9)[20..],
        hex("09000200 49505653 00000000")[..]
    );
}

#[test]
fn missing_and_short_attributes_are_named() {
    let mut msg = MessageBuilder::new(0x22, 0, 1, IPVS_CMD_NEW_DEST, 1);
    msg.begin_nest(IPVS_CMD_ATTR_DEST)
        .addr(IPVS_DEST_ATTR_ADDR, &v4(10, 0, 0, 2))
        .be16(IPVS_DEST_ATTR_PORT, 80)
        .u32(IPVS_DEST_ATTR_FWD_METHOD, 0)
        .u32(IPVS_DEST_ATTR_WEIGHT, 1)
        .u16(IPVS_DEST_ATTR_U_THRESH, 1); // 2 bytes where 4 belong
    msg.end_nest();
    let err = parse_destination(&msg.finish()[20..], Family::Ipv4).unwrap_err();
    assert_eq!(
        err.to_string(),
        "destination: attribute U_THRESH has 2 bytes, expected 4 (destination 10.0.0.2)"
    );

    let mut msg = MessageBuilder::new(0x22, 0, 1, IPVS_CMD_NEW_SERVICE, 1);
    msg.begin_nest(IPVS_CMD_ATTR_SERVICE)
        .u16(IPVS_SVC_ATTR_AF, 2);
    msg.end_nest();
    let err = parse_service(&msg.finish()[20..]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "service: neither FWMARK nor PROTOCOL is present"
    );

    let err = parse_service(&hex("08000300 02000000")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "service message: attribute SERVICE is missing"
    );
}

/// Every truncation and every single-byte corruption of real replies
/// gives an error or a value, never a panic.
#[test]
fn malformed_input_never_panics() {
    let service = service_reply_attributes();
    let dest = destination_reply_attributes(Some(2), &v4(10, 0, 0, 2));
    for fixture in [&service, &dest] {
        for len in 0..fixture.len() {
            let _ = parse_service(&fixture[..len]);
            let _ = parse_destination(&fixture[..len], Family::Ipv4);
            let _ = messages(&fixture[..len]).count();
        }
        for at in 0..fixture.len() {
            for value in [0u8, 1, 3, 0x7f, 0x80, 0xff] {
                let mut corrupt = fixture.clone();
                corrupt[at] = value;
                let _ = parse_service(&corrupt);
                let _ = parse_destination(&corrupt, Family::Ipv6);
                let _ = parse_info(&corrupt);
                let _ = parse_family_id(&corrupt);
                for message in messages(&corrupt).flatten() {
                    let _ = reply(&message);
                }
            }
        }
    }
    assert!(messages(&[0u8; 3]).next().unwrap().is_err());
    assert!(reply(&Message {
        kind: NLMSG_ERROR,
        flags: 0,
        seq: 0,
        payload: &[1, 2]
    })
    .is_err());
    let err = attributes(&hex("ff000100 00000000"))
        .next()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.to_string(), "attribute 1 claims 255 bytes, 8 are left");
}

#[test]
fn info_reply() {
    let info = parse_info(&hex("08000100 01020100 08000200 00100000")).unwrap();
    assert_eq!(info.version_string(), "1.2.1");
    assert_eq!(info.connection_table_size, 4096);
}
