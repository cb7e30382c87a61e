//! Whether probe frames reach the wire. XDP frames redirected onto a veth
//! are delivered only when the peer end runs an XDP program (or has GRO
//! on); otherwise the kernel drops them without a trace, and every real
//! server would look dead. The probing interface's driver is asked once;
//! on a veth, a few rounds of probes without a single reply of any kind
//! get one warning with the fix.

/// Probes each target must have sent, none answered, before the warning.
const ROUNDS: u64 = 3;
/// Targets looked at: enough to tell, few enough to read each tick.
pub const SAMPLE: usize = 64;

/// `struct ethtool_drvinfo` (linux/ethtool.h), for ETHTOOL_GDRVINFO.
#[repr(C)]
struct DriverInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
const SIOCETHTOOL: libc::c_ulong = 0x8946;

/// The kernel driver of interface `name` ("veth", "mlx5_core", ...), if
/// the kernel says.
pub fn driver(name: &str) -> Option<String> {
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: plain socket(2); the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: all-zero is a valid value of both plain C structs.
    let mut info: DriverInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.as_bytes()) {
        *slot = *byte as libc::c_char;
    }
    request.ifr_ifru.ifru_data = (&mut info as *mut DriverInfo).cast();
    // SAFETY: SIOCETHTOOL with GDRVINFO writes at most one DriverInfo into
    // `info`, which outlives the call.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut request) };
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// Watches for probes that vanish on a veth without an XDP peer.
#[derive(Debug)]
pub struct DeliveryWatch {
    /// Still looking: a veth, and neither a reply nor the warning yet.
    watching: bool,
}

impl DeliveryWatch {
    pub fn new(interface: &str) -> Self {
        Self {
            watching: driver(interface).as_deref() == Some("veth"),
        }
    }

    pub fn watching(&self) -> bool {
        self.watching
    }

    /// Looks at up to [`SAMPLE`] targets' (sent, replied) counts; returns
    /// true once, when each has sent [`ROUNDS`] probes and none of them
    /// ever got a reply.
    pub fn vanished(&mut self, sample: impl Iterator<Item = (u64, bool)>) -> bool {
        if !self.watching {
            return false;
        }
        let mut looked = 0;
        for (sent, replied) in sample.take(SAMPLE) {
            if replied {
                self.watching = false; // frames get through
                return false;
            }
            if sent < ROUNDS {
                return false; // too early to tell
            }
            looked += 1;
        }
        if looked == 0 {
            return false;
        }
        self.watching = false;
        true
    }
}

/// The warning, with the fix.
pub fn warning(interface: &str) -> String {
    format!(
        "{interface} is a veth and no probe sent on it has had any reply: frames sent from XDP \
         onto a veth are dropped unless its peer end runs an XDP program or has GRO on. \
         Fix it on the peer: `ethtool -K PEER gro on` (or attach an XDP program to the peer)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_no_veth_driver() {
        assert_ne!(driver("lo").as_deref(), Some("veth"));
        assert_eq!(driver("no-such-if0"), None);
    }

    #[test]
    fn warns_once_after_rounds_without_any_reply() {
        let mut watch = DeliveryWatch { watching: true };
        assert!(!watch.vanished([(1, false), (1, false)].into_iter()));
        assert!(watch.vanished([(3, false), (4, false)].into_iter()));
        assert!(!watch.vanished([(9, false)].into_iter()), "once");
        let mut watch = DeliveryWatch { watching: true };
        assert!(!watch.vanished([(5, false), (5, true)].into_iter()));
        assert!(!watch.vanished([(9, false)].into_iter()), "a reply ends it");
    }
}
