//! A DNS check: one query over UDP (RFC 1035); up when the server answers
//! it with NOERROR and at least one record.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::Deserialize;
use tokio::net::UdpSocket;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum Record {
    A,
    #[serde(rename = "AAAA")]
    Aaaa,
    #[serde(rename = "MX")]
    Mx,
    #[serde(rename = "TXT")]
    Txt,
    #[serde(rename = "NS")]
    Ns,
    #[serde(rename = "SOA")]
    Soa,
}

impl Record {
    fn code(self) -> u16 {
        match self {
            Record::A => 1,
            Record::Ns => 2,
            Record::Soa => 6,
            Record::Mx => 15,
            Record::Txt => 16,
            Record::Aaaa => 28,
        }
    }
}

pub async fn socket(server: IpAddr) -> Result<UdpSocket, String> {
    let local: IpAddr = match server {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    UdpSocket::bind((local, 0))
        .await
        .map_err(|e| format!("opening a UDP socket: {e}"))
}

/// Checks that `name` is a DNS name the wire format can carry.
pub fn valid_name(name: &str) -> Result<(), String> {
    encode_name(name).map(|_| ())
}

fn encode_name(name: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("'{name}' is not a DNS name (empty or long label)"));
        }
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    if out.len() > 255 {
        return Err(format!("'{name}' is longer than 255 bytes"));
    }
    Ok(out)
}

pub async fn query(
    socket: UdpSocket,
    server: SocketAddr,
    name: &str,
    record: Record,
) -> Result<(), String> {
    let id: u16 = rand_id();
    let mut packet = Vec::with_capacity(64);
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    packet.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // one question
    packet.extend_from_slice(&encode_name(name)?);
    packet.extend_from_slice(&record.code().to_be_bytes());
    packet.extend_from_slice(&1u16.to_be_bytes()); // IN
    socket
        .send_to(&packet, server)
        .await
        .map_err(|e| format!("sending the query: {e}"))?;
    let mut answer = [0u8; 4096];
    // Anything not answering this query (another id, another source) is
    // ignored; the check's timeout bounds the wait.
    loop {
        let (n, from) = socket
            .recv_from(&mut answer)
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        if from != server || n < 12 || answer[..2] != id.to_be_bytes() {
            continue;
        }
        let flags = u16::from_be_bytes([answer[2], answer[3]]);
        if flags & 0x8000 == 0 {
            continue; // not a response
        }
        let rcode = flags & 0x000f;
        if rcode != 0 {
            return Err(format!("DNS answer code {} for {name}", rcode_name(rcode)));
        }
        let answers = u16::from_be_bytes([answer[6], answer[7]]);
        if answers == 0 {
            return Err(format!("DNS answer for {name} has no {record:?} record"));
        }
        return Ok(());
    }
}

fn rcode_name(rcode: u16) -> String {
    match rcode {
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => n.to_string(),
    }
}

fn rand_id() -> u16 {
    let mut id = [0u8; 2];
    // getrandom(2) cannot fail for two bytes once the pool is ready; a
    // fixed id would still work, only less well against stray answers.
    unsafe { libc::getrandom(id.as_mut_ptr().cast(), 2, 0) };
    u16::from_ne_bytes(id)
}
