//! The GEMV shaped for bandwidth (`shaders/gemv_grouped.wgsl`, and `gemv_split_sum.wgsl` for
//! split-K) and its variants: workgroup size, output rows per workgroup, slices of K, and how
//! partial sums are reduced. [`GpuQuantWeight::gemv_candidates`] lists every variant valid for a
//! weight on a device, [`GpuQuantWeight::gemv_default`] is the heuristic choice that is safe
//! everywhere, and [`GpuQuantWeight::prepare_gemv`] records one exact variant (for timing).
//!
//! It serves weights whose packed words run along K and whose groups hold whole 16-input units
//! of one row: HQQ with byte-packed fields (8, 4, 2 bits), axis 1, `16 | group_size | K` (GPTQ's
//! 2/4/8-bit layers without act-order too, uploaded in HQQ's layout); EETQ (repacked at load)
//! where `64 | K`. Any other weight has one variant, [`LEGACY_GEMV`], the
//! element- or word-at-a-time kernel of `quant_gemv.wgsl`.
//!
//! Rounding: the reference rounds each dequantized weight to the compute dtype where it is f16
//! or bf16. The factored form `s·(Σ x q − z Σ x)` drops that rounding, which moves f32 outputs
//! by about 2e-4 of max|y|, over the 1e-4 tolerance of f32 activations, and well within the 5e-3
//! of f16 ones. So the GEMV factors (`FACTORED`) with f16 activations and where the compute dtype
//! is f32, and otherwise rounds every weight as the reference does, keeping the rest of the
//! shape (vector loads, metadata once per group, the reductions). The dequant kernel and merges
//! keep PyTorch's rounding exactly.
//!
//! Cost per weight, counted from `gemv_grouped.wgsl` (M rows of x, R outputs per workgroup, G
//! inputs per group): decoding a code takes a shift, a mask and a conversion (3 operations, once
//! for all M rows); each row then adds 1 multiply-add in `dot` and 1/4 for the scale, so the
//! factored form costs `3/M + 1.25` operations per weight and row, plus per group and output
//! about 20/G for the f16 metadata and 2M/G for the zero term, and `(4..8)/(4R)` per weight and
//! row for loading, widening and summing x. The rounded form adds two f16 roundings (about 12
//! operations each, 6 for bf16) and a subtract and a multiply per weight: about 29 at M = 1.
//! Bytes moved from memory per weight: `bits/8 + 2·(2 or 4)/G` (HQQ metadata as halves or
//! f32), `1 + 4/K` for EETQ; x is read once per workgroup (`4M/R` bytes per weight from cache,
//! half that in f16), y written once, and split-K adds `8·split·M/K` for its partial sums.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gpu::buffers::scratch_f32;
use crate::gpu::shaders::ShaderKey;
use crate::gpu::{ActDtype, GpuContext, GpuTensor};
use crate::kernels::fused::{EpilogueKind, Fused, with_fused_flags};
use crate::kernels::quant::{FormatShader, GpuQuantWeight, RowSlice};
use crate::kernels::{
    Dispatch, GEMV_MAX_ROWS, GEMV_ROW_SPECIALIZATIONS, MatmulPath, bind_resources, check_io,
    gemv_max_m, grid,
};
use crate::tune::GemvKey;

/// How a GEMV workgroup sums its invocations' partial sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reduction {
    /// A tree in workgroup memory.
    Workgroup,
    /// `subgroupAdd`, then workgroup memory across subgroups.
    Subgroup,
}

/// One shape of the GEMV launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GemvVariant {
    /// Invocations per workgroup.
    pub workgroup_size: u32,
    /// Output features one workgroup owns.
    pub rows_per_workgroup: u32,
    /// Slices of K summed by a second launch (1: none).
    pub split_k: u32,
    /// How partial sums are reduced.
    pub reduction: Reduction,
}

/// The only variant of weights the grouped GEMV does not serve: `quant_gemv.wgsl`.
pub const LEGACY_GEMV: GemvVariant = GemvVariant {
    workgroup_size: crate::kernels::quant::GEMV_WORKGROUP,
    rows_per_workgroup: crate::kernels::quant::GEMV_ROWS_PER_WORKGROUP as u32,
    split_k: 1,
    reduction: Reduction::Workgroup,
};

