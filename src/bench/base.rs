//! The quantized base matmuls alone (`GpuQuantWeight`): 4- and 8-bit HQQ, 4-bit GPTQ and EETQ
//! int8.

use crate::bench::entry::{Entry, Group};
use crate::bench::matmul::time_matmul;
use crate::bench::plan::Plan;
use crate::error::Result;
use crate::formats::QuantWeight;
use crate::formats::eetq::EetqWeight;
use crate::formats::gptq::{GptqConfig, GptqWeight, GptqZeros};
use crate::formats::hqq::{HqqConfig, HqqWeight};
use crate::gpu::GpuContext;
use crate::kernels::quant::GpuQuantWeight;
use crate::tensor::Matrix;

/// The quantized formats of the suite (and of `quantadapt tune`'s synthetic weights).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseFormat {
    /// HQQ 4-bit, groups of 64 along the input axis, f32 compute.
    Hqq4,
    /// HQQ 8-bit, groups of 64 along the input axis, f32 compute.
    Hqq8,
    /// GPTQ 4-bit, groups of 128, symmetric, v1 zeros.
    Gptq4,
    /// EETQ int8 per output channel.
    EetqInt8,
}

/// Every format of the suite.
pub const BASE_FORMATS: [BaseFormat; 4] = [
    BaseFormat::Hqq4,
    BaseFormat::Hqq8,
    BaseFormat::Gptq4,
    BaseFormat::EetqInt8,
];

impl BaseFormat {
    /// The name the bench's and the tuner's tables give it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Hqq4 => "hqq 4-bit g64",
            Self::Hqq8 => "hqq 8-bit g64",
            Self::Gptq4 => "gptq 4-bit g128",
            Self::EetqInt8 => "eetq int8",
        }
    }

    /// Quantizes quickly: HQQ stops at min-max (no solver), GPTQ rounds to nearest.
    pub fn quantize(self, weight: &Matrix) -> Result<QuantWeight> {
        Ok(match self {
            Self::Hqq4 => QuantWeight::Hqq(hqq_min_max(weight, 4)?),
            Self::Hqq8 => QuantWeight::Hqq(hqq_min_max(weight, 8)?),
            Self::Gptq4 => {
                let config = GptqConfig {
                    bits: 4,
                    group_size: Some(128),
                    sym: true,
                    desc_act: false,
                    zeros: GptqZeros::V1,
                };
                QuantWeight::Gptq(GptqWeight::quantize_rtn(weight, config, None)?)
            }
            Self::EetqInt8 => QuantWeight::Eetq(EetqWeight::quantize(weight)?),
        })
    }
}

/// HQQ with groups of 64 along the input axis, min-max only.
pub fn hqq_min_max(weight: &Matrix, nbits: u32) -> Result<HqqWeight> {
    let mut config = HqqConfig::new(nbits, 64, 1);
    config.optimize = false;
    HqqWeight::quantize(weight, None, &config)
}

/// `weight` in `format` at every M of the plan.
pub fn quantized(
    ctx: &GpuContext,
    plan: &Plan,
    format: BaseFormat,
    weight: &Matrix,
    on_entry: &mut dyn FnMut(&Entry),
) -> Result<Vec<Entry>> {
    let quantized = format.quantize(weight)?;
    time_matmul(
        ctx,
        plan,
        (Group::Base, format.name()),
        (weight.rows, weight.cols),
        || GpuQuantWeight::upload(ctx, &quantized),
        on_entry,
    )
}
