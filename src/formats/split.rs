//! Host-side row splits: output rows `[r0, r1)` of a quantized weight as an independent weight of
//! the same format, and a planner that cuts a weight into row ranges whose GPU buffers each stay
//! under a binding-size limit. A slice dequantizes to exactly the rows it was cut from, so a
//! weight too large for one binding can run as several layers whose outputs are concatenated.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::formats::{QuantFormat, QuantWeight};

/// Splitting a weight along its output rows.
pub trait RowSplit: QuantFormat + Sized {
    /// Row boundaries a split may use: multiples of this, and the last row. 1 for GPTQ and
    /// EETQ; HQQ's groups and bit packing can make it larger.
    fn row_split_granularity(&self) -> usize;

    /// Output rows `range` as a weight of their own (bias included), whose dequantization equals
    /// those rows of this weight's, bit for bit. Fails with [`Error::RowSplit`] when a boundary is
    /// not legal (see [`Self::row_split_granularity`]) or the range is empty or out of bounds.
    fn rows(&self, range: Range<usize>) -> Result<Self>;

    /// The storage buffers a GPU upload of a `rows`-row slice creates, by name, with their sizes
    /// in bytes as uploaded (padded to 4 bytes). `rows` must be a legal slice length.
    fn row_split_buffers(&self, rows: usize) -> Vec<(&'static str, usize)>;
}

/// Bytes of a storage buffer holding `raw` bytes: WGSL reads whole words, and no buffer is empty.
pub(crate) fn storage_bytes(raw: usize) -> usize {
    raw.div_ceil(4).max(1) * 4
}

/// The bias buffer of a `rows`-row slice: its values as f32, or one zero without a bias.
pub(crate) fn bias_buffer(has_bias: bool, rows: usize) -> (&'static str, usize) {
    ("bias", storage_bytes(4 * if has_bias { rows } else { 1 }))
}

/// Fails unless `range` is a non-empty part of `0..rows` whose ends are multiples of
/// `granularity` or `rows` itself; `why` says where the granularity comes from.
pub(crate) fn check_range(
    range: &Range<usize>,
    rows: usize,
    granularity: usize,
    why: impl FnOnce() -> String,
) -> Result<()> {
    let fail = |reason: String| Error::RowSplit {
        start: range.start,
        end: range.end,
        rows,
        reason,
    };
    if range.start >= range.end || range.end > rows {
        return Err(fail(format!(
            "the range must be non-empty and within 0..{rows}"
        )));
    }
    let legal = |r: usize| r.is_multiple_of(granularity) || r == rows;
    if !legal(range.start) || !legal(range.end) {
        return Err(fail(format!(
            "boundaries must be multiples of {granularity} rows or {rows} ({})",
            why()
        )));
    }
    Ok(())
}

/// Row `range` of a row-major `[_, cols]` table.
pub(crate) fn slice_rows<T: Clone>(values: &[T], cols: usize, range: &Range<usize>) -> Vec<T> {
    values[range.start * cols..range.end * cols].to_vec()
}

/// Columns `range` of every row of a row-major `[_, cols]` table.
pub(crate) fn slice_cols<T: Clone>(values: &[T], cols: usize, range: &Range<usize>) -> Vec<T> {
    values
        .chunks_exact(cols)
        .flat_map(|row| row[range.clone()].iter().cloned())
        .collect()
}

/// Cuts `weight` into consecutive row ranges covering all its rows, each as long as possible
/// (a multiple of the granularity, the last one possibly shorter) such that every GPU buffer of
/// the slice holds at most `max_binding_bytes`. Fails when even the smallest legal slice has a
/// buffer over the limit, naming that buffer.
pub fn plan_row_splits<W: RowSplit>(
    weight: &W,
    max_binding_bytes: usize,
) -> Result<Vec<Range<usize>>> {
    let rows = weight.out_features();
    let step = weight.row_split_granularity().min(rows);
    let fits = |n: usize| {
        weight
            .row_split_buffers(n)
            .into_iter()
            .find(|(_, bytes)| *bytes > max_binding_bytes)
    };
    if let Some((buffer, bytes)) = fits(step) {
        return Err(Error::Allocation {
            buffer: buffer.to_string(),
            bytes: bytes as u64,
            reason: format!(
                "over the binding limit of {max_binding_bytes} bytes even for the smallest \
                 row split ({step} of {rows} rows)"
            ),
        });
    }
    // Buffer sizes grow with the row count: binary search the most steps that fit.
    let (mut lo, mut hi) = (1, rows.div_ceil(step));
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits((mid * step).min(rows)).is_none() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let chunk = (lo * step).min(rows);
    Ok((0..rows)
        .step_by(chunk)
        .map(|start| start..(start + chunk).min(rows))
        .collect())
}

impl RowSplit for QuantWeight {
    fn row_split_granularity(&self) -> usize {
        match self {
            Self::Hqq(w) => w.row_split_granularity(),
            Self::Gptq(w) => w.row_split_granularity(),
            Self::Eetq(w) => w.row_split_granularity(),
        }
    }

    fn rows(&self, range: Range<usize>) -> Result<Self> {
        Ok(match self {
            Self::Hqq(w) => Self::Hqq(w.rows(range)?),
            Self::Gptq(w) => Self::Gptq(w.rows(range)?),
            Self::Eetq(w) => Self::Eetq(w.rows(range)?),
        })
    }

    fn row_split_buffers(&self, rows: usize) -> Vec<(&'static str, usize)> {
        match self {
            Self::Hqq(w) => w.row_split_buffers(rows),
            Self::Gptq(w) => w.row_split_buffers(rows),
            Self::Eetq(w) => w.row_split_buffers(rows),
        }
    }
}
