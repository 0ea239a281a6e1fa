//! Whole `QuantLinear` forwards on the GPU: the bare 4-bit HQQ layer, and the layer with an OFT
//! adapter (b = 32) or a LoRA adapter (r = 16) under each fusion mode, over rotated copies of
//! the layer.

use crate::adapters::Adapter;
use crate::adapters::lora::LoraAdapter;
use crate::adapters::oft::{OftAdapter, Parameterization};
use crate::bench::base::hqq_min_max;
use crate::bench::entry::{Entry, Group, Item, f32_bytes};
use crate::bench::plan::{LORA_RANK, OFT_BLOCK, Plan};
use crate::bench::rotate::{build_copies, launches, time_rotated};
use crate::error::Result;
use crate::formats::QuantWeight;
use crate::gpu::{ActDtype, GpuContext, GpuTensor};
use crate::kernels::quant::GpuQuantWeight;
use crate::layer::{Backend, Fusion, QuantLinear};
use crate::tensor::Matrix;

/// The name of the 4-bit HQQ layer forward with no adapter.
pub const BARE_LAYER: &str = "layer hqq4";

fn fusion_name(fusion: Fusion) -> &'static str {
    match fusion {
        Fusion::Off => "off",
        Fusion::Auto => "auto",
        Fusion::Always => "always",
    }
}

/// The name of the layer with an OFT adapter under `fusion`.
pub fn oft_layer(fusion: Fusion) -> String {
    format!("{BARE_LAYER} + oft b32, fusion {}", fusion_name(fusion))
}

/// The name of the layer with a LoRA adapter under `fusion`.
pub fn lora_layer(fusion: Fusion) -> String {
    format!("{BARE_LAYER} + lora r16, fusion {}", fusion_name(fusion))
}

/// What adapters add to a forward of `m` rows: resident bytes, bytes moved, FLOPs.
#[derive(Clone, Copy, Debug, Default)]
pub struct AdapterCost {
    pub resident: usize,
    pub bytes: f64,
    pub flops: f64,
}

impl AdapterCost {
    /// OFT's blocks, and the rotated x written and read back.
    pub fn oft(m: usize, inp: usize) -> Self {
        let resident = inp * OFT_BLOCK * 4;
        Self {
            resident,
            bytes: resident as f64 + 2.0 * f32_bytes(m, inp),
            flops: 2.0 * (m * inp * OFT_BLOCK) as f64,
        }
    }

    /// `adapters` LoRA adapters' A and B, the rank-r intermediate written and read, and y read
    /// and written again by the expand.
    pub fn lora(m: usize, (out, inp): (usize, usize), adapters: usize) -> Self {
        let resident = adapters * LORA_RANK * (inp + out) * 4;
        Self {
            resident,
            bytes: resident as f64 + 2.0 * f32_bytes(m, LORA_RANK) + 2.0 * f32_bytes(m, out),
            flops: 2.0 * (m * LORA_RANK * (inp + out)) as f64,
        }
    }
}

/// An OFT adapter with random generator values (exact Cayley, one block per 32 inputs).
pub fn oft_adapter(name: &str, inp: usize) -> Result<Adapter> {
    let params = Matrix::random(inp / OFT_BLOCK, OFT_BLOCK * (OFT_BLOCK - 1) / 2, 0.01);
    Ok(Adapter::Oft(OftAdapter::from_params(
        name,
        inp,
        params,
        Parameterization::Cayley,
        None,
        false,
    )?))
}

pub fn lora_adapter(name: &str, (out, inp): (usize, usize)) -> Result<Adapter> {
    Ok(Adapter::Lora(LoraAdapter::from_matrices(
        name,
        inp,
        out,
        Matrix::random(LORA_RANK, inp, 0.05),
        Matrix::random(out, LORA_RANK, 0.05),
        2.0,
        None,
    )?))
}

