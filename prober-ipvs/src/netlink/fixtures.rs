//! Kernel-style replies for the client's unit tests.

use super::*;
use crate::{Destination, ServiceKey};

/// One GET_SERVICE dump message for `key` (scheduler rr, no stats).
pub fn service_message(family: u16, seq: u32, flags: u16, key: &ServiceKey) -> Vec<u8> {
    let mut full = MessageBuilder::new(family, flags, seq, IPVS_CMD_NEW_SERVICE, 1);
    full.begin_nest(IPVS_CMD_ATTR_SERVICE)
        .u16(IPVS_SVC_ATTR_AF, key.family().to_raw());
    match key {
        ServiceKey::Address {
            protocol,
            addr,
            port,
        } => {
            full.u16(IPVS_SVC_ATTR_PROTOCOL, protocol.to_raw())
                .addr(IPVS_SVC_ATTR_ADDR, addr)
                .be16(IPVS_SVC_ATTR_PORT, *port);
        }
        ServiceKey::Fwmark { mark, .. } => {
            full.u32(IPVS_SVC_ATTR_FWMARK, *mark);
        }
    }
    full.string(IPVS_SVC_ATTR_SCHED_NAME, "rr");
    full.end_nest();
    full.finish()
}

/// One GET_DEST dump message for `dest`.
pub fn destination_message(family: u16, seq: u32, dest: &Destination) -> Vec<u8> {
    let mut full = MessageBuilder::new(family, NLM_F_MULTI, seq, IPVS_CMD_NEW_DEST, 1);
    full.begin_nest(IPVS_CMD_ATTR_DEST)
        .addr(IPVS_DEST_ATTR_ADDR, &dest.addr)
        .be16(IPVS_DEST_ATTR_PORT, dest.port)
        .u32(IPVS_DEST_ATTR_FWD_METHOD, dest.forwarding.to_raw())
        .u32(IPVS_DEST_ATTR_WEIGHT, dest.weight)
        .u32(IPVS_DEST_ATTR_U_THRESH, dest.upper_threshold)
        .u32(IPVS_DEST_ATTR_L_THRESH, dest.lower_threshold);
    full.end_nest();
    full.finish()
}

/// NLMSG_DONE for `seq`.
pub fn done(seq: u32) -> Vec<u8> {
    control_message(NLMSG_DONE, NLM_F_MULTI, seq, 0)
}

/// NLMSG_ERROR for `seq`: 0 is an ack, else a positive errno.
pub fn ack(seq: u32, errno: i32) -> Vec<u8> {
    let mut msg = control_message(NLMSG_ERROR, 0, seq, -errno);
    // NETLINK_CAP_ACK: the request's header follows, its payload not.
    msg.extend_from_slice(&[0u8; NLMSG_HDR_LEN]);
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_ne_bytes());
    msg
}

fn control_message(kind: u16, flags: u16, seq: u32, code: i32) -> Vec<u8> {
    let mut msg = Vec::new();
    msg.extend_from_slice(&20u32.to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&code.to_ne_bytes());
    msg
}
