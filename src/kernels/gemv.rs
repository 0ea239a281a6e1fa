//! Launch shapes of the quantized GEMV (placeholder until the GEMV rewrite lands).

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::gpu::{ActDtype, GpuContext, GpuTensor};
use crate::kernels::fused::Fused;
use crate::kernels::quant::GpuQuantWeight;
use crate::kernels::{Dispatch, MatmulPath, gemv_max_m};
use crate::tune::GemvKey;

/// How the GEMV reduces partial sums across a workgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reduction {
    /// A tree in workgroup memory.
    Workgroup,
    /// Subgroup operations, then workgroup memory across subgroups.
    Subgroup,
}

/// One launch shape of the GEMV.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GemvVariant {
    /// Invocations per workgroup.
    pub workgroup_size: u32,
    /// Output features per workgroup.
    pub rows_per_workgroup: u32,
    /// Slices of K reduced by separate workgroups.
    pub split_k: u32,
    /// How partial sums are reduced.
    pub reduction: Reduction,
}

impl GpuQuantWeight {
    /// Every variant valid here.
    pub fn gemv_candidates(
        &self,
        ctx: &GpuContext,
        rows: usize,
        fused: &Fused,
    ) -> Vec<GemvVariant> {
        vec![self.gemv_default(ctx, rows, fused)]
    }

    /// The heuristic choice.
    pub fn gemv_default(&self, _ctx: &GpuContext, _rows: usize, _fused: &Fused) -> GemvVariant {
        GemvVariant {
            workgroup_size: 64,
            rows_per_workgroup: 4,
            split_k: 1,
            reduction: Reduction::Workgroup,
        }
    }

    /// Records a GEMV with this variant.
    pub fn prepare_gemv(
        &self,
        ctx: &GpuContext,
        x: &GpuTensor,
        y: &GpuTensor,
        _variant: GemvVariant,
        fused: &Fused,
    ) -> Result<Dispatch> {
        self.prepare_fused(ctx, x, y, MatmulPath::Gemv, fused)
    }

    /// The tuning cache's key of this weight's GEMV for `rows` rows at `act` activations.
    pub fn gemv_key(&self, act: ActDtype, rows: usize) -> GemvKey {
        GemvKey::new(
            self.format_label(),
            act,
            (self.out_features, self.in_features),
            gemv_max_m(rows),
        )
    }
}

impl GpuQuantWeight {
    /// The variant a GEMV of `rows` rows at `act` activations runs with here: the tuned one
    /// where the context's tuning has an entry that is still a candidate, else the default.
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