/// A GPU layer over `base` holding `adapters`, all active.
pub fn gpu_layer(
    ctx: &GpuContext,
    base: &QuantWeight,
    adapters: &[Adapter],
) -> Result<QuantLinear> {
    let mut layer = QuantLinear::new(base.clone(), Backend::Gpu(Box::new(ctx.clone())))?;
    for a in adapters {
        layer.add_adapter(a.clone())?;
    }
    let names: Vec<&str> = adapters.iter().map(Adapter::name).collect();
    layer.set_active(&names)?;
    Ok(layer)
}

/// The layers the suite compares: the bare base, and the base with one adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Bare,
    Oft,
    Lora,
}

const FUSIONS: [Fusion; 3] = [Fusion::Off, Fusion::Auto, Fusion::Always];

impl Variant {
    fn name(self, fusion: Fusion) -> String {
        match self {
            Self::Bare => BARE_LAYER.to_string(),
            Self::Oft => oft_layer(fusion),
            Self::Lora => lora_layer(fusion),
        }
    }

    /// The fusion modes worth timing: the bare layer has nothing to fuse.
    fn fusions(self) -> &'static [Fusion] {
        match self {
            Self::Bare => &[Fusion::Auto],
            Self::Oft | Self::Lora => &FUSIONS,
        }
    }

    fn adapters(self, shape: (usize, usize)) -> Result<Vec<Adapter>> {
        Ok(match self {
            Self::Bare => Vec::new(),
            Self::Oft => vec![oft_adapter("oft", shape.1)?],
            Self::Lora => vec![lora_adapter("lora", shape)?],
        })
    }

    fn cost(self, m: usize, shape: (usize, usize)) -> AdapterCost {
        match self {
            Self::Bare => AdapterCost::default(),
            Self::Oft => AdapterCost::oft(m, shape.1),
            Self::Lora => AdapterCost::lora(m, shape, 1),
        }
    }
}

/// The three layers over a 4-bit HQQ quantization of `weight`, at every layer M of the plan.
pub fn layers(
    ctx: &GpuContext,
    plan: &Plan,
    weight: &Matrix,
    on_entry: &mut dyn FnMut(&Entry),
) -> Result<Vec<Entry>> {
    let shape = (weight.rows, weight.cols);
    let (out, inp) = shape;
    let base = QuantWeight::Hqq(hqq_min_max(weight, 4)?);
    let base_resident = GpuQuantWeight::upload(ctx, &base)?.resident_bytes();
    let mut entries = Vec::new();
    for variant in [Variant::Bare, Variant::Oft, Variant::Lora] {
        let adapters = variant.adapters(shape)?;
        let resident = base_resident + variant.cost(1, shape).resident;
        let copies = plan.copies(resident + (f32_bytes(1, inp) + f32_bytes(1, out)) as usize);
        let mut layers = build_copies(copies, || gpu_layer(ctx, &base, &adapters))?;
        for &fusion in variant.fusions() {
            layers.iter_mut().for_each(|l| l.set_fusion(fusion));
            for &m in &plan.layer_rows {
                let mut runs = Vec::with_capacity(layers.len());
                for layer in &layers {
                    let x = GpuTensor::upload(ctx, &Matrix::random(m, inp, 1.0), ActDtype::F32)?;
                    let y = GpuTensor::output(ctx, m, out, ActDtype::F32)?;
                    runs.push(layer.prepare_forward(&x, &y)?.dispatches().to_vec());
                }
                let extra = variant.cost(m, shape);
                let mut item = Item::new(Group::Layer, variant.name(fusion), shape, m);
                item.launches = launches(&runs[0]);
                item.bytes =
                    base_resident as f64 + f32_bytes(m, inp) + f32_bytes(m, out) + extra.bytes;
                item.flops = 2.0 * (m * out * inp) as f64 + extra.flops;
                item.resident_bytes = resident;
                item.baseline = (variant != Variant::Bare).then(|| BARE_LAYER.to_string());
                let entry = item.timed(time_rotated(ctx, plan, &runs)?);
                on_entry(&entry);
                entries.push(entry);
            }
        }
    }
    Ok(entries)
}
