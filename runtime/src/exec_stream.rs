//! Streamed weights: after an op that reads a streamed weight, the executor releases the
//! weight's pages (`madvise(MADV_DONTNEED)` on its range of the mapped bundle), so the
//! process holds only the weights of the running op besides the resident ones. The next
//! use maps them again from the file (the page cache when it still holds them).
//!
//! Only file-backed, read-only mappings are released: owned weights (heap memory, where
//! `MADV_DONTNEED` would zero the values) are left alone.

use memmap2::{Mmap, UncheckedAdvice};

use crate::ir::WeightData;
use crate::packed::Buf;
use crate::tensor::Bytes;

/// Releases the pages of `len` bytes at `offset` of `map` (rounded out to whole pages).
pub(crate) fn release_range(map: &Mmap, offset: usize, len: usize) {
    if len == 0 || offset.saturating_add(len) > map.len() {
        return;
    }
    // SAFETY: `map` is a read-only (`Mmap::map`) mapping of a file that is never written
    // in place (bundles are written to a new file and renamed). For such a private,
    // never-written mapping, MADV_DONTNEED only drops the process's page-table entries:
    // the next read faults the same bytes back in from the file, so every slice into the
    // mapping (also those other threads hold) keeps reading the same values. memmap2
    // rounds the range out to whole pages, which may include neighbouring bytes: they are
    // re-read from the file in the same way.
    let r = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, offset, len) };
    if let Err(e) = r {
        tracing::debug!("madvise(MADV_DONTNEED) of {len} bytes failed: {e}");
    }
}

/// Releases the pages of a weight's mapped bytes; owned bytes are kept.
pub fn release_weight(w: &WeightData) {
    match w {
        WeightData::Dense(t) => {
            if let Bytes::Mapped { map, offset, len } = t.bytes() {
                release_range(map, *offset, *len);
            }
        }
        WeightData::Packed(p) => {
            for (_, b) in p.buffers().iter() {
                if let Buf::Mapped { map, offset, len } = b {
                    release_range(map, *offset, *len);
                }
            }
        }
    }
}
