//! The WGSL sources under `shaders/`, a small preprocessor (`#include`, `#ifdef`/`#ifndef`/
//! `#else`/`#endif`) and the keys that name each specialization. A specialization is generated
//! text: a prelude of `const`s and an `Act` alias for the activation type, then the family file.

use crate::error::{Error, Result};
use crate::gpu::ActDtype;

/// Every WGSL file, embedded at build time, by its path under `shaders/`.
const FILES: &[(&str, &str)] = &[
    (
        "common/fused_ops.wgsl",
        include_str!("../../shaders/common/fused_ops.wgsl"),
    ),
    (
        "common/gemm_tiles.wgsl",
        include_str!("../../shaders/common/gemm_tiles.wgsl"),
    ),
    (
        "common/matmul_params.wgsl",
        include_str!("../../shaders/common/matmul_params.wgsl"),
    ),
    (
        "common/elementwise.wgsl",
        include_str!("../../shaders/common/elementwise.wgsl"),
    ),
    (
        "common/mixed_slots.wgsl",
        include_str!("../../shaders/common/mixed_slots.wgsl"),
    ),
    (
        "common/oft_blocks.wgsl",
        include_str!("../../shaders/common/oft_blocks.wgsl"),
    ),
    (
        "common/quant_format.wgsl",
        include_str!("../../shaders/common/quant_format.wgsl"),
    ),
    (
        "common/rounding.wgsl",
        include_str!("../../shaders/common/rounding.wgsl"),
    ),
    (
        "common/workgroup_sum.wgsl",
        include_str!("../../shaders/common/workgroup_sum.wgsl"),
    ),
    (
        "common/x_quads.wgsl",
        include_str!("../../shaders/common/x_quads.wgsl"),
    ),
    (
        "dense_matmul.wgsl",
        include_str!("../../shaders/dense_matmul.wgsl"),
    ),
    ("fma_peak.wgsl", include_str!("../../shaders/fma_peak.wgsl")),
    (
        "formats/eetq.wgsl",
        include_str!("../../shaders/formats/eetq.wgsl"),
    ),
    (
        "formats/gptq.wgsl",
        include_str!("../../shaders/formats/gptq.wgsl"),
    ),
    (
        "formats/hqq.wgsl",
        include_str!("../../shaders/formats/hqq.wgsl"),
    ),
    (
        "hqq_quantize.wgsl",
        include_str!("../../shaders/hqq_quantize.wgsl"),
    ),
    ("lora.wgsl", include_str!("../../shaders/lora.wgsl")),
    (
        "merge_apply.wgsl",
        include_str!("../../shaders/merge_apply.wgsl"),
    ),
    (
        "mixed_adapters.wgsl",
        include_str!("../../shaders/mixed_adapters.wgsl"),
    ),
    (
        "oft_build.wgsl",
        include_str!("../../shaders/oft_build.wgsl"),
    ),
    (
        "oft_check.wgsl",
        include_str!("../../shaders/oft_check.wgsl"),
    ),
    (
        "oft_rotate.wgsl",
        include_str!("../../shaders/oft_rotate.wgsl"),
    ),
    (
        "quant_dequant.wgsl",
        include_str!("../../shaders/quant_dequant.wgsl"),
    ),
    (
        "quant_gemm.wgsl",
        include_str!("../../shaders/quant_gemm.wgsl"),
    ),
    (
        "quant_gemv.wgsl",
        include_str!("../../shaders/quant_gemv.wgsl"),
    ),
    (
        "stream_read.wgsl",
        include_str!("../../shaders/stream_read.wgsl"),
    ),
];

/// Names one compiled specialization of a shader family.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ShaderKey {
    /// The file `shaders/<family>.wgsl`.
    pub family: &'static str,
    /// The `@compute` entry point to build a pipeline from.
    pub entry: &'static str,
    /// Names switched on for `#ifdef`.
    pub flags: Vec<&'static str>,
    /// `const NAME: u32 = value;` lines put in front of the source.
    pub consts: Vec<(&'static str, u32)>,
    /// Element type of activations (`alias Act = ...;`).
    pub act: ActDtype,
}