const WORKGROUP_SIZES: [u32; 2] = [64, 128];
const SPLITS: [u32; 4] = [1, 2, 4, 8];
/// Packed rows per workgroup, as multiples of the outputs one packed row feeds.
const PACKED_ROWS: [u32; 4] = [1, 2, 4, 8];
/// Most outputs a workgroup owns.
const MAX_ROWS: u32 = 32;
/// Most accumulators (rows x MAX_M) an invocation keeps, unless one packed row needs more.
const MAX_ACCUMULATORS: u32 = 32;
/// Partial sums (f32) the workgroup reduction keeps in workgroup memory at most: 8 KiB.
const PARTIAL_VALUES: u32 = 2048;
/// Smallest subgroup the subgroup reduction's workgroup memory is sized for (`MIN_SUBGROUP`);
/// its partial sums take an eighth of the workgroup reduction's at most.
const MIN_SUBGROUP: u32 = 8;
/// Values of x (columns x rows) the OFT prologue rotates into workgroup memory at a time.
const OFT_CHUNK_VALUES: u32 = 2048;
const SUM_WORKGROUP: u32 = 256;

/// What the grouped GEMV needs to know of a row slice's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct GroupedLayout {
    /// Output rows each packed row feeds (8 / field bits).
    pub slabs: u32,
    /// Inputs per quantization group (a multiple of 16 dividing K).
    pub group_size: u32,
    /// Whether the format's reference rounds every weight to an f16 / bf16 compute dtype.
    pub rounds_weights: bool,
}

impl GroupedLayout {
    fn factored(&self, act: ActDtype) -> bool {
        !self.rounds_weights || act == ActDtype::F16
    }

    /// Variants for this layout at `max_m` rows and `k` inputs on a device with `limits`,
    /// `subgroup` the one subgroup size (if any); `fused` narrows them to the catalogue's.
    fn variants(
        &self,
        k: u32,
        max_m: u32,
        max_invocations: u32,
        subgroup: Option<u32>,
        fused: bool,
    ) -> Vec<GemvVariant> {
        let groups_per_row = k / self.group_size;
        let mut out = Vec::new();
        for workgroup_size in WORKGROUP_SIZES {
            if workgroup_size > max_invocations || (fused && workgroup_size != 64) {
                continue;
            }
            for rows in self.row_options(max_m) {
                // The workgroup's accumulators fit the partial sums at once, so the workgroup
                // reduction takes one pass.
                let one_pass = workgroup_size * rows * max_m <= PARTIAL_VALUES;
                if !one_pass || (fused && rows != self.default_rows(max_m)) {
                    continue;
                }
                for split_k in SPLITS.into_iter().filter(|s| *s <= groups_per_row.max(1)) {
                    out.push(GemvVariant {
                        workgroup_size,
                        rows_per_workgroup: rows,
                        split_k,
                        reduction: Reduction::Workgroup,
                    });
                    let subgroup_fits = subgroup.is_some_and(|size| {
                        size >= MIN_SUBGROUP && workgroup_size.is_multiple_of(size)
                    });
                    if subgroup_fits {
                        out.push(GemvVariant {
                            workgroup_size,
                            rows_per_workgroup: rows,
                            split_k,
                            reduction: Reduction::Subgroup,
                        });
                    }
                }
            }
        }
        out
    }

    fn row_options(&self, max_m: u32) -> impl Iterator<Item = u32> + '_ {
        let accumulators = MAX_ACCUMULATORS.max(self.slabs * max_m);
        PACKED_ROWS
            .into_iter()
            .map(|p| p * self.slabs)
            .filter(move |rows| *rows <= MAX_ROWS && rows * max_m <= accumulators)
    }

    /// Up to 8 outputs per workgroup, fewer as rows of x add accumulators.
    fn default_rows(&self, max_m: u32) -> u32 {
        let target = (32 / max_m).clamp(1, 8);
        self.row_options(max_m)
            .filter(|rows| *rows <= target.max(self.slabs))
            .max()
            .unwrap_or(self.slabs)
    }
}

/// The device's one subgroup size, where it has subgroups and reports a single size.
fn uniform_subgroup_size(ctx: &GpuContext) -> Option<u32> {
    let (min, max) = (ctx.info.subgroup_min_size, ctx.info.subgroup_max_size);
    (ctx.has_subgroups() && min == max && min > 0).then_some(min)
}

