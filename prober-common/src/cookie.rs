//! Probe cookies: the stateless proof that a reply answers one of our probes.
//!
//! A TCP probe's sequence number (and an ICMP probe's payload) is a keyed
//! hash (SipHash-2-4, the function the kernel uses for SYN cookies) of the
//! probe's addresses, ports and protocol under a secret that userspace
//! rotates, as masscan and ZMap do. A reply counts only if it echoes the
//! cookie: an off-path sender who does not see the probes cannot forge one,
//! and a reply to a probe from before the last-but-one rotation is stale.
//! Each send also hashes in a nonce (the target's send count), so a reply
//! answers exactly one probe: a late answer to the previous one is no
//! answer to the current one.
//! The same code runs in the eBPF programs and in userspace.

const C0: u64 = 0x736f_6d65_7073_6575;
const C1: u64 = 0x646f_7261_6e64_6f6d;
const C2: u64 = 0x6c79_6765_6e65_7261;
const C3: u64 = 0x7465_6462_7974_6573;

#[inline(always)]
fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[2] = v[2].rotate_left(32);
}

/// SipHash-2-4 of a message of exactly five little-endian u64 words.
#[inline(always)]
pub fn siphash24_words(key: [u64; 2], words: [u64; 5]) -> u64 {
    let mut v = [key[0] ^ C0, key[1] ^ C1, key[0] ^ C2, key[1] ^ C3];
    let mut i = 0;
    while i < 5 {
        let m = words[i];
        v[3] ^= m;
        sip_round(&mut v);
        sip_round(&mut v);
        v[0] ^= m;
        i += 1;
    }
    let last = 40u64 << 56; // message length 40 bytes, no tail bytes
    v[3] ^= last;
    sip_round(&mut v);
    sip_round(&mut v);
    v[0] ^= last;
    v[2] ^= 0xff;
    sip_round(&mut v);
    sip_round(&mut v);
    sip_round(&mut v);
    sip_round(&mut v);
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

#[inline(always)]
fn addr_words(addr: &[u8; 16]) -> (u64, u64) {
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&addr[..8]);
    hi.copy_from_slice(&addr[8..]);
    (u64::from_le_bytes(lo), u64::from_le_bytes(hi))
}

/// Bits of the per-send nonce that go into a cookie: enough to tell a
/// probe from the ones before it (16 million sends of one target).
pub const NONCE_BITS: u32 = 24;

/// The cookie of a probe from `local_addr:local_port` to
/// `remote_addr:remote_port` (ports as they sit in the packet, network byte
/// order; for ICMP the echo identifier and 0), sent as the target's
/// `nonce`-th probe: a reply echoing it answers that probe and no other.
#[inline(always)]
pub fn probe_cookie(
    secret: [u64; 2],
    local_addr: &[u8; 16],
    remote_addr: &[u8; 16],
    local_port: u16,
    remote_port: u16,
    protocol: u8,
    nonce: u32,
) -> u32 {
    let (l0, l1) = addr_words(local_addr);
    let (r0, r1) = addr_words(remote_addr);
    let nonce = (nonce & ((1 << NONCE_BITS) - 1)) as u64;
    let ports =
        local_port as u64 | (remote_port as u64) << 16 | (protocol as u64) << 32 | nonce << 40;
    siphash24_words(secret, [l0, l1, r0, r1, ports]) as u32
}

#[cfg(test)]
mod tests {
    extern crate std;
    use core::hash::Hasher;

    use super::*;

    #[test]
    fn matches_reference_siphash24() {
        let key_bytes: [u8; 16] = core::array::from_fn(|i| i as u8);
        let key = [
            u64::from_le_bytes(key_bytes[..8].try_into().unwrap()),
            u64::from_le_bytes(key_bytes[8..].try_into().unwrap()),
        ];
        let message: [u8; 40] = core::array::from_fn(|i| (i * 7 + 3) as u8);
        let words: [u64; 5] = core::array::from_fn(|i| {
            u64::from_le_bytes(message[i * 8..i * 8 + 8].try_into().unwrap())
        });
        let mut reference = siphasher::sip::SipHasher24::new_with_keys(key[0], key[1]);
        reference.write(&message);
        assert_eq!(siphash24_words(key, words), reference.finish());
    }

    #[test]
    fn cookie_depends_on_every_input() {
        let secret = [1, 2];
        let a = [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let b = [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let base = probe_cookie(secret, &a, &b, 1000, 80, 6, 9);
        assert_ne!(base, probe_cookie([1, 3], &a, &b, 1000, 80, 6, 9));
        assert_ne!(base, probe_cookie(secret, &b, &a, 1000, 80, 6, 9));
        assert_ne!(base, probe_cookie(secret, &a, &b, 1001, 80, 6, 9));
        assert_ne!(base, probe_cookie(secret, &a, &b, 1000, 81, 6, 9));
        assert_ne!(base, probe_cookie(secret, &a, &b, 1000, 80, 1, 9));
        assert_ne!(
            base,
            probe_cookie(secret, &a, &b, 1000, 80, 6, 8),
            "the previous probe's"
        );
        assert_ne!(
            base,
            probe_cookie(secret, &a, &b, 1000, 80, 6, 10),
            "the next probe's"
        );
        assert_eq!(base, probe_cookie(secret, &a, &b, 1000, 80, 6, 9));
    }
}
