//! One measured item of the suite, and the ratios that tie it to the yardsticks of the same run.

use serde::Serialize;

use crate::bench::rotate::Timed;

/// Which part of the suite an item belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    /// Streaming read, FMA ceiling, dense f16 matmul.
    Yardstick,
    /// A quantized base matmul alone.
    Base,
    /// A whole `QuantLinear` forward, with or without adapters.
    Layer,
    /// A batch whose rows use different adapters.
    Mixed,
    /// Re-quantization and merges.
    Merge,
}

/// How an item's time was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Timing {
    /// Timestamp queries around back-to-back runs over rotated copies.
    GpuTimestamps,
    /// Host wall clock of a whole call, including transfers and waits.
    WallClock,
}

/// One row of the report. Shape and M are 0 where an item has none.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    /// The part of the suite it belongs to.
    pub group: Group,
    /// What was measured, e.g. `layer hqq4` (the same name at every shape and M).
    pub name: String,
    /// Output features (weight rows) of the measured layer.
    pub out_features: usize,
    /// Input features (weight columns) of the measured layer.
    pub in_features: usize,
    /// Activation rows (tokens) per run.
    pub m: usize,
    /// Kernel launches per run (0 for wall-clock items, which do not count them).
    pub launches: usize,
    /// How [`Self::us`] was taken.
    pub timing: Timing,
    /// Copies of the data that rotated, so that no run finds its weights in cache (1 for
    /// wall-clock items).
    pub copies: usize,
    /// Runs recorded back to back per trial (1 for wall-clock items).
    pub runs_per_trial: usize,
    /// Microseconds per run.
    pub us: f64,
    /// Bytes a run must move at least: weights and adapter parameters, x, y, and each
    /// intermediate written and read back once.
    pub bytes: f64,
    /// Floating-point operations per run (a multiply-add counts 2).
    pub flops: f64,
    /// Bytes the item keeps resident on the GPU (weights, metadata, bias, adapters).
    pub resident_bytes: usize,
    /// [`Self::resident_bytes`] per weight of the `out x in` matrix: what a run reads per
    /// weight (0.5 plus metadata for 4-bit, 2 for dense f16); `None` for items without a
    /// shape or resident bytes.
    pub bytes_per_weight: Option<f64>,
    /// Achieved bandwidth, [`Self::bytes`] over [`Self::us`], in GB/s (10^9 bytes); `None` where
    /// `bytes` is 0.
    pub gb_per_s: Option<f64>,
    /// Achieved FLOP rate in GFLOP/s; `None` where `flops` is 0.
    pub gflop_per_s: Option<f64>,
    /// Achieved bandwidth as a percentage of the streaming-read yardstick of the same run.
    pub pct_read_roofline: Option<f64>,
    /// Achieved FLOP rate as a percentage of the FMA yardstick of the same run.
    pub pct_fma_ceiling: Option<f64>,
    /// Dense f16 time at the same shape and M over this item's time.
    pub speedup_vs_dense_f16: Option<f64>,
    /// Name of the item of the same shape and M this one is compared with.
    pub baseline: Option<String>,
    /// This item's time over the baseline's (below 1 is faster); `None` without a baseline or
    /// where it was not measured.
    pub ratio_to_baseline: Option<f64>,
}

/// What an item is, before it is timed.
pub struct Item {
    pub group: Group,
    pub name: String,
    pub shape: (usize, usize),
    pub m: usize,
    pub launches: usize,
    pub bytes: f64,
    pub flops: f64,
    pub resident_bytes: usize,
    pub baseline: Option<String>,
}

impl Item {
    /// A matmul-shaped item: `flops` and `bytes` for one run.
    pub fn new(group: Group, name: impl Into<String>, shape: (usize, usize), m: usize) -> Self {
        Self {
            group,
            name: name.into(),
            shape,
            m,
            launches: 1,
            bytes: 0.0,
            flops: 0.0,
            resident_bytes: 0,
            baseline: None,
        }
    }

    /// The entry for a GPU-timed run.
    pub fn timed(self, timed: Timed) -> Entry {
        self.entry(
            Timing::GpuTimestamps,
            timed.us,
            (timed.copies, timed.runs_per_trial),
        )
    }

    /// The entry for a wall-clock time.
    pub fn wall_clock(mut self, us: f64) -> Entry {
        self.launches = 0;
        self.entry(Timing::WallClock, us, (1, 1))
    }

    fn entry(self, timing: Timing, us: f64, (copies, runs_per_trial): (usize, usize)) -> Entry {
        let rate = |amount: f64| (amount > 0.0).then(|| amount / us / 1e3);
        let weights = self.shape.0 * self.shape.1;
        let bytes_per_weight = (weights > 0 && self.resident_bytes > 0)
            .then(|| self.resident_bytes as f64 / weights as f64);
        Entry {
            group: self.group,
            name: self.name,
            out_features: self.shape.0,
            in_features: self.shape.1,
            m: self.m,
            launches: self.launches,
            timing,
            copies,
            runs_per_trial,
            us,
            bytes: self.bytes,
            flops: self.flops,
            resident_bytes: self.resident_bytes,
            bytes_per_weight,
            gb_per_s: rate(self.bytes),
            gflop_per_s: rate(self.flops),
            pct_read_roofline: None,
            pct_fma_ceiling: None,
            speedup_vs_dense_f16: None,
            baseline: self.baseline,
            ratio_to_baseline: None,
        }
    }
}

/// Bytes of `rows x cols` f32 values.
pub fn f32_bytes(rows: usize, cols: usize) -> f64 {
    (rows * cols * 4) as f64
}

/// The name of the dense f16 yardstick entries.
pub const DENSE_F16: &str = "dense f16";

/// Fills every ratio from the entries of the same run: `read_gbps` and `fma_gflops` are the
/// yardsticks' rates.
pub fn fill_ratios(entries: &mut [Entry], read_gbps: f64, fma_gflops: f64) {
    let times: Vec<(String, (usize, usize, usize), f64)> = entries
        .iter()
        .map(|e| (e.name.clone(), (e.out_features, e.in_features, e.m), e.us))
        .collect();
    let time_of = |name: &str, at: (usize, usize, usize)| {
        times
            .iter()
            .find(|(n, key, _)| n == name && *key == at)
            .map(|(_, _, us)| *us)
    };
    for e in entries.iter_mut() {
        let at = (e.out_features, e.in_features, e.m);
        e.pct_read_roofline = e.gb_per_s.map(|r| 100.0 * r / read_gbps);
        e.pct_fma_ceiling = e.gflop_per_s.map(|r| 100.0 * r / fma_gflops);
        if matches!(e.group, Group::Base | Group::Layer | Group::Mixed) {
            e.speedup_vs_dense_f16 = time_of(DENSE_F16, at).map(|dense| dense / e.us);
        }
        if let Some(base) = &e.baseline {
            e.ratio_to_baseline = time_of(base, at).map(|b| e.us / b);
        }
    }
}
