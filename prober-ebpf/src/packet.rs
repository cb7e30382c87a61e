//! Header layouts, bounds-checked packet access and checksums. Multi-byte
//! fields are kept in network byte order as they sit in the packet.

use core::mem::size_of;

use aya_ebpf::programs::{TcContext, XdpContext};

/// A packet the program may read directly: XDP frames and TC skbs.
pub trait Frame {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const TCP_HLEN: usize = 20;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
/// The ARP operation of a reply, at its offset in an ARP header.
pub const ARP_OP_REPLY: u16 = 2;
pub const ARP_OP_OFFSET: usize = 6;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// IPv4 header with no options, the only one prober writes or matches.
pub const IPV4_VERSION_IHL_PLAIN: u8 = 0x45;
/// Fragment offset and More-Fragments bits: any set means a fragment.
pub const IPV4_FRAGMENT_MASK: u16 = 0x3fff;
pub const IPV4_DONT_FRAGMENT: u16 = 0x4000;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpHdr {
    pub source: u16,
    pub dest: u16,
    pub seq: [u8; 4],
    pub ack_seq: [u8; 4],
    /// Data offset in the high nibble.
    pub doff: u8,
    pub flags: u8,
    pub window: u16,
    pub check: u16,
    pub urg_ptr: u16,
}

/// ICMP echo header (also the first 8 bytes of any ICMP message).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IcmpHdr {
    pub icmp_type: u8,
    pub code: u8,
    pub check: u16,
    pub id: u16,
    pub seq: u16,
}

/// The TCP/IPv4 pseudo header that the TCP checksum covers.
#[repr(C)]
#[derive(Clone, Copy)]
struct PseudoHdr {
    saddr: [u8; 4],
    daddr: [u8; 4],
    zero: u8,
    protocol: u8,
    len: u16,
}

/// A pointer to a `T` at `offset` in the packet, if the packet holds it.
#[inline(always)]
pub fn ptr_at<C: Frame, T>(ctx: &C, offset: usize) -> Result<*mut T, ()> {
    let start = ctx.start();
    if start + offset + size_of::<T>() > ctx.end() {
        return Err(());
    }
    Ok((start + offset) as *mut T)
}

/// Reads a `T` at `offset` (packet data need not be aligned).
#[inline(always)]
pub fn read_at<C: Frame, T: Copy>(ctx: &C, offset: usize) -> Result<T, ()> {
    // SAFETY: ptr_at checked that the packet holds size_of::<T>() bytes there.
    Ok(unsafe { core::ptr::read_unaligned(ptr_at::<C, T>(ctx, offset)?) })
}

/// Writes a `T` at `offset`.
#[inline(always)]
pub fn write_at<T: Copy>(ctx: &XdpContext, offset: usize, value: T) -> Result<(), ()> {
    // SAFETY: ptr_at checked that the packet holds size_of::<T>() bytes there.
    unsafe { core::ptr::write_unaligned(ptr_at::<XdpContext, T>(ctx, offset)?, value) };
    Ok(())
}

/// Sum of a value's bytes as native-endian 16-bit words (the Internet
/// checksum is byte-order independent when stored back natively).
#[inline(always)]
pub fn sum16<T: Copy>(value: &T) -> u32 {
    let words = size_of::<T>() / 2;
    let p = value as *const T as *const u16;
    let mut sum = 0u32;
    let mut i = 0;
    while i < words {
        // SAFETY: i < size_of::<T>() / 2 words inside *value.
        sum += unsafe { core::ptr::read_unaligned(p.add(i)) } as u32;
        i += 1;
    }
    sum
}

/// Folds a 32-bit one's-complement sum into the 16-bit checksum field value.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// An IPv4 header without options, checksum filled in.
#[inline(always)]
pub fn ipv4_header(saddr: [u8; 4], daddr: [u8; 4], protocol: u8, payload_len: usize) -> Ipv4Hdr {
    let mut ip = Ipv4Hdr {
        version_ihl: IPV4_VERSION_IHL_PLAIN,
        tos: 0,
        tot_len: ((IPV4_HLEN + payload_len) as u16).to_be(),
        id: 0,
        frag_off: IPV4_DONT_FRAGMENT.to_be(),
        ttl: 64,
        protocol,
        check: 0,
        saddr,
        daddr,
    };
    ip.check = fold(sum16(&ip));
    ip
}

/// The TCP checksum of `segment` (header and options, no payload).
#[inline(always)]
pub fn tcp_checksum<T: Copy>(saddr: [u8; 4], daddr: [u8; 4], segment: &T) -> u16 {
    let pseudo = PseudoHdr {
        saddr,
        daddr,
        zero: 0,
        protocol: IPPROTO_TCP,
        len: (size_of::<T>() as u16).to_be(),
    };
    fold(sum16(&pseudo) + sum16(segment))
}

/// The first 4 bytes of a 16-byte map address.
#[inline(always)]
pub fn v4(addr: &[u8; 16]) -> [u8; 4] {
    [addr[0], addr[1], addr[2], addr[3]]
}

/// An IPv4 address as a 16-byte map address.
#[inline(always)]
pub fn v4_to_16(addr: [u8; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0] = addr[0];
    out[1] = addr[1];
    out[2] = addr[2];
    out[3] = addr[3];
    out
}