impl GpuQuantWeight {
    /// The grouped layout shared by every row slice, if all have one.
    fn grouped_layout(&self) -> Option<GroupedLayout> {
        let first = self.slices.first()?.grouped?;
        self.slices
            .iter()
            .all(|s| s.grouped == Some(first))
            .then_some(first)
    }

    /// Every variant valid for this weight, `rows` rows of x and this device (limits,
    /// features); `fused` work narrows the set to the variants the catalogue holds for it
    /// (workgroups of 64, the default rows per workgroup).
    pub fn gemv_candidates(
        &self,
        ctx: &GpuContext,
        rows: usize,
        fused: &Fused,
    ) -> Vec<GemvVariant> {
        self.grouped_variants(ctx, rows, fused)
            .unwrap_or_else(|| vec![LEGACY_GEMV])
    }

    /// The grouped GEMV's variants, where it serves this weight, rows and fusion.
    fn grouped_variants(
        &self,
        ctx: &GpuContext,
        rows: usize,
        fused: &Fused,
    ) -> Option<Vec<GemvVariant>> {
        let layout = self.grouped_layout()?;
        let max_m = gemv_max_m(rows);
        let oft_fits = fused
            .oft
            .is_none_or(|_| (OFT_CHUNK_VALUES / max_m).is_multiple_of(layout.group_size));
        let limits = ctx.limits();
        let max_invocations = limits
            .max_compute_invocations_per_workgroup
            .min(limits.max_compute_workgroup_size_x);
        let variants = layout.variants(
            self.in_features as u32,
            max_m,
            max_invocations,
            uniform_subgroup_size(ctx),
            !fused.is_empty(),
        );
        (oft_fits && !variants.is_empty()).then_some(variants)
    }

    /// The heuristic choice, safe everywhere (used when nothing is tuned): workgroups of 64,
    /// subgroup reduction where the device has one subgroup size, up to 8 outputs per workgroup,
    /// and K split while there are fewer than 128 workgroups and each slice keeps a group for
    /// every invocation.
    pub fn gemv_default(&self, ctx: &GpuContext, rows: usize, fused: &Fused) -> GemvVariant {
        let (Some(candidates), Some(layout)) = (
            self.grouped_variants(ctx, rows, fused),
            self.grouped_layout(),
        ) else {
            return LEGACY_GEMV;
        };
        let max_m = gemv_max_m(rows);
        let rows_per_workgroup = layout.default_rows(max_m);
        let packed_rows = self.out_features.div_ceil(layout.slabs as usize);
        let tiles = packed_rows.div_ceil((rows_per_workgroup / layout.slabs) as usize);
        let groups_per_row = self.in_features / layout.group_size as usize;
        let mut split_k = 1;
        while tiles * split_k < 128 && groups_per_row / (2 * split_k) >= 64 && split_k < 8 {
            split_k *= 2;
        }
        let preferred = [Reduction::Subgroup, Reduction::Workgroup].map(|reduction| GemvVariant {
            workgroup_size: 64,
            rows_per_workgroup,
            split_k: split_k as u32,
            reduction,
        });
        preferred
            .into_iter()
            .find(|v| candidates.contains(v))
            .unwrap_or(candidates[0])
    }

