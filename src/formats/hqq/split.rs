//! HQQ row splits. The packed layout stacks slabs of the whole grouped tensor, so a slice is
//! re-packed from its unpacked codes. Rows `[r0, r1)` are flat codes `[r0*K, r1*K)`; a slice keeps
//! the group of every code when its flat boundaries fall on group boundaries (axis 1: multiples
//! of group_size; axis 0: multiples of the group count, each grouped row holding one code of
//! every group), and its grouped row count must suit the bit packing.

use std::ops::Range;

use crate::error::Result;
use crate::formats::hqq::{HqqWeight, Packing, packing};
use crate::formats::split::{RowSplit, bias_buffer, check_range, slice_rows, storage_bytes};

/// Grouped rows a packing needs a multiple of (3-bit pads its last slab instead).
fn packing_rows(p: &Packing) -> usize {
    if p.nbits == 3 { 1 } else { p.per_element }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl HqqWeight {
    /// A boundary's flat index must be a multiple of this: whole grouped rows (a grouped row is
    /// one group on axis 1, one code of every group on axis 0), as many as the packing needs.
    fn split_unit(&self) -> usize {
        self.grouping.grouped_shape().1 * packing_rows(&self.packing)
    }

    /// Grouped shape `(rows, cols)` of a slice of `rows` output rows.
    fn slice_grouped_shape(&self, rows: usize) -> (usize, usize) {
        let numel = rows * self.in_features;
        let (_, cols) = self.grouping.grouped_shape();
        (numel / cols, cols)
    }
}

impl RowSplit for HqqWeight {
    fn row_split_granularity(&self) -> usize {
        let unit = self.split_unit();
        unit / gcd(self.in_features, unit)
    }

    fn rows(&self, range: Range<usize>) -> Result<Self> {
        let granularity = self.row_split_granularity();
        check_range(&range, self.out_features, granularity, || {
            format!(
                "HQQ group_size {}, axis {}, {}-bit packing",
                self.grouping.group_size, self.grouping.axis, self.packing.nbits
            )
        })?;
        let k = self.in_features;
        let rows = range.len();
        let codes = packing::unpack(
            &self.packing,
            &self.packed,
            self.packed_rows,
            self.packed_cols,
            range.start * k..range.end * k,
        );
        let (grouped_rows, cols) = self.slice_grouped_shape(rows);
        let packed = packing::pack(&self.packing, &codes, grouped_rows, cols)?;
        let (group_size, groups) = match self.grouping.axis {
            1 => {
                let g = self.grouping.group_size;
                (g, range.start * k / g..range.end * k / g)
            }
            _ => (grouped_rows, 0..self.grouping.groups()),
        };
        Self::from_parts(
            rows,
            k,
            self.packing.nbits,
            group_size,
            self.grouping.axis,
            packed,
            self.scale[groups.clone()].to_vec(),
            self.zero[groups].to_vec(),
            self.bias.as_ref().map(|b| slice_rows(b, 1, &range)),
            self.compute_dtype,
        )
    }

    fn row_split_buffers(&self, rows: usize) -> Vec<(&'static str, usize)> {
        let (grouped_rows, cols) = self.slice_grouped_shape(rows);
        let packed_rows = grouped_rows.div_ceil(self.packing.per_element);
        let groups = match self.grouping.axis {
            1 => grouped_rows,
            _ => self.grouping.groups(),
        };
        vec![
            (
                "hqq W_q",
                storage_bytes(packed_rows * cols * self.packing.element_bytes),
            ),
            ("hqq scale", storage_bytes(4 * groups)),
            ("hqq zero", storage_bytes(4 * groups)),
            bias_buffer(self.bias.is_some(), rows),
        ]
    }
}
