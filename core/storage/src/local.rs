//! The filesystem backend's data path: staged writes and blob reads on local files.
//!
//! OpenDAL still names, stats, renames, lists and deletes every key of the `fs`
//! backend; only the bulk bytes take this path, because OpenDAL's fs writer keeps
//! every written byte dirty in the page cache until `close`, then `fsync`s it all at
//! once (measured at 230–620 MB/s for 1 GiB on the 2-core reference machine, against
//! 1.3–2.5 GB/s with the bounded dirty window below), and its reader copies each
//! piece into a freshly allocated buffer.
//!
//! - Writes are *write-behind*: every [`WINDOW`] bytes the kernel is asked to start
//!   writing the window back (`sync_file_range`), and the window before it is waited
//!   for, so at most two windows are dirty at any time and the final `fdatasync` is
//!   short. A chunk is acknowledged only after `fdatasync`, as before.
//! - Reads map the (immutable) blob file and hand out slices of the mapping, so the
//!   bytes go from the page cache to the socket with one copy. Each slice is faulted
//!   in on a blocking thread before it is yielded, so no async worker ever waits on
//!   the disk. Blob files are never modified after they are published (content
//!   addressed, renamed into place), and an unlinked file stays mapped intact, so a
//!   concurrent delete cannot change the bytes a reader sees.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{self, IoSlice, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;

use crate::ByteStream;

/// Write-behind window: writeback of each window starts as soon as it is full.
const WINDOW: u64 = 8 * 1024 * 1024;
/// Bytes gathered before one vectored write.
const GATHER: usize = 1024 * 1024;
/// Size of the slices a read hands out.
const SLICE: usize = 4 * 1024 * 1024;

/// Local files under the backend's root.
#[derive(Clone, Debug)]
pub(crate) struct LocalFiles {
    root: PathBuf,
}

impl LocalFiles {
    pub(crate) fn new(root: impl Into<PathBuf>) -> Self {
        LocalFiles { root: root.into() }
    }

    /// The file behind a key from [`crate::layout`].
    pub(crate) fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Flush a directory entry change (a rename into `dir`) to disk.
    pub(crate) fn sync_dir_of(&self, key: &str) -> io::Result<()> {
        match self.path(key).parent() {
            Some(dir) => File::open(dir)?.sync_all(),
            None => Ok(()),
        }
    }

    /// Stream a blob file's bytes `start..end` (end exclusive) from a mapping.
    pub(crate) async fn read(&self, key: &str, range: Option<(u64, u64)>) -> io::Result<ByteStream> {
        let path = self.path(key);
        let map = tokio::task::spawn_blocking(move || map_file(&path)).await.map_err(io::Error::other)??;
        let len = map.as_ref().map_or(0, |m| m.len() as u64);
        let (start, end) = range.unwrap_or((0, len));
        if start > end || end > len {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "range past the end of the blob"));
        }
        Ok(Box::pin(MappedSlices::new(map, start as usize, end as usize)))
    }
}

/// Map a whole file read-only; `None` for an empty file (which cannot be mapped).
fn map_file(path: &Path) -> io::Result<Option<Arc<memmap2::Mmap>>> {
    let file = File::open(path)?;
    if file.metadata()?.len() == 0 {
        return Ok(None);
    }
    // SAFETY: blob files are immutable once published (see the module docs): no
    // process truncates or rewrites them, so the mapping's bytes never change.
    let map = unsafe { memmap2::MmapOptions::new().map(&file)? };
    let _ = map.advise(memmap2::Advice::Sequential);
    Ok(Some(Arc::new(map)))
}

/// A slice of a shared mapping, owned by a [`Bytes`].
struct MapSlice {
    map: Arc<memmap2::Mmap>,
    start: usize,
    end: usize,
}

impl Drop for MapSlice {
    /// Unmap the pages this slice covered once it has been sent, so a long read
    /// keeps only the slices in flight mapped (they stay in the page cache). Only
    /// pages wholly inside the slice are released; a neighbour sharing an edge
    /// page keeps it.
    fn drop(&mut self) {
        const PAGE: usize = 4096;
        let base = self.map.as_ptr() as usize;
        let first = (base + self.start).next_multiple_of(PAGE) - base;
        let last = (base + self.end) / PAGE * PAGE - base;
        if last > first {
            // SAFETY: `DontNeed` on a read-only private file mapping only drops
            // page-table entries; later reads fault the file's bytes back in.
            let _ = unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, last - first) };
        }
    }
}

impl AsRef<[u8]> for MapSlice {
    fn as_ref(&self) -> &[u8] {
        &self.map[self.start..self.end]
    }
}

/// Yields [`SLICE`]-sized pieces of a mapping, each made resident first on a
/// blocking thread.
struct MappedSlices {
    map: Option<Arc<memmap2::Mmap>>,
    next: usize,
    end: usize,
    pending: Option<tokio::task::JoinHandle<io::Result<Bytes>>>,
}