    /// Records a GEMV of `x: [m, in]` into `y: [m, out]` with this exact variant; fails with
    /// [`Error::Unsupported`] if it is not one of [`Self::gemv_candidates`], and as
    /// [`Self::prepare_fused`] does for shapes and fusions.
    pub fn prepare_gemv(
        &self,
        ctx: &GpuContext,
        x: &GpuTensor,
        y: &GpuTensor,
        variant: GemvVariant,
        fused: &Fused,
    ) -> Result<Dispatch> {
        check_io(x, y, self.in_features, self.out_features)?;
        if x.rows > GEMV_MAX_ROWS {
            return Err(Error::Unsupported(format!(
                "the GEMV path takes at most {GEMV_MAX_ROWS} rows, got {}",
                x.rows
            )));
        }
        self.check_fusable(ctx, MatmulPath::Gemv, x.rows, fused)?;
        let grouped = self.grouped_variants(ctx, x.rows, fused);
        let valid = match &grouped {
            Some(variants) => variants.contains(&variant),
            None => variant == LEGACY_GEMV,
        };
        if !valid {
            return Err(Error::Unsupported(format!(
                "GEMV variant {variant:?} for {} rows of a {}x{} layer with {} on this device",
                x.rows,
                self.out_features,
                self.in_features,
                fused.describe()
            )));
        }
        if grouped.is_none() {
            return self.prepare_legacy_gemv(ctx, x, y, fused);
        }
        let fused_params = fused.uniform(ctx)?;
        let mut launches = Vec::new();
        for slice in &self.slices {
            // grouped_variants served this weight only if every slice has the layout.
            let Some(layout) = slice.grouped else {
                return Err(Error::Gpu(
                    "a row slice of a grouped-GEMV weight lacks its layout".into(),
                ));
            };
            launches.extend(self.grouped_launches(
                ctx,
                slice,
                layout,
                x,
                y,
                variant,
                fused,
                &fused_params,
            )?);
        }
        Ok(Dispatch::chain(launches))
    }

    #[allow(clippy::too_many_arguments)]
    fn grouped_launches(
        &self,
        ctx: &GpuContext,
        slice: &RowSlice,
        layout: GroupedLayout,
        x: &GpuTensor,
        y: &GpuTensor,
        variant: GemvVariant,
        fused: &Fused,
        fused_params: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let split = variant.split_k > 1;
        let key = grouped_key(
            &slice.shader,
            layout,
            x.dtype,
            gemv_max_m(x.rows),
            variant,
            fused.oft.is_some(),
            fused.epilogue_kind(),
        );
        let params = slice.params(
            ctx,
            x.rows,
            self.in_features,
            self.out_features,
            variant.split_k,
        )?;
        let fused_entries = fused.bindings(fused_params);
        // The main launch takes the prologue; with split-K the sum launch takes the epilogue.
        let wanted = |binding: u32, main: bool| match binding {
            9 => {
                if main {
                    fused.oft.is_some() || (!split && fused.lora.is_some())
                } else {
                    fused.lora.is_some()
                }
            }
            10 => main,
            _ => !(main && split),
        };
        let pipeline = ctx.pipeline(&key)?;
        let scratch = if split {
            Some(scratch_f32(
                ctx,
                "gemv split-K partial sums",
                variant.split_k as usize * x.rows * slice.rows,
            )?)
        } else {
            None
        };
        let mut entries = vec![(6, x.binding())];
        match &scratch {
            Some(buffer) => entries.push((5, buffer.as_entire_binding())),
            None => {
                entries.push((7, slice.bias.as_entire_binding()));
                entries.push((8, y.binding()));
            }
        }
        entries.extend(
            fused_entries
                .iter()
                .filter(|(i, _)| wanted(*i, true))
                .map(|(i, b)| (*i, b.as_entire_binding())),
        );
        let bind = slice.bind_group(ctx, &pipeline, &params, entries)?;
        let packed_rows = slice.rows.div_ceil(layout.slabs as usize);
        let tiles = packed_rows.div_ceil((variant.rows_per_workgroup / layout.slabs) as usize);
        let workgroups = u32::try_from(tiles * variant.split_k as usize)
            .map_err(|_| Error::Unsupported("a GEMV grid past 32 bits".into()))?;
        let mut launches = vec![Dispatch::new(pipeline, bind, grid(workgroups))];
        if let Some(buffer) = scratch {
            let pipeline = ctx.pipeline(&split_sum_key(x.dtype, fused.epilogue_kind()))?;
            let mut entries = vec![
                (0, params.as_entire_binding()),
                (5, buffer.as_entire_binding()),
                (7, slice.bias.as_entire_binding()),
                (8, y.binding()),
            ];
            entries.extend(
                fused_entries
                    .iter()
                    .filter(|(i, _)| wanted(*i, false) && *i != 10)
                    .map(|(i, b)| (*i, b.as_entire_binding())),
            );
            let bind = bind_resources(ctx, &pipeline, entries)?;
            launches.push(Dispatch::elementwise(
                pipeline,
                bind,
                x.rows * slice.rows,
                SUM_WORKGROUP,
            ));
        }
        Ok(launches)
    }
}

