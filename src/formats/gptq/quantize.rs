//! Round-to-nearest GPTQ quantization (no Hessian, no error feedback): AutoGPTQ's min-max
//! `find_params` per (group, output), then the codes recomputed from the fp16 scales, as
//! AutoGPTQ's `pack()` does.

use crate::error::{Error, Result, check_finite};
use crate::tensor::{Matrix, round_f16};

use super::packing::{Stream, words_for};
use super::{GptqConfig, GptqWeight, GptqZeros, check_g_idx, default_g_idx};

/// See [`GptqWeight::quantize_rtn`].
pub(super) fn quantize_rtn(
    w: &Matrix,
    config: GptqConfig,
    g_idx: Option<Vec<u32>>,
) -> Result<GptqWeight> {
    config.validate()?;
    check_finite("weight", &w.data)?;
    let (out_features, in_features) = (w.rows, w.cols);
    if in_features == 0 || out_features == 0 || w.data.len() != in_features * out_features {
        return Err(Error::shape(
            "weight",
            "a non-empty [out, in] matrix",
            &[w.rows, w.cols],
        ));
    }
    let groups = config.groups(in_features);
    let g_idx = match g_idx {
        Some(g) => {
            check_g_idx("g_idx", &g, in_features, groups)?;
            g
        }
        None => default_g_idx(in_features, &config),
    };
    let params = find_params(w, &g_idx, groups, &config)?;
    Ok(GptqWeight {
        config,
        in_features,
        out_features,
        qweight: pack_codes(w, &g_idx, &params, &config)?,
        qzeros: pack_zeros(&params.zeros, out_features, groups, &config)?,
        scales: params.scales,
        g_idx,
        bias: None,
        groups,
    })
}

/// Per (group, output) parameters, row-major `[groups, out]`.
struct GroupParams {
    /// Already rounded to f16, as stored.
    scales: Vec<f32>,
    zeros: Vec<u32>,
}

/// `find_params` over the members of each group (`g_idx[k] == g`) of every output row of `w`.
fn find_params(
    w: &Matrix,
    g_idx: &[u32],
    groups: usize,
    config: &GptqConfig,
) -> Result<GroupParams> {
    let n_out = w.rows;
    // The range always includes 0, so starting both ends at 0 is find_params' clamp.
    let mut lo = vec![0f32; groups * n_out];
    let mut hi = vec![0f32; groups * n_out];
    for n in 0..n_out {
        for (v, g) in w.row(n).iter().zip(g_idx) {
            let i = *g as usize * n_out + n;
            lo[i] = lo[i].min(*v);
            hi[i] = hi[i].max(*v);
        }
    }
    let mut scales = Vec::with_capacity(lo.len());
    let mut zeros = Vec::with_capacity(lo.len());
    for (index, (l, h)) in lo.into_iter().zip(hi).enumerate() {
        let (scale, zero) = min_max_params(l, h, config);
        let scale = round_f16(scale);
        if !scale.is_finite() {
            return Err(Error::NonFinite {
                name: "scales".to_string(),
                index,
                value: scale,
            });
        }
        scales.push(scale);
        zeros.push(zero);
    }
    Ok(GroupParams { scales, zeros })
}

/// `(scale, zero)` of one group from its range `lo <= 0 <= hi`, in f32.
fn min_max_params(mut lo: f32, mut hi: f32, config: &GptqConfig) -> (f32, u32) {
    let max_code = config.max_code();
    if config.sym {
        hi = hi.max(lo.abs());
        if lo < 0.0 {
            lo = -hi;
        }
    }
    if lo == 0.0 && hi == 0.0 {
        (lo, hi) = (-1.0, 1.0);
    }
    let scale = (hi - lo) / max_code as f32;
    let zero = if config.sym {
        max_code.div_ceil(2)
    } else {
        (-lo / scale).round_ties_even() as u32
    };
    (scale, zero)
}

/// `qweight`, `[ceil(K*bits/32), N]`: the code of every weight, packed down its column.
fn pack_codes(
    w: &Matrix,
    g_idx: &[u32],
    params: &GroupParams,
    config: &GptqConfig,
) -> Result<Vec<u32>> {
    let n_out = w.rows;
    let mut qweight = vec![0u32; words_for(w.cols, config.bits)? * n_out];
    for n in 0..n_out {
        let column = Stream::qweight_column(n, n_out, config.bits);
        for (k, (v, g)) in w.row(n).iter().zip(g_idx).enumerate() {
            let p = *g as usize * n_out + n;
            let q = code(*v, params.scales[p], params.zeros[p], config.max_code());
            column.put(&mut qweight, k, q);
        }
    }
    Ok(qweight)
}

/// `qzeros`, `[groups, ceil(N*bits/32)]`, in the configured v1 or v2 convention.
fn pack_zeros(
    zeros: &[u32],
    out_features: usize,
    groups: usize,
    config: &GptqConfig,
) -> Result<Vec<u32>> {
    let cols = words_for(out_features, config.bits)?;
    let mut qzeros = vec![0u32; groups * cols];
    for (g, row_zeros) in zeros.chunks_exact(out_features).enumerate() {
        let row = Stream::qzeros_row(g, cols, config.bits);
        for (n, z) in row_zeros.iter().enumerate() {
            let stored = match config.zeros {
                // Masked by `put`: a zero of 0 is stored as all ones, as AutoGPTQ's v1 does.
                GptqZeros::V1 => z.wrapping_sub(1),
                GptqZeros::V2 => *z,
            };
            row.put(&mut qzeros, n, stored);
        }
    }
    Ok(qzeros)
}

/// `clamp(round(w / scale) + zero, 0, max_code)` with round half to even. A scale that
/// underflowed to 0 in f16 dequantizes to 0 whatever the code, so the code is the zero.
fn code(w: f32, scale: f32, zero: u32, max_code: u32) -> u32 {
    if scale == 0.0 {
        return zero;
    }
    ((w / scale).round_ties_even() + zero as f32).clamp(0.0, max_code as f32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gptq::GptqZeros;

    fn config(bits: u32, sym: bool) -> GptqConfig {
        GptqConfig {
            bits,
            group_size: None,
            sym,
            desc_act: false,
            zeros: GptqZeros::V1,
        }
    }

    #[test]
    fn symmetric_zero_is_the_midpoint() {
        for (bits, zero) in [(2, 2), (3, 4), (4, 8), (8, 128)] {
            let (scale, z) = min_max_params(-0.3, 0.1, &config(bits, true));
            assert_eq!(z, zero);
            assert_eq!(scale, 0.6 / ((1 << bits) - 1) as f32);
        }
    }

    #[test]
    fn asymmetric_range_includes_zero() {
        let (scale, zero) = min_max_params(0.0, 1.5, &config(4, false));
        assert_eq!((scale, zero), (0.1, 0));
        let (scale, zero) = min_max_params(-1.5, 0.0, &config(4, false));
        assert_eq!((scale, zero), (0.1, 15));
        // An all-zero group spans [-1, 1]: 1 / (2/15) is 7.4999995 in f32, so the zero is 7.
        assert_eq!(min_max_params(0.0, 0.0, &config(4, false)), (2.0 / 15.0, 7));
    }

    #[test]
    fn codes_round_half_to_even_and_clamp() {
        assert_eq!(code(0.25, 0.5, 8, 15), 8);
        assert_eq!(code(0.75, 0.5, 8, 15), 10);
        assert_eq!(code(100.0, 0.5, 8, 15), 15);
        assert_eq!(code(-100.0, 0.5, 8, 15), 0);
        assert_eq!(code(1e-9, 0.0, 3, 15), 3);
    }
}
