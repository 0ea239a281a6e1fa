//! What the suite measures at each scale: shapes, row counts, yardstick sizes, how many weight
//! copies rotate and how often each measurement repeats.

use serde::Serialize;

use crate::gpu::GpuContext;
use crate::gpu::timing::Trials;

/// How big the suite runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scale {
    /// 8B-class model shapes (4096x4096, 14336x4096, 4096x14336; M up to 4096): a real GPU.
    Full,
    /// Every dimension divided by 16 and M capped at 64, so a software adapter finishes in
    /// minutes.
    Small,
    /// One 128x128 shape and M = 1, 16: one item of every kind, for tests.
    Tiny,
}

impl Scale {
    /// Full on a real GPU, small on a software adapter.
    pub fn auto(ctx: &GpuContext) -> Self {
        if ctx.is_software() {
            Self::Small
        } else {
            Self::Full
        }
    }

    /// The scale as `quantadapt bench --scale` and the report spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Small => "small",
            Self::Tiny => "tiny",
        }
    }
}

/// Rows per batch of the mixed-adapter item, one adapter each.
pub const MIXED_ROWS: usize = 16;
/// The OFT block size and LoRA rank of the adapted layers.
pub const OFT_BLOCK: usize = 32;
pub const LORA_RANK: usize = 16;

/// The measurements of one scale.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The scale this plan was made for.
    pub scale: Scale,
    /// `(out, in)` of every matmul shape.
    pub shapes: Vec<(usize, usize)>,
    /// Rows of x for the dense and quantized matmuls.
    pub rows: Vec<usize>,
    /// Rows of x for the whole layers (with and without adapters).
    pub layer_rows: Vec<usize>,
    /// Bytes the streaming-read yardstick reads per launch.
    pub stream_bytes: usize,
    /// Invocations (threads) of the FMA yardstick's launch.
    pub fma_invocations: usize,
    /// Steps each invocation runs; a step is 16 dependent-free FMAs (four vec4 chains).
    pub fma_steps: usize,
    /// Copies of each item's data rotate until they hold at least this many bytes (so the
    /// working set exceeds the last-level cache), up to `max_copies`.
    pub rotate_bytes: usize,
    /// The most copies an item rotates, whatever its size.
    pub max_copies: usize,
    /// Each timed trial records enough runs to last about this long, up to `max_runs`.
    pub trial_us: f64,
    /// The most runs one trial records (rounded up to a whole rotation of the copies).
    pub max_runs: usize,
    /// The first warm-up trial is one rotation that also sizes the others.
    pub trials: Trials,
    /// Repeats of the wall-clock items (re-quantization, merge + unmerge), median kept.
    pub wall_trials: usize,
}

const MIB: usize = 1 << 20;

impl Plan {
    /// The measurements of `scale`.
    pub fn new(scale: Scale) -> Self {
        let full_shapes = [(4096, 4096), (14336, 4096), (4096, 14336)];
        match scale {
            Scale::Full => Self {
                scale,
                shapes: full_shapes.to_vec(),
                rows: vec![1, 16, 256, 4096],
                layer_rows: vec![1, 16],
                stream_bytes: 256 * MIB,
                fma_invocations: 1 << 20,
                fma_steps: 2048,
                rotate_bytes: 256 * MIB,
                max_copies: 64,
                trial_us: 5_000.0,
                max_runs: 2_000,
                trials: Trials {
                    warmup: 2,
                    trials: 9,
                },
                wall_trials: 5,
            },
            Scale::Small => Self {
                scale,
                shapes: full_shapes.iter().map(|(o, i)| (o / 16, i / 16)).collect(),
                rows: vec![1, 16, 64],
                layer_rows: vec![1, 16],
                stream_bytes: 32 * MIB,
                fma_invocations: 1 << 14,
                fma_steps: 1024,
                rotate_bytes: 4 * MIB,
                max_copies: 4,
                trial_us: 30_000.0,
                max_runs: 32,
                trials: Trials {
                    warmup: 2,
                    trials: 5,
                },
                wall_trials: 3,
            },
            Scale::Tiny => Self {
                scale,
                shapes: vec![(128, 128)],
                rows: vec![1, 16],
                layer_rows: vec![1, 16],
                stream_bytes: MIB,
                fma_invocations: 1 << 11,
                fma_steps: 256,
                rotate_bytes: MIB / 2,
                max_copies: 2,
                trial_us: 1_000.0,
                max_runs: 8,
                trials: Trials {
                    warmup: 1,
                    trials: 3,
                },
                wall_trials: 1,
            },
        }
    }

    /// The shape of the mixed batch, the re-quantization and the merge: the first one.
    pub fn first_shape(&self) -> (usize, usize) {
        self.shapes[0]
    }

    /// How many copies of `bytes_per_copy` the rotation uses.
    pub fn copies(&self, bytes_per_copy: usize) -> usize {
        self.rotate_bytes
            .div_ceil(bytes_per_copy.max(1))
            .clamp(1, self.max_copies)
    }
}