/// The specialization of `gemv_grouped.wgsl` for one variant. Where the GEMV factors, the
/// format's rounding const is irrelevant and set to f32's, so such keys are shared.
fn grouped_key(
    shader: &FormatShader,
    layout: GroupedLayout,
    act: ActDtype,
    max_m: u32,
    variant: GemvVariant,
    oft: bool,
    lora: Option<EpilogueKind>,
) -> ShaderKey {
    let factored = layout.factored(act);
    let mut key = ShaderKey::new("gemv_grouped", "main", act)
        .flag(shader.flag, true)
        .flag("VEC4_WORDS", true);
    for (name, value) in &shader.consts {
        let value = if *name == "COMPUTE" && factored {
            0
        } else {
            *value
        };
        key = key.constant(name, value);
    }
    key = key
        .constant("WG", variant.workgroup_size)
        .constant("PACKED_ROWS", variant.rows_per_workgroup / layout.slabs)
        .constant("MAX_M", max_m)
        .constant("FACTORED", factored as u32)
        .flag("SUBGROUP", variant.reduction == Reduction::Subgroup)
        .flag("SPLIT_OUT", variant.split_k > 1);
    if oft {
        key = key.constant("CHUNK", OFT_CHUNK_VALUES / max_m);
    }
    let lora = if variant.split_k > 1 { None } else { lora };
    with_fused_flags(key, oft, lora)
}

fn split_sum_key(act: ActDtype, lora: Option<EpilogueKind>) -> ShaderKey {
    with_fused_flags(ShaderKey::new("gemv_split_sum", "main", act), false, lora)
}

/// Every grouped-GEMV specialization the library can request for a format specialization
/// (`shader`) whose weights may have `layout` (its group size aside): plain GEMVs in every
/// variant; fused ones (OFT prologue, LoRA epilogue) in workgroups of 64 with the default rows
/// per workgroup, as [`GpuQuantWeight::gemv_candidates`] narrows them.
pub(crate) fn grouped_keys(shader: &FormatShader, layout: GroupedLayout) -> Vec<ShaderKey> {
    let mut keys = Vec::new();
    for act in [ActDtype::F32, ActDtype::F16] {
        for lora in [None, Some(EpilogueKind::Single), Some(EpilogueKind::PerRow)] {
            keys.push(split_sum_key(act, lora));
        }
        for rows in GEMV_ROW_SPECIALIZATIONS {
            let max_m = rows as u32;
            let fused_options = [
                (false, None),
                (true, None),
                (false, Some(EpilogueKind::Single)),
                (false, Some(EpilogueKind::PerRow)),
                (true, Some(EpilogueKind::Single)),
                (true, Some(EpilogueKind::PerRow)),
            ];
            for (oft, lora) in fused_options {
                let fused = oft || lora.is_some();
                // Every subgroup size the reduction accepts sizes its memory alike.
                for variant in layout.variants(u32::MAX, max_m, u32::MAX, Some(MIN_SUBGROUP), fused)
                {
                    keys.push(grouped_key(shader, layout, act, max_m, variant, oft, lora));
                }
            }
        }
    }
    keys
}

impl GpuQuantWeight {
    /// The tuning cache's key of this weight's GEMV for `rows` rows at `act` activations.
    pub fn gemv_key(&self, act: ActDtype, rows: usize) -> GemvKey {
        GemvKey::new(
            self.format_label(),
            act,
            (self.out_features, self.in_features),
            gemv_max_m(rows),
        )
    }

    /// The variant a GEMV of `rows` rows at `act` activations runs with here: the context's
    /// tuned one where its tuning has an entry that is still a candidate (bare GEMVs only), else
    /// [`Self::gemv_default`].
    pub fn gemv_choice(
        &self,
        ctx: &GpuContext,
        rows: usize,
        act: ActDtype,
        fused: &Fused,
    ) -> GemvVariant {
        if fused.is_empty() {
            let tuned = ctx
                .tuned_gemv(&self.gemv_key(act, rows))
                .filter(|v| self.gemv_candidates(ctx, rows, fused).contains(v));
            if let Some(v) = tuned {
                return v;
            }
        }
        self.gemv_default(ctx, rows, fused)
    }
}
