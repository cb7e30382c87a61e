//! Checks made before touching the kernel, so that a missing privilege,
//! filesystem or interface is reported as such rather than as a raw errno.

use std::{ffi::CString, path::Path};

use thiserror::Error;

/// bpffs's magic number in statfs(2)'s f_type.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

#[derive(Debug, Error)]
pub enum PreflightError {
    #[error(
        "prober needs root, or the capabilities CAP_BPF and CAP_NET_ADMIN, to load eBPF \
         programs and attach them (effective capabilities here: {0:#x}); run it as root"
    )]
    NotPrivileged(u64),
    #[error(
        "no BPF filesystem is mounted at {0}; prober pins its maps there. \
         Mount it with: mount -t bpf bpf {0}"
    )]
    NoBpffs(String),
    #[error("no network interface named '{0}' (`ip link` lists the interfaces)")]
    UnknownInterface(String),
    #[error(
        "'{0}' is the loopback interface: real servers are probed through the interface \
         that reaches them (`ip route get REAL_SERVER` names it)"
    )]
    Loopback(String),
}

/// Fails unless this process may load and attach eBPF programs.
pub fn check_privileges() -> Result<(), PreflightError> {
    let caps = effective_capabilities();
    let has = |cap: u32| caps & (1 << cap) != 0;
    if has(CAP_NET_ADMIN) && (has(CAP_BPF) || has(CAP_SYS_ADMIN)) {
        Ok(())
    } else {
        Err(PreflightError::NotPrivileged(caps))
    }
}

fn effective_capabilities() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// The BPF filesystem's usual place.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Makes sure `bpffs_root` is on a bpffs: when it is the usual
/// `/sys/fs/bpf` and nothing is mounted there (`ip netns exec` remounts
/// /sys and leaves it empty), mounts one and says so. Returns whether it
/// mounted; fails naming the place otherwise.
pub fn ensure_bpffs(bpffs_root: &Path) -> Result<bool, PreflightError> {
    if check_bpffs(bpffs_root).is_ok() {
        return Ok(false);
    }
    if bpffs_root != Path::new(BPFFS) {
        return check_bpffs(bpffs_root).map(|()| false);
    }
    let target = CString::new(BPFFS).expect("no NUL in a constant");
    let kind = CString::new("bpf").expect("no NUL in a constant");
    // SAFETY: NUL-terminated strings that outlive the call; no data.
    let rc = unsafe {
        libc::mount(
            kind.as_ptr(),
            target.as_ptr(),
            kind.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(PreflightError::NoBpffs(bpffs_root.display().to_string()));
    }
    check_bpffs(bpffs_root).map(|()| true)
}

/// Fails unless `dir` (or the nearest existing parent) is on a bpffs.
pub fn check_bpffs(bpffs_root: &Path) -> Result<(), PreflightError> {
    let path = CString::new(bpffs_root.as_os_str().as_encoded_bytes())
        .map_err(|_| PreflightError::NoBpffs(bpffs_root.display().to_string()))?;
    // SAFETY: statfs only writes into the zeroed struct we pass.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(path.as_ptr(), &mut stat) };
    if rc == 0 && stat.f_type as i64 == BPF_FS_MAGIC {
        Ok(())
    } else {
        Err(PreflightError::NoBpffs(bpffs_root.display().to_string()))
    }
}

/// Returns the interface's index, or an error naming it.
pub fn interface_index(name: &str) -> Result<u32, PreflightError> {
    let unknown = || PreflightError::UnknownInterface(name.to_string());
    let c_name = CString::new(name).map_err(|_| unknown())?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c_name.as_ptr()) } {
        0 => Err(unknown()),
        index => Ok(index),
    }
}

/// The index of the interface to probe through: any but the loopback,
/// whose frames the datapath takes for its own send requests.
pub fn probing_interface_index(name: &str) -> Result<u32, PreflightError> {
    match interface_index(name)? {
        prober_common::SEND_REQUEST_IFINDEX => Err(PreflightError::Loopback(name.to_string())),
        index => Ok(index),
    }
}

/// Whether interface `index` still exists (under any name: a renamed
/// interface keeps its programs). Only "no such device" counts as gone; any
/// other failure of the lookup says nothing and counts as present.
pub fn interface_exists(index: u32) -> bool {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname needs.
    if !unsafe { libc::if_indextoname(index, name.as_mut_ptr()) }.is_null() {
        return true;
    }
    let errno = std::io::Error::last_os_error().raw_os_error();
    !matches!(errno, Some(libc::ENXIO) | Some(libc::ENODEV))
}

/// The first IPv4 address of an interface, if it has one.
pub fn interface_ipv4(name: &str) -> Option<std::net::Ipv4Addr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: a node of the list getifaddrs returned, not yet freed.
        let e = unsafe { &*entry };
        entry = e.ifa_next;
        if e.ifa_addr.is_null() || e.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated name and a sockaddr of the stated family.
        let matches = unsafe { std::ffi::CStr::from_ptr(e.ifa_name) }.to_bytes() == name.as_bytes();
        if matches && unsafe { (*e.ifa_addr).sa_family } as i32 == libc::AF_INET {
            let v4 = unsafe { &*(e.ifa_addr as *const libc::sockaddr_in) };
            found = Some(std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)));
            break;
        }
    }
    // SAFETY: the list from getifaddrs above.
    unsafe { libc::freeifaddrs(list) };
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_its_ipv4_address() {
        assert_eq!(interface_ipv4("lo"), Some(std::net::Ipv4Addr::LOCALHOST));
        assert_eq!(interface_ipv4("no-such-if0"), None);
    }

    #[test]
    fn unknown_interface_is_named_in_the_error() {
        let err = interface_index("no-such-if0").unwrap_err();
        assert_eq!(
            err.to_string(),
            "no network interface named 'no-such-if0' (`ip link` lists the interfaces)"
        );
    }

    #[test]
    fn the_loopback_is_no_probing_interface() {
        let err = probing_interface_index("lo").unwrap_err();
        assert!(err.to_string().contains("'lo' is the loopback"), "{err}");
    }

    #[test]
    fn loopback_has_an_index() {
        assert!(interface_index("lo").unwrap() > 0);
    }

    #[test]
    fn a_plain_directory_is_not_bpffs() {
        let err = check_bpffs(Path::new("/tmp")).unwrap_err();
        assert!(err.to_string().contains("mount -t bpf bpf /tmp"), "{err}");
    }
}
