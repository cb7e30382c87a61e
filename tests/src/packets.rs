//! Builds test frames byte by byte, independently of the eBPF code, with
//! correct checksums, and reads back the fields tests check.

/// Internet checksum of `data` (big-endian words).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa];
pub const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb];

pub fn ethernet(dst: [u8; 6], src: [u8; 6], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 packet; `options` (a multiple of 4 bytes) go after the header.
pub fn ipv4(
    src: [u8; 4],
    dst: [u8; 4],
    protocol: u8,
    frag_off: u16,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let ihl = 5 + options.len() / 4;
    let total = ihl * 4 + payload.len();
    let mut h = vec![(4 << 4) | ihl as u8, 0];
    h.extend_from_slice(&(total as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&frag_off.to_be_bytes());
    h.extend_from_slice(&[64, protocol, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(options);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

pub struct Tcp<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub options: &'a [u8],
}

pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

pub fn tcp(src: [u8; 4], dst: [u8; 4], t: &Tcp) -> Vec<u8> {
    let doff = (20 + t.options.len()) / 4;
    let mut s = Vec::new();
    s.extend_from_slice(&t.src_port.to_be_bytes());
    s.extend_from_slice(&t.dst_port.to_be_bytes());
    s.extend_from_slice(&t.seq.to_be_bytes());
    s.extend_from_slice(&t.ack.to_be_bytes());
    s.extend_from_slice(&[(doff as u8) << 4, t.flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    s.extend_from_slice(t.options);
    let c = tcp_checksum(src, dst, &s);
    s[16..18].copy_from_slice(&c.to_be_bytes());
    s
}

pub fn tcp_checksum(src: [u8; 4], dst: [u8; 4], segment: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(segment);
    checksum(&pseudo)
}

/// An ICMP message: type, code, the 4 "rest of header" bytes, then data.
pub fn icmp(icmp_type: u8, code: u8, rest: [u8; 4], data: &[u8]) -> Vec<u8> {
    let mut m = vec![icmp_type, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(data);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// A whole Ethernet/IPv4/TCP frame.
pub fn tcp_frame(src: [u8; 4], dst: [u8; 4], t: &Tcp) -> Vec<u8> {
    ethernet(
        MAC_B,
        MAC_A,
        0x0800,
        &ipv4(src, dst, 6, 0, &[], &tcp(src, dst, t)),
    )
}

/// Reads a big-endian u16 / u32 at `at`.
pub fn be16(frame: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

pub fn be32(frame: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(frame[at..at + 4].try_into().unwrap())
}

/// A whole Ethernet/IPv4/UDP frame; `with_checksum` false leaves the UDP
/// checksum 0 (none).
pub fn udp_frame(
    src: [u8; 4],
    dst: [u8; 4],
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
    with_checksum: bool,
) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&src_port.to_be_bytes());
    d.extend_from_slice(&dst_port.to_be_bytes());
    d.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    if with_checksum {
        let c = l4_checksum(src, dst, 17, &d);
        d[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
    }
    ethernet(MAC_B, MAC_A, 0x0800, &ipv4(src, dst, 17, 0, &[], &d))
}

/// The TCP or UDP checksum over the pseudo header and `segment`.
pub fn l4_checksum(src: [u8; 4], dst: [u8; 4], protocol: u8, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, protocol]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(segment);
    checksum(&pseudo)
}

/// Whether an Ethernet/IPv4/TCP-or-UDP frame's IP and L4 checksums verify
/// (a UDP checksum of 0 means none).
pub fn checksums_valid(frame: &[u8]) -> bool {
    let ip = &frame[14..34];
    if checksum(ip) != 0 {
        return false;
    }
    let src: [u8; 4] = ip[12..16].try_into().unwrap();
    let dst: [u8; 4] = ip[16..20].try_into().unwrap();
    let total = be16(frame, 16) as usize;
    let segment = &frame[34..14 + total];
    if ip[9] == 17 && be16(segment, 6) == 0 {
        return true;
    }
    l4_checksum(src, dst, ip[9], segment) == 0
}
