//! A GPTQ weight in HQQ's storage layout, so that the GPU kernels shaped for HQQ's packed rows
//! (the grouped GEMV, the word-decoding GEMM) serve it too.

use crate::error::Result;
use crate::formats::gptq::GptqWeight;
use crate::formats::hqq::packing::{Packing, pack};
use crate::formats::hqq::{ComputeDtype, HqqWeight};

/// Code widths HQQ packs a whole number of to a byte, as GPTQ packs 2-, 4- and 8-bit codes.
const BYTE_WIDTHS: [u32; 3] = [2, 4, 8];

impl GptqWeight {
    /// The same weight as an HQQ layer (groups along K, axis 1, f16 compute), where it has one:
    /// GPTQ's dequantization `round_f16(s·(q − z))` equals HQQ's `round_f16(round_f16(q − z)·s)`
    /// because `q − z` is a small integer, so every dequantized weight is the same bit for bit.
    /// `None` under act-order (a group's inputs are not contiguous), for 3-bit codes, and where K
    /// is not a whole number of groups or the codes do not pack into HQQ's slabs.
    pub fn to_hqq_layout(&self) -> Result<Option<HqqWeight>> {
        let bits = self.config.bits;
        let (n_out, k_in) = (self.out_features, self.in_features);
        let group = self.config.group_len(k_in);
        let contiguous = self
            .g_idx
            .iter()
            .enumerate()
            .all(|(k, g)| *g as usize == k / group);
        if !BYTE_WIDTHS.contains(&bits) || !contiguous || !k_in.is_multiple_of(group) {
            return Ok(None);
        }
        let packing = Packing::for_bits(bits)?;
        let rows = n_out * k_in / group;
        if packing.packed_rows(rows).is_err() || !rows.is_multiple_of(8 / bits as usize) {
            return Ok(None);
        }
        let packed = pack(&packing, &self.codes(), rows, group)?;
        let groups_per_row = k_in / group;
        let mut scale = Vec::with_capacity(rows);
        let mut zero = Vec::with_capacity(rows);
        for n in 0..n_out {
            for g in 0..groups_per_row {
                scale.push(self.scales[g * n_out + n]);
                zero.push(self.zero(g, n) as f32);
            }
        }
        HqqWeight::from_parts(
            n_out,
            k_in,
            bits,
            group,
            1,
            packed,
            scale,
            zero,
            self.bias.clone(),
            ComputeDtype::F16,
        )
        .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use crate::formats::QuantFormat;
    use crate::formats::gptq::{GptqConfig, GptqWeight, GptqZeros};
    use crate::tensor::Matrix;

    fn weight(
        bits: u32,
        group_size: Option<usize>,
        zeros: GptqZeros,
        act_order: bool,
    ) -> GptqWeight {
        let (n, k) = (24, 256);
        let data = (0..n * k)
            .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * 0.1)
            .collect();
        let config = GptqConfig {
            bits,
            group_size,
            sym: false,
            desc_act: act_order,
            zeros,
        };
        let g_idx = act_order.then(|| {
            let group = group_size.unwrap_or(k);
            (0..k).map(|i| (((i * 37) % k) / group) as u32).collect()
        });
        GptqWeight::quantize_rtn(&Matrix::new(n, k, data).unwrap(), config, g_idx).unwrap()
    }

    #[test]
    fn dequantizes_to_the_same_bits() {
        for bits in [2, 4, 8] {
            for group in [Some(64), Some(128), None] {
                for zeros in [GptqZeros::V1, GptqZeros::V2] {
                    let gptq = weight(bits, group, zeros, false);
                    let hqq = gptq.to_hqq_layout().unwrap().expect("convertible");
                    let bits_of =
                        |m: Matrix| m.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits_of(hqq.dequantize()),
                        bits_of(gptq.dequantize()),
                        "{bits}-bit, group {group:?}, {zeros:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn act_order_and_3_bit_stay_gptq() {
        assert!(
            weight(4, Some(64), GptqZeros::V1, true)
                .to_hqq_layout()
                .unwrap()
                .is_none()
        );
        assert!(
            weight(3, Some(64), GptqZeros::V2, false)
                .to_hqq_layout()
                .unwrap()
                .is_none()
        );
    }
}