impl ShaderKey {
    /// Entry point `entry` of `shaders/<family>.wgsl` on `act` activations, with no flags or
    /// constants.
    pub fn new(family: &'static str, entry: &'static str, act: ActDtype) -> Self {
        Self {
            family,
            entry,
            flags: Vec::new(),
            consts: Vec::new(),
            act,
        }
    }

    /// Switches on `#ifdef name` blocks when `on` (nothing otherwise).
    pub fn flag(mut self, name: &'static str, on: bool) -> Self {
        if on {
            self.flags.push(name);
        }
        self
    }

    /// Prepends `const name: u32 = value;` (workgroup sizes, tile shapes, bit widths).
    pub fn constant(mut self, name: &'static str, value: u32) -> Self {
        self.consts.push((name, value));
        self
    }

    /// Whether the specialization needs the SHADER_F16 feature.
    pub fn needs_f16(&self) -> bool {
        self.act == ActDtype::F16 || self.flags.contains(&"F16")
    }

    /// Whether the specialization needs the SUBGROUP feature (the `SUBGROUP` flag is on).
    pub fn needs_subgroups(&self) -> bool {
        self.flags.contains(&"SUBGROUP")
    }

    /// The full WGSL text of this specialization.
    pub fn source(&self) -> Result<String> {
        let mut out = String::new();
        if self.needs_f16() {
            out.push_str("enable f16;\n");
        }
        out.push_str(&format!("alias Act = {};\n", self.act.wgsl()));
        for (name, value) in &self.consts {
            out.push_str(&format!("const {name}: u32 = {value}u;\n"));
        }
        let main = format!("{}.wgsl", self.family);
        preprocess(&main, &self.flags, &mut out, 0)?;
        Ok(out)
    }

    /// [`Self::source`] as WebGPU's own compilers want it (Tint, in browsers and Dawn): Tint
    /// requires `enable subgroups;` before any subgroup builtin, while naga 30 refuses the
    /// directive as not yet implemented, so only this form carries it.
    pub fn webgpu_source(&self) -> Result<String> {
        let source = self.source()?;
        Ok(if self.needs_subgroups() {
            format!("enable subgroups;\n{source}")
        } else {
            source
        })
    }
}

fn file(path: &str) -> Result<&'static str> {
    FILES
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, text)| *text)
        .ok_or_else(|| Error::Gpu(format!("no shader file `{path}`")))
}

fn preprocess(path: &str, flags: &[&str], out: &mut String, depth: usize) -> Result<()> {
    if depth > 8 {
        return Err(Error::Gpu(format!(
            "shader includes nest too deep at `{path}`"
        )));
    }
    // Each entry: (this branch is taken, some enclosing branch is not).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let active =
        |stack: &[(bool, bool)]| stack.last().is_none_or(|(on, outer_off)| *on && !outer_off);
    for (n, line) in file(path)?.lines().enumerate() {
        let trimmed = line.trim();
        let bad = |what: &str| Error::Gpu(format!("{path}:{}: {what}", n + 1));
        if let Some(name) = trimmed.strip_prefix("#ifdef ") {
            let outer_off = !active(&stack);
            stack.push((flags.contains(&name.trim()), outer_off));
        } else if let Some(name) = trimmed.strip_prefix("#ifndef ") {
            let outer_off = !active(&stack);
            stack.push((!flags.contains(&name.trim()), outer_off));
        } else if trimmed == "#else" {
            let top = stack
                .last_mut()
                .ok_or_else(|| bad("#else without #ifdef"))?;
            top.0 = !top.0;
        } else if trimmed == "#endif" {
            stack.pop().ok_or_else(|| bad("#endif without #ifdef"))?;
        } else if let Some(rest) = trimmed.strip_prefix("#include ") {
            if active(&stack) {
                preprocess(rest.trim().trim_matches('"'), flags, out, depth + 1)?;
            }
        } else if trimmed.starts_with('#') {
            return Err(bad("unknown directive"));
        } else if active(&stack) {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !stack.is_empty() {
        return Err(Error::Gpu(format!("{path}: unterminated #ifdef")));
    }
    Ok(())
}
