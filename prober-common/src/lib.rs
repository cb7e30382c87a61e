//! Types shared by the eBPF programs and the userspace daemon.
//!
//! Rules for map keys and values: `#[repr(C)]`, fixed-size integer fields
//! only (no bool, Option or enum), explicit padding fields so that no byte is
//! left uninitialised (the verifier and `bpftool` see every byte), and
//! `aya::Pod` implemented behind the `user` feature.
#![no_std]

/// Directory under bpffs where prober pins its maps.
pub const PIN_DIR: &str = "/sys/fs/bpf/prober";

/// Names of the maps in the eBPF object; a pinned map's file has the same name.
pub mod map_names {
    /// Per-CPU [`InterfaceCounters`](crate::InterfaceCounters) of every frame
    /// the XDP program saw on the interface it is attached to.
    pub const INTERFACE_COUNTERS: &str = "IFACE_COUNTERS";
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    /// The XDP program attached to the director's interface.
    pub const XDP_INGRESS: &str = "prober_xdp";
}

/// Frames and bytes the XDP program saw, one value per CPU (a
/// `BPF_MAP_TYPE_PERCPU_ARRAY` slot, so updates need no atomics).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InterfaceCounters {
    /// Frames seen.
    pub packets: u64,
    /// Sum of frame lengths from the Ethernet header on, as XDP sees them.
    pub bytes: u64,
}

impl InterfaceCounters {
    /// Adds another CPU's counters (userspace sums the per-CPU slots).
    pub fn saturating_add(self, other: Self) -> Self {
        Self {
            packets: self.packets.saturating_add(other.packets),
            bytes: self.bytes.saturating_add(other.bytes),
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain old data: #[repr(C)], integers only, no padding (checked
    // by the layout tests below).
    unsafe impl aya::Pod for super::InterfaceCounters {}
}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, offset_of, size_of};

    use super::*;

    #[test]
    fn interface_counters_layout_has_no_holes() {
        assert_eq!(size_of::<InterfaceCounters>(), 16);
        assert_eq!(align_of::<InterfaceCounters>(), 8);
        assert_eq!(offset_of!(InterfaceCounters, packets), 0);
        assert_eq!(offset_of!(InterfaceCounters, bytes), 8);
        // The fields fill the struct exactly: no padding byte anywhere.
        assert_eq!(size_of::<u64>() * 2, size_of::<InterfaceCounters>());
    }

    #[test]
    fn bpf_object_names_fit_the_kernel_limit() {
        // BPF_OBJ_NAME_LEN is 16 including the NUL: longer names are cut.
        for name in [map_names::INTERFACE_COUNTERS, program_names::XDP_INGRESS] {
            assert!(name.len() <= 15, "{name} is longer than 15 bytes");
        }
    }

    #[test]
    fn per_cpu_sum_saturates() {
        let a = InterfaceCounters {
            packets: u64::MAX - 1,
            bytes: 10,
        };
        let b = InterfaceCounters {
            packets: 5,
            bytes: 20,
        };
        assert_eq!(
            a.saturating_add(b),
            InterfaceCounters {
                packets: u64::MAX,
                bytes: 30
            }
        );
    }
}
