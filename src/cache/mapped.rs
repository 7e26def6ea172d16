//! Large bodies kept in sealed memory files, so that hits on plain HTTP/1.1 connections leave
//! through `sendfile(2)` instead of a copy from user memory into the socket.
//!
//! A stored body of at least `cache.sendfile_min_size` bytes is written once into a
//! `memfd_create(2)` file, sealed against any change of size or content, and mapped read-only.
//! The mapping is an ordinary `Bytes` (via `Bytes::from_owner`), so everything else — ranges,
//! TLS, HTTP/2, coalesced readers — reads it as memory like any other body. The mapping's
//! address range is recorded in a process-wide table; the plain-TCP stream under hyper
//! (`server::plain::Plain`) looks up each large slice hyper hands it to write, and when the
//! slice lies inside a mapping it asks the kernel to send those pages from the file instead.
//!
//! Why by hand: the saving is the kernel's copy of every byte of every hit from user memory
//! into socket buffers. On loopback with 1 MiB objects that copy is about half the server's
//! CPU per request (measured: 2.2k vs 4.1k requests per CPU-second, writev against
//! sendfile). nginx gets the same from `sendfile on` over its cache files; hyper cannot, since
//! it only sees bytes in memory. No crate joins a `Bytes` to the file behind it.
//!
//! Limits, kept on purpose: each memory file holds one file descriptor and one mapping, so at
//! most a quarter of the open-file limit (and of `vm.max_map_count`) is used for them; past
//! that, and whenever the kernel refuses, the body is simply kept on the heap.

// The one place where the crate uses `unsafe`: mapping a file and reading the mapping as a
// slice. Why it is sound is written at each block.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use bytes::Bytes;

/// Slices shorter than this are written the ordinary way. Two system calls (the head with
/// `MSG_MORE`, then `sendfile`) instead of one `writev` only pay once the copy they spare is
/// large; it also keeps HTTP/2's 16 KiB DATA frames on `writev`.
pub const MIN_SEND: usize = 32 << 10;

/// Address ranges of live mappings: start address -> (length, file).
static REGIONS: RwLock<BTreeMap<usize, Region>> = RwLock::new(BTreeMap::new());
/// Live mappings, checked before the table so that a process without any pays no lock.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Bytes held in live mappings.
static LIVE_BYTES: AtomicU64 = AtomicU64::new(0);
/// Bodies that were meant for a memory file but stayed on the heap (cap reached, or refused).
static FALLBACKS: AtomicU64 = AtomicU64::new(0);

struct Region {
    len: usize,
    fd: Arc<OwnedFd>,
}

/// The table for writing. A panic elsewhere while it was held cannot leave it half-changed
/// (each change is one insert or remove), so a poisoned lock is simply taken over.
fn regions_mut() -> std::sync::RwLockWriteGuard<'static, BTreeMap<usize, Region>> {
    REGIONS
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Memory files now, for the metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Bodies kept in memory files.
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Bodies of that size kept on the heap instead, since the process started.
    pub fallbacks: u64,
}

/// Memory files in use now and the fallbacks so far.
pub fn usage() -> Usage {
    Usage {
        objects: LIVE.load(Ordering::Relaxed) as u64,
        bytes: LIVE_BYTES.load(Ordering::Relaxed),
        fallbacks: FALLBACKS.load(Ordering::Relaxed),
    }
}

/// Counts a body kept on the heap; says so once in the log, when it first happens.
fn fell_back(why: &dyn std::fmt::Display, len: usize) {
    if FALLBACKS.fetch_add(1, Ordering::Relaxed) == 0 {
        tracing::warn!(
            reason = %why,
            len,
            "a large body is kept on the heap, not in a memory file; hits on it are copied \
             (edgecache_memory_file_fallbacks_total counts them)"
        );
    } else {
        tracing::debug!(reason = %why, len, "body kept on the heap: no memory file");
    }
}

/// How many memory files may be open at once: a quarter of the open-file limit and of the
/// mapping limit, so client connections and origin sockets always keep the larger part.
fn cap() -> usize {
    static CAP: OnceLock<usize> = OnceLock::new();
    *CAP.get_or_init(|| {
        let files = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(1024);
        let maps = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(65530);
        usize::try_from(files.min(maps) / 4).unwrap_or(usize::MAX)
    })
}

/// The file behind a slice that lies inside a mapped body, and the slice's offset in it.
///
/// Sound to use for sending because the caller holds the slice, hence the `Bytes` that owns
/// the mapping, so the mapping cannot be removed (and its address reused) meanwhile.
pub fn find(slice: &[u8]) -> Option<(Arc<OwnedFd>, u64)> {
    if slice.len() < MIN_SEND || LIVE.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let start = slice.as_ptr() as usize;
    // Poisoning is taken over as in `regions_mut`.
    let regions = REGIONS
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let (&base, region) = regions.range(..=start).next_back()?;
    let offset = start - base;
    if offset.checked_add(slice.len())? > region.len {
        return None;
    }
    Some((region.fd.clone(), offset as u64))
}

/// A sealed, read-only mapping of a memory file; unmapped when the last `Bytes` goes.
struct Mapping {
    ptr: std::ptr::NonNull<std::ffi::c_void>,
    len: usize,
}

