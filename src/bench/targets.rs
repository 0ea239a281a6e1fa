//! The suite's performance targets, each judged from entries of the same run. On a software
//! adapter they are shown but not judged: its figures are CPU times.

use serde::Serialize;

use crate::bench::base::BaseFormat;
use crate::bench::entry::Entry;
use crate::bench::layers::oft_layer;
use crate::bench::mixed::MIXED_MANY;
use crate::bench::plan::MIXED_ROWS;
use crate::layer::Fusion;

/// Whether a target was met.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The value is within the bound.
    Pass,
    /// The value is past the bound.
    Miss,
    /// Measured on a software adapter, where the targets (set for an H100) do not apply.
    NotJudged,
}

/// One target checked against one measured item.
#[derive(Clone, Debug, Serialize)]
pub struct TargetCheck {
    /// The target as text, e.g. `4-bit HQQ GEMV at M=1: >= 90% of the read roofline`.
    pub target: &'static str,
    /// The item and shape the value comes from.
    pub item: String,
    /// The measured value, in [`Self::unit`].
    pub value: f64,
    /// True if the value must be `>=` the threshold, false if `<=`.
    pub at_least: bool,
    /// The bound, in [`Self::unit`].
    pub threshold: f64,
    /// `%` (of a yardstick) or `x` (a ratio of times).
    pub unit: &'static str,
    /// Whether the bound was met.
    pub verdict: Verdict,
}

/// A target: which entries it reads, what value it takes from them, and the bound.
struct Target {
    text: &'static str,
    at_least: bool,
    threshold: f64,
    unit: &'static str,
    /// The entries it applies to (one check each) and the value of one.
    applies: fn(&Entry, usize) -> bool,
    value: fn(&Entry) -> Option<f64>,
}

const HQQ4: &str = BaseFormat::Hqq4.name();

fn targets() -> [Target; 5] {
    [
        Target {
            text: "4-bit HQQ GEMV at M=1: >= 90% of the read roofline",
            at_least: true,
            threshold: 90.0,
            unit: "%",
            applies: |e, _| e.name == HQQ4 && e.m == 1,
            value: |e| e.pct_read_roofline,
        },
        Target {
            text: "OFT-adapted 4-bit layer at M=1 (fusion auto): <= 1.10x the bare layer",
            at_least: false,
            threshold: 1.10,
            unit: "x",
            applies: |e, _| e.name == oft_layer(Fusion::Auto) && e.m == 1,
            value: |e| e.ratio_to_baseline,
        },
        Target {
            text: "4-bit HQQ at M=16: >= 3x faster than dense f16",
            at_least: true,
            threshold: 3.0,
            unit: "x",
            applies: |e, _| e.name == HQQ4 && e.m == 16,
            value: |e| e.speedup_vs_dense_f16,
        },
        Target {
            text: "16 rows with 16 different adapters: <= 1.3x the single-adapter time",
            at_least: false,
            threshold: 1.3,
            unit: "x",
            applies: |e, _| e.name == MIXED_MANY && e.m == MIXED_ROWS,
            value: |e| e.ratio_to_baseline,
        },
        Target {
            text: "prefill (largest M) 4-bit HQQ: >= 60% of the f32 FMA ceiling",
            at_least: true,
            threshold: 60.0,
            unit: "%",
            applies: |e, max_m| e.name == HQQ4 && e.m == max_m,
            value: |e| e.pct_fma_ceiling,
        },
    ]
}

/// Every target against every entry it applies to. `judged` is false on a software adapter.
pub fn check_targets(entries: &[Entry], judged: bool) -> Vec<TargetCheck> {
    let max_m = entries
        .iter()
        .filter(|e| e.name == HQQ4)
        .map(|e| e.m)
        .max()
        .unwrap_or(0);
    let mut checks = Vec::new();
    for t in targets() {
        for e in entries.iter().filter(|e| (t.applies)(e, max_m)) {
            let Some(value) = (t.value)(e) else { continue };
            let met = if t.at_least {
                value >= t.threshold
            } else {
                value <= t.threshold
            };
            checks.push(TargetCheck {
                target: t.text,
                item: format!("{} {}x{} M={}", e.name, e.out_features, e.in_features, e.m),
                value,
                at_least: t.at_least,
                threshold: t.threshold,
                unit: t.unit,
                verdict: match (judged, met) {
                    (false, _) => Verdict::NotJudged,
                    (true, true) => Verdict::Pass,
                    (true, false) => Verdict::Miss,
                },
            });
        }
    }
    checks
}