impl MappedSlices {
    fn new(map: Option<Arc<memmap2::Mmap>>, start: usize, end: usize) -> Self {
        MappedSlices { map, next: start, end, pending: None }
    }

    /// Start faulting in the next slice, if any.
    fn prefetch(&mut self) {
        let Some(map) = &self.map else { return };
        if self.next >= self.end {
            return;
        }
        let start = self.next;
        let end = (start + SLICE).min(self.end);
        self.next = end;
        let map = map.clone();
        self.pending = Some(tokio::task::spawn_blocking(move || {
            let _ = map.advise_range(memmap2::Advice::WillNeed, start, end - start);
            populate(&map[start..end]);
            Ok(Bytes::from_owner(MapSlice { map, start, end }))
        }));
    }
}

/// Touch one byte per page so every page of `bytes` is resident and mapped.
fn populate(bytes: &[u8]) {
    let mut sum = 0u8;
    for i in (0..bytes.len()).step_by(4096) {
        sum = sum.wrapping_add(unsafe { std::ptr::read_volatile(bytes.as_ptr().add(i)) });
    }
    std::hint::black_box(sum);
}

impl Stream for MappedSlices {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.pending.is_none() {
            self.prefetch();
        }
        let Some(pending) = self.pending.as_mut() else { return Poll::Ready(None) };
        match std::pin::Pin::new(pending).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                self.pending = None;
                let item = r.map_err(io::Error::other).and_then(|r| r);
                if item.is_ok() {
                    // Overlap faulting in the next slice with sending this one.
                    self.prefetch();
                }
                Poll::Ready(Some(item))
            }
        }
    }
}


/// Appends bytes to a staging file with a bounded dirty window; runs on a blocking
/// thread, fed through a channel by the task reading the request body.
pub(crate) struct StagedWriter {
    file: File,
    /// File offset of the next byte.
    pos: u64,
    /// End of the last window whose writeback was started.
    started: u64,
    /// End of the last window waited for.
    waited: u64,
    gathered: Vec<Bytes>,
    gathered_len: usize,
}

impl StagedWriter {
    /// Open (creating) the staging file for appending at `offset`, which must be its
    /// current length.
    pub(crate) fn open(path: &Path, offset: u64) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let len = file.metadata()?.len();
        if len != offset {
            return Err(io::Error::other(format!("staging file holds {len} bytes, expected {offset}")));
        }
        let window = offset - offset % WINDOW;
        Ok(StagedWriter { file, pos: offset, started: window, waited: window, gathered: Vec::new(), gathered_len: 0 })
    }

    pub(crate) fn push(&mut self, bytes: Bytes) -> io::Result<()> {
        self.gathered_len += bytes.len();
        self.gathered.push(bytes);
        if self.gathered_len >= GATHER {
            self.flush_gathered()?;
        }
        Ok(())
    }

    fn flush_gathered(&mut self) -> io::Result<()> {
        let mut bufs: Vec<Bytes> = std::mem::take(&mut self.gathered);
        self.pos += self.gathered_len as u64;
        self.gathered_len = 0;
        let mut first = 0;
        while first < bufs.len() {
            let slices: Vec<IoSlice<'_>> = bufs[first..].iter().map(|b| IoSlice::new(b)).collect();
            let mut n = match self.file.write_vectored(&slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            drop(slices);
            while first < bufs.len() && n >= bufs[first].len() {
                n -= bufs[first].len();
                first += 1;
            }
            if n > 0 {
                let rest = bufs[first].slice(n..);
                bufs[first] = rest;
            }
        }
        self.write_behind();
        Ok(())
    }

    /// Start writeback of every full window, and wait for all but the newest one.
    fn write_behind(&mut self) {
        while self.pos - self.started >= WINDOW {
            sync_range(&self.file, self.started, WINDOW, false);
            self.started += WINDOW;
        }
        while self.started - self.waited > WINDOW {
            sync_range(&self.file, self.waited, WINDOW, true);
            self.waited += WINDOW;
        }
    }

    /// Write what is gathered and make the file durable.
    pub(crate) fn finish(mut self) -> io::Result<()> {
        if self.gathered_len > 0 {
            self.flush_gathered()?;
        }
        self.file.sync_data()
    }
}

/// Ask the kernel to write back `len` bytes at `offset` (and, with `wait`, wait for
/// them). Purely a hint for pacing: durability comes from the final `fdatasync`.
#[cfg(target_os = "linux")]
fn sync_range(file: &File, offset: u64, len: u64, wait: bool) {
    let flags = if wait {
        libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER
    } else {
        libc::SYNC_FILE_RANGE_WRITE
    };
    // SAFETY: plain syscall on an open descriptor; errors only lose the hint.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset as libc::off64_t, len as libc::off64_t, flags);
    }
}

#[cfg(not(target_os = "linux"))]
fn sync_range(_file: &File, _offset: u64, _len: u64, _wait: bool) {}