// SAFETY: the mapping is read-only and its file is sealed against writes (F_SEAL_WRITE), so
// no thread can change the bytes behind it; sharing and sending a pointer to immutable memory
// between threads is sound.
unsafe impl Send for Mapping {}
// SAFETY: as above, only shared reads of immutable memory.
unsafe impl Sync for Mapping {}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` is the start of a live PROT_READ mapping of exactly `len` bytes (made in
        // `store`, removed only in `drop`). The file is sealed with F_SEAL_WRITE, F_SEAL_SHRINK
        // and F_SEAL_SEAL before mapping: its bytes cannot change and it cannot shrink under
        // the mapping (which would turn reads into SIGBUS), so the slice is valid, initialised
        // and immutable for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<u8>(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Out of the table first, so no lookup can return this range once it is unmapped.
        let removed = regions_mut().remove(&(self.ptr.as_ptr() as usize));
        if removed.is_some() {
            LIVE.fetch_sub(1, Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(self.len as u64, Ordering::Relaxed);
        }
        // SAFETY: the range was mapped in `store` and is unmapped once, here; the `Bytes` that
        // owned this `Mapping` is gone, so no slice into it remains.
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.as_ptr(), self.len) } {
            tracing::warn!(error = %e, "could not unmap a stored body");
        }
    }
}

/// The body of `len` bytes made of `chunks`, kept in a sealed memory file and mapped.
/// `None` when the limit on memory files is reached or the kernel refuses; the caller then
/// keeps the body on the heap.
pub fn store(chunks: &[Bytes], len: usize) -> Option<Bytes> {
    use rustix::fs::{MemfdFlags, SealFlags};

    if len == 0 {
        return None;
    }
    // Reserve a place first, so concurrent stores cannot overshoot the cap.
    if LIVE.fetch_add(1, Ordering::Relaxed) >= cap() {
        LIVE.fetch_sub(1, Ordering::Relaxed);
        fell_back(
            &format_args!(
                "{} memory files open: a quarter of the open-file or mapping limit",
                cap()
            ),
            len,
        );
        return None;
    }
    let made = (|| -> std::io::Result<Mapping> {
        let fd = rustix::fs::memfd_create(
            "edgecache-body",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )?;
        rustix::fs::ftruncate(&fd, len as u64)?;
        let mut at = 0u64;
        for chunk in chunks {
            let mut rest: &[u8] = chunk;
            while !rest.is_empty() {
                let n = rustix::io::pwrite(&fd, rest, at)?;
                if n == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                rest = &rest[n..];
                at += n as u64;
            }
        }
        if at != len as u64 {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        rustix::fs::fcntl_add_seals(
            &fd,
            SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
        )?;
        // SAFETY: a fresh shared read-only mapping chosen by the kernel (null hint), of a file
        // that is `len` bytes long and sealed as described in `as_ref`; it overlaps nothing.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ,
                rustix::mm::MapFlags::SHARED,
                &fd,
                0,
            )?
        };
        let ptr = std::ptr::NonNull::new(ptr).ok_or(std::io::ErrorKind::Other)?;
        let fd = Arc::new(fd);
        let mapping = Mapping { ptr, len };
        regions_mut().insert(ptr.as_ptr() as usize, Region { len, fd });
        Ok(mapping)
    })();
    match made {
        Ok(mapping) => {
            LIVE_BYTES.fetch_add(len as u64, Ordering::Relaxed);
            Some(Bytes::from_owner(mapping))
        }
        Err(e) => {
            LIVE.fetch_sub(1, Ordering::Relaxed);
            fell_back(&e, len);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ seed)
            .collect::<Vec<u8>>()
    }

    #[test]
    fn a_stored_body_reads_back_byte_for_byte() {
        let a = pattern(70_000, 1);
        let b = pattern(13_001, 2);
        let body = store(&[Bytes::from(a.clone()), Bytes::from(b.clone())], 83_001).expect("store");
        assert_eq!(body.len(), 83_001);
        assert_eq!(&body[..70_000], &a[..]);
        assert_eq!(&body[70_000..], &b[..]);
    }

    #[test]
    fn slices_of_a_stored_body_find_their_file_and_offset() {
        let data = pattern(200_000, 3);
        let body = store(&[Bytes::from(data.clone())], data.len()).expect("store");
        let (fd, off) = find(&body[..]).expect("whole body");
        assert_eq!(off, 0);
        let part = body.slice(10_000..150_000);
        let (fd2, off2) = find(&part).expect("inner slice");
        assert_eq!(off2, 10_000);
        assert!(Arc::ptr_eq(&fd, &fd2));
        // What the file holds at that offset is what the slice holds.
        let mut back = vec![0u8; part.len()];
        let n = rustix::io::pread(&*fd2, &mut back, off2).expect("pread");
        assert_eq!(&back[..n], &part[..n]);
        // Short slices and heap memory are not looked up.
        assert!(find(&body[..100]).is_none());
        assert!(find(&data[..]).is_none());
    }

    #[test]
    fn a_dropped_body_is_forgotten_and_the_file_cannot_change() {
        let data = pattern(100_000, 4);
        let body = store(&[Bytes::from(data)], 100_000).expect("store");
        let (fd, _) = find(&body).expect("found");
        // Sealed: neither writes nor truncation are allowed.
        assert!(rustix::io::pwrite(&*fd, b"x", 0).is_err());
        assert!(rustix::fs::ftruncate(&*fd, 10).is_err());
        // The table holds the other reference to the file until the body goes.
        assert_eq!(Arc::strong_count(&fd), 2);
        drop(body);
        assert_eq!(Arc::strong_count(&fd), 1);
    }

    #[test]
    fn a_body_whose_chunks_do_not_add_up_is_refused() {
        let before = usage().fallbacks;
        assert!(store(&[Bytes::from(vec![1u8; 5000])], 6000).is_none());
        // Counted for the operator: the body stays on the heap.
        assert!(usage().fallbacks > before);
        assert!(store(&[], 0).is_none());
    }
}
