//! Shared by the fuzz targets: the framing of inputs made of several files, and the CPU work
//! every loaded weight goes through.

use quantadapt::formats::QuantFormat;
use quantadapt::formats::QuantWeight;
use quantadapt::formats::split::{RowSplit, plan_row_splits};
use quantadapt::tensor::Matrix;

/// Splits `data` into `N` parts: each part but the last is a little-endian u32 length followed
/// by that many bytes; the last part is the rest. `None` when the lengths overrun the input.
pub fn parts<const N: usize>(mut data: &[u8]) -> Option<[&[u8]; N]> {
    let mut out = [&[][..]; N];
    for part in out.iter_mut().take(N - 1) {
        let (len, rest) = data.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len) as usize;
        if len > rest.len() {
            return None;
        }
        (*part, data) = rest.split_at(len);
    }
    out[N - 1] = data;
    Some(out)
}

/// A small deterministic input of `cols` features.
pub fn input(rows: usize, cols: usize) -> Matrix {
    let data = (0..rows * cols)
        .map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5)
        .collect();
    Matrix { rows, cols, data }
}

/// What a loaded weight must survive: dequantization, a CPU forward, and row splits planned
/// under a limit of a quarter of its largest buffer.
pub fn exercise(w: &QuantWeight) {
    let _ = w.dequantize();
    let _ = w.forward_cpu(&input(2, w.in_features()));
    let largest = w
        .row_split_buffers(w.out_features())
        .into_iter()
        .map(|(_, bytes)| bytes)
        .max()
        .unwrap_or(0);
    if let Ok(plan) = plan_row_splits(w, largest / 4) {
        for range in plan {
            let _ = w.rows(range).map(|s| s.dequantize());
        }
    }
}
