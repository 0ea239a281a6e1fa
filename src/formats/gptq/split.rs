//! GPTQ row splits. Output `n` is column `n` of `qweight` and `scales` and field `n` of each
//! `qzeros` row, so any row boundary is legal; `qzeros` is re-packed because its fields run
//! along the outputs. `g_idx` is shared.

use std::ops::Range;

use crate::error::Result;
use crate::formats::split::{
    RowSplit, bias_buffer, check_range, slice_cols, slice_rows, storage_bytes,
};

use super::GptqWeight;
use super::packing::{Stream, words_for};

impl RowSplit for GptqWeight {
    fn row_split_granularity(&self) -> usize {
        1
    }

    fn rows(&self, range: Range<usize>) -> Result<Self> {
        check_range(&range, self.out_features, 1, String::new)?;
        let bits = self.config.bits;
        let rows = range.len();
        let zero_words = words_for(rows, bits)?;
        let mut qzeros = vec![0u32; self.groups * zero_words];
        for g in 0..self.groups {
            let from = Stream::qzeros_row(g, self.qzeros_cols(), bits);
            let to = Stream::qzeros_row(g, zero_words, bits);
            for (j, n) in range.clone().enumerate() {
                to.put(&mut qzeros, j, from.get(&self.qzeros, n));
            }
        }
        Ok(Self {
            config: self.config,
            in_features: self.in_features,
            out_features: rows,
            qweight: slice_cols(&self.qweight, self.out_features, &range),
            qzeros,
            scales: slice_cols(&self.scales, self.out_features, &range),
            g_idx: self.g_idx.clone(),
            bias: self.bias.as_ref().map(|b| slice_rows(b, 1, &range)),
            groups: self.groups,
        })
    }

    fn row_split_buffers(&self, rows: usize) -> Vec<(&'static str, usize)> {
        let zero_words = (rows * self.config.bits as usize).div_ceil(32);
        vec![
            (
                "gptq qweight",
                storage_bytes(4 * self.qweight_rows() * rows),
            ),
            ("gptq qzeros", storage_bytes(4 * self.groups * zero_words)),
            ("gptq scales", storage_bytes(4 * self.groups * rows)),
            ("gptq g_idx", storage_bytes(4 * self.g_idx.len())),
            bias_buffer(self.bias.is_some(), rows),
        ]
    }
}
