//! Building requests: one generic netlink message each, attributes and
//! nests in the kernel's layout.

use std::net::IpAddr;

use super::*;
use crate::{Destination, Family, Forwarding, ServiceKey, Tunnel};

/// Builds one netlink message with a generic netlink header and attributes;
/// nests are opened and closed around the attributes they hold.
pub struct MessageBuilder {
    buf: Vec<u8>,
    open_nests: Vec<usize>,
}

impl MessageBuilder {
    pub fn new(kind: u16, flags: u16, seq: u32, cmd: u8, version: u8) -> Self {
        let mut buf = Vec::with_capacity(160);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish()
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Self {
            buf,
            open_nests: Vec::new(),
        }
    }

    pub fn bytes(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let len = NLA_HDR_LEN + value.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub fn u8(&mut self, kind: u16, value: u8) -> &mut Self {
        self.bytes(kind, &[value])
    }

    pub fn u16(&mut self, kind: u16, value: u16) -> &mut Self {
        self.bytes(kind, &value.to_ne_bytes())
    }

    /// A port or other network-order 16-bit value.
    pub fn be16(&mut self, kind: u16, value: u16) -> &mut Self {
        self.bytes(kind, &value.to_be_bytes())
    }

    pub fn u32(&mut self, kind: u16, value: u32) -> &mut Self {
        self.bytes(kind, &value.to_ne_bytes())
    }

    /// A NUL-terminated string.
    pub fn string(&mut self, kind: u16, value: &str) -> &mut Self {
        let mut bytes = value.as_bytes().to_vec();
        bytes.push(0);
        self.bytes(kind, &bytes)
    }

    /// An address as IPVS wants it: 16 bytes, an IPv4 one in the first 4.
    pub fn addr(&mut self, kind: u16, addr: &IpAddr) -> &mut Self {
        let mut bytes = [0u8; 16];
        match addr {
            IpAddr::V4(v4) => bytes[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => bytes.copy_from_slice(&v6.octets()),
        }
        self.bytes(kind, &bytes)
    }

    pub fn begin_nest(&mut self, kind: u16) -> &mut Self {
        self.open_nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self
    }

    pub fn end_nest(&mut self) -> &mut Self {
        let start = self
            .open_nests
            .pop()
            .expect("end_nest without begin_nest: a bug in a request builder");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        assert!(
            self.open_nests.is_empty(),
            "unclosed nest: a bug in a request builder"
        );
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// CTRL_CMD_GETFAMILY for "IPVS".
pub fn get_family_request(seq: u32) -> Vec<u8> {
    let mut msg = MessageBuilder::new(GENL_ID_CTRL, NLM_F_REQUEST, seq, CTRL_CMD_GETFAMILY, 1);
    msg.string(CTRL_ATTR_FAMILY_NAME, IPVS_GENL_NAME);
    msg.finish()
}

pub fn get_info_request(family: u16, seq: u32) -> Vec<u8> {
    ipvs_message(family, NLM_F_REQUEST, seq, IPVS_CMD_GET_INFO).finish()
}

pub fn dump_services_request(family: u16, seq: u32) -> Vec<u8> {
    ipvs_message(
        family,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        IPVS_CMD_GET_SERVICE,
    )
    .finish()
}

/// GET_SERVICE without the dump flag: ESRCH when the service is absent.
pub fn get_service_request(family: u16, seq: u32, key: &ServiceKey) -> Vec<u8> {
    let mut msg = ipvs_message(family, NLM_F_REQUEST, seq, IPVS_CMD_GET_SERVICE);
    put_service_key(&mut msg, key);
    msg.finish()
}

pub fn dump_destinations_request(family: u16, seq: u32, key: &ServiceKey) -> Vec<u8> {
    let mut msg = ipvs_message(family, NLM_F_REQUEST | NLM_F_DUMP, seq, IPVS_CMD_GET_DEST);
    put_service_key(&mut msg, key);
    msg.finish()
}

/// SET_DEST with `weight` and everything else of `dest` as dumped: the
/// kernel replaces forwarding, thresholds and tunnel fields with what the
/// request carries, so all of them go back unchanged (shared/docs/ipvs-netlink.md).
pub fn set_destination_request(
    family: u16,
    seq: u32,
    service: &ServiceKey,
    dest: &Destination,
    weight: u32,
) -> Vec<u8> {
    let mut msg = ipvs_message(family, NLM_F_REQUEST | NLM_F_ACK, seq, IPVS_CMD_SET_DEST);
    put_service_key(&mut msg, service);
    msg.begin_nest(IPVS_CMD_ATTR_DEST)
        .addr(IPVS_DEST_ATTR_ADDR, &dest.addr)
        .be16(IPVS_DEST_ATTR_PORT, dest.port)
        .u16(IPVS_DEST_ATTR_ADDR_FAMILY, Family::of(&dest.addr).to_raw())
        .u32(IPVS_DEST_ATTR_FWD_METHOD, dest.forwarding.to_raw())
        .u32(IPVS_DEST_ATTR_WEIGHT, weight)
        .u32(IPVS_DEST_ATTR_U_THRESH, dest.upper_threshold)
        .u32(IPVS_DEST_ATTR_L_THRESH, dest.lower_threshold);
    // Absent tunnel attributes reset to 0, which is what a non-tunnel
    // destination has; send them whenever they carry anything.
    if dest.forwarding == Forwarding::Tunnel || dest.tunnel != Tunnel::default() {
        msg.u8(IPVS_DEST_ATTR_TUN_TYPE, dest.tunnel.kind.to_raw())
            .be16(IPVS_DEST_ATTR_TUN_PORT, dest.tunnel.port)
            .u16(IPVS_DEST_ATTR_TUN_FLAGS, dest.tunnel.flags);
    }
    msg.end_nest();
    msg.finish()
}

fn ipvs_message(family: u16, flags: u16, seq: u32, cmd: u8) -> MessageBuilder {
    MessageBuilder::new(family, flags, seq, cmd, IPVS_GENL_VERSION)
}

fn put_service_key(msg: &mut MessageBuilder, key: &ServiceKey) {
    msg.begin_nest(IPVS_CMD_ATTR_SERVICE)
        .u16(IPVS_SVC_ATTR_AF, key.family().to_raw());
    match key {
        ServiceKey::Address {
            protocol,
            addr,
            port,
        } => {
            msg.u16(IPVS_SVC_ATTR_PROTOCOL, protocol.to_raw())
                .addr(IPVS_SVC_ATTR_ADDR, addr)
                .be16(IPVS_SVC_ATTR_PORT, *port);
        }
        ServiceKey::Fwmark { mark, .. } => {
            msg.u32(IPVS_SVC_ATTR_FWMARK, *mark);
        }
    }
    msg.end_nest();
}
