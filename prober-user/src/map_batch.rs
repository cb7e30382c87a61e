//! Batched reads and writes of BPF array maps (`BPF_MAP_LOOKUP_BATCH`,
//! `BPF_MAP_UPDATE_BATCH`, Linux 5.6+), which aya does not offer: one
//! syscall per map per tick instead of one per probe, which is what bounds
//! a director with tens of thousands of real servers.

use std::{
    io,
    marker::PhantomData,
    os::fd::{AsFd, AsRawFd},
};

use aya::{
    maps::{Array, IterableMap, MapData, PerCpuArray},
    Pod,
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The bpf(2) syscall with `attr` as its `union bpf_attr` member.
///
/// # Safety
/// `attr` must be the member `cmd` takes, and its pointers must point to
/// buffers as large as the kernel will read or write for it.
pub(crate) unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<()> {
    // SAFETY: the caller's promise; the kernel checks the size we pass.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut A,
            std::mem::size_of::<A>() as u32,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Reads entries `start..start + count` of an array map into `values` (raw
/// bytes, `stride` per entry), reusing its allocation.
fn lookup(
    map: &MapData,
    start: u32,
    count: u32,
    stride: usize,
    values: &mut Vec<u8>,
    keys: &mut Vec<u32>,
) -> io::Result<()> {
    keys.clear();
    keys.resize(count as usize, 0);
    // Filled by the kernel, not zeroed first: it is megabytes per tick at
    // scale. Only what the kernel wrote becomes part of the vector.
    values.clear();
    values.reserve(count as usize * stride);
    let mut done = 0u32;
    // The kernel starts after the key `in_batch` names (none: at 0).
    let mut next = start.wrapping_sub(1);
    while done < count {
        let mut attr = BatchAttr {
            in_batch: if done == 0 && start == 0 {
                0
            } else {
                &next as *const u32 as u64
            },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys[done as usize..].as_mut_ptr() as u64,
            // SAFETY: within the capacity reserved above.
            values: unsafe { values.as_mut_ptr().add(done as usize * stride) } as u64,
            count: count - done,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: the batch member, its buffers sized for `count - done`
        // entries past `done`.
        let result = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        done += attr.count;
        match result {
            Ok(()) => {}
            // The end of the map: `count` was beyond max_entries.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        if attr.count == 0 {
            break;
        }
    }
    // SAFETY: the kernel wrote `done` entries of `stride` bytes, within
    // the capacity.
    unsafe { values.set_len(done as usize * stride) };
    Ok(())
}

/// Entries `start..start + count` of an array map, read in one syscall
/// into a buffer that the next read reuses (no allocation per tick).
pub struct ArraySnapshot<T> {
    bytes: Vec<u8>,
    keys: Vec<u32>,
    /// The index of the first entry read.
    start: usize,
    /// Bytes per CPU value (8-byte aligned for per-CPU maps).
    slot: usize,
    /// Values per entry: 1, or the possible CPUs of a per-CPU map.
    cpus: usize,
    _value: PhantomData<T>,
}

impl<T: Pod> Default for ArraySnapshot<T> {
    fn default() -> Self {
        Self {
            bytes: Vec::new(),
            keys: Vec::new(),
            start: 0,
            slot: std::mem::size_of::<T>(),
            cpus: 1,
            _value: PhantomData,
        }
    }
}

impl<T: Pod> ArraySnapshot<T> {
    pub fn read(&mut self, map: &Array<MapData, T>, count: u32) -> io::Result<()> {
        self.read_range(map, 0, count)
    }

    pub fn read_range(
        &mut self,
        map: &Array<MapData, T>,
        start: u32,
        count: u32,
    ) -> io::Result<()> {
        self.slot = std::mem::size_of::<T>();
        self.cpus = 1;
        self.start = start as usize;
        lookup(
            map.map(),
            start,
            count,
            self.slot,
            &mut self.bytes,
            &mut self.keys,
        )
    }

    pub fn read_per_cpu(
        &mut self,
        map: &PerCpuArray<MapData, T>,
        count: u32,
        cpus: usize,
    ) -> io::Result<()> {
        self.read_per_cpu_range(map, 0, count, cpus)
    }

    pub fn read_per_cpu_range(
        &mut self,
        map: &PerCpuArray<MapData, T>,
        start: u32,
        count: u32,
        cpus: usize,
    ) -> io::Result<()> {
        // The kernel lays each CPU's value out on 8-byte boundaries.
        self.slot = std::mem::size_of::<T>().next_multiple_of(8);
        self.cpus = cpus;
        self.start = start as usize;
        lookup(
            map.map(),
            start,
            count,
            self.slot * cpus,
            &mut self.bytes,
            &mut self.keys,
        )
    }

    /// Entries read.
    pub fn len(&self) -> usize {
        self.bytes.len() / (self.slot * self.cpus)
    }

    /// The index of the first entry read.
    pub fn start(&self) -> usize {
        self.start
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// CPU `cpu`'s value of entry `index` (the only one of a plain array:
    /// cpu 0), if it was read.
    pub fn get(&self, index: usize, cpu: usize) -> Option<T> {
        let index = index.checked_sub(self.start)?;
        if cpu >= self.cpus || index >= self.len() {
            return None;
        }
        let at = (index * self.cpus + cpu) * self.slot;
        let bytes = &self.bytes[at..at + std::mem::size_of::<T>()];
        // SAFETY: T is Pod and `bytes` holds exactly one T.
        Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
    }

    /// Every CPU's value of entry `index`.
    pub fn per_cpu(&self, index: usize) -> impl Iterator<Item = T> + '_ {
        (0..self.cpus).filter_map(move |cpu| self.get(index, cpu))
    }
}

/// Writes `values[i]` at index `i` of an array map, for every i, in one
/// syscall.
pub fn write_array_prefix<T: Pod>(map: &Array<MapData, T>, values: &[T]) -> io::Result<()> {
    if values.is_empty() {
        return Ok(());
    }
    let keys: Vec<u32> = (0..values.len() as u32).collect();
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: values.len() as u32,
        map_fd: map.map().fd().as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: the batch member, with `values.len()` keys and values.
    unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) }?;
    if attr.count as usize != values.len() {
        return Err(io::Error::other(format!(
            "batch update wrote {} of {} entries",
            attr.count,
            values.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attribute_matches_the_kernels_layout() {
        // struct { u64 in_batch, out_batch, keys, values; u32 count,
        // map_fd; u64 elem_flags, flags; } in include/uapi/linux/bpf.h.
        assert_eq!(std::mem::size_of::<BatchAttr>(), 56);
    }
}
