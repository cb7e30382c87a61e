//! The netlink reply parsers on arbitrary datagrams: every parser on the
//! whole input, on each message's payload and on each attribute's value
//! (nests, to a few levels); errors say something, nothing panics, and
//! every slice handed out lies within its input.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prober_ipvs::{
    netlink::{
        attributes, messages, parse_destination, parse_family_id, parse_info, parse_service, reply,
        ParseError, Reply, NLMSG_HDR_LEN,
    },
    Family,
};

/// Nests deeper than this are not looked into (IPVS replies have three
/// levels: message, SERVICE/DEST, STATS).
const MAX_DEPTH: usize = 3;

fn said_something(e: &ParseError) {
    assert!(!e.0.trim().is_empty(), "an empty parse error");
}

fn within(inner: &[u8], outer: &[u8]) {
    let (start, end) = (
        outer.as_ptr() as usize,
        outer.as_ptr() as usize + outer.len(),
    );
    let at = inner.as_ptr() as usize;
    assert!(
        inner.is_empty() || (at >= start && at + inner.len() <= end),
        "a slice outside its input"
    );
}

/// Every attribute parser on `data`, then on each attribute's value.
fn attribute_parsers(data: &[u8], depth: usize) {
    for result in [
        parse_family_id(data).map(drop),
        parse_info(data).map(drop),
        parse_service(data).map(drop),
        parse_destination(data, Family::Ipv4).map(drop),
        parse_destination(data, Family::Ipv6).map(drop),
    ] {
        if let Err(e) = result {
            said_something(&e);
        }
    }
    let mut count = 0;
    for attribute in attributes(data) {
        count += 1;
        // Each attribute takes at least its 4-byte header.
        assert!(count <= data.len() / 4 + 1, "attributes() does not advance");
        match attribute {
            Ok(attribute) => {
                within(attribute.value, data);
                if depth < MAX_DEPTH {
                    attribute_parsers(attribute.value, depth + 1);
                }
            }
            Err(e) => said_something(&e),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    attribute_parsers(data, 1);
    let mut count = 0;
    for message in messages(data) {
        count += 1;
        assert!(
            count <= data.len() / NLMSG_HDR_LEN + 1,
            "messages() does not advance"
        );
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                said_something(&e);
                continue;
            }
        };
        within(message.payload, data);
        match reply(&message) {
            Ok(Reply::Data { attributes, .. }) => {
                within(attributes, message.payload);
                attribute_parsers(attributes, 1);
            }
            Ok(_) => {}
            Err(e) => said_something(&e),
        }
        attribute_parsers(message.payload, 1);
    }
});
