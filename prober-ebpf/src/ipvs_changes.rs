//! A change signal for IPVS's configuration: kretprobes on the calls
//! through which every tool changes it (generic netlink for ipvsadm and
//! keepalived, setsockopt for older tools) count the successful ones, so
//! the daemon re-reads IPVS when it changed instead of dumping every
//! destination every few seconds. Calls by the prober that loaded these
//! programs (its own weight writes) are not counted.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    programs::RetProbeContext,
};

use crate::IPVS_CHANGES;

/// The loading prober's process id, set at load (read-only data): its own
/// calls are not a change to follow. 0: every call counts.
#[unsafe(no_mangle)]
static PROBER_TGID: u32 = 0;

#[inline(always)]
pub fn note_ipvs_change(ctx: &RetProbeContext) {
    // A failed call changed nothing.
    let returned: i32 = ctx.ret();
    if returned != 0 {
        return;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: a global the loader may override; read, never written here.
    let own = unsafe { core::ptr::read_volatile(&PROBER_TGID) };
    if own != 0 && tgid == own {
        return;
    }
    let Some(changes) = IPVS_CHANGES.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: slot 0 of an array map, valid while the program runs; IPVS's
    // own mutex orders the calls, and a lost increment under a race still
    // leaves the count changed, which is all the daemon compares.
    let changes = unsafe { &mut *changes };
    changes.count += 1;
    changes.last_tgid = tgid;
    if let Ok(comm) = bpf_get_current_comm() {
        changes.last_comm = comm;
    }
}
