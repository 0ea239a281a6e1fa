//! The suite's report: device, date, command, every entry with its ratios, the targets; as a
//! text table, as Markdown for BENCHMARKS.md, and as JSON.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::bench::entry::{Entry, Timing};
use crate::bench::plan::Scale;
use crate::bench::targets::{TargetCheck, Verdict};
use crate::error::{Error, Result};

/// The results of one run of the suite.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The GPU adapter, its backend and the optional features in use.
    pub device: String,
    /// A CPU rasterizer (lavapipe): its times are CPU times, not GPU figures.
    pub software_adapter: bool,
    /// UTC, `YYYY-MM-DD`.
    pub date: String,
    /// The command line that reproduces the run.
    pub command: String,
    /// The scale the suite ran at.
    pub scale: Scale,
    /// The streaming-read yardstick of this run, in GB/s: the read roofline.
    pub read_gb_per_s: f64,
    /// The FMA yardstick of this run, in GFLOP/s: the compute ceiling.
    pub fma_gflop_per_s: f64,
    /// Every measured item, yardsticks first, with its ratios filled.
    pub entries: Vec<Entry>,
    /// Every performance target checked against the entries it applies to.
    pub targets: Vec<TargetCheck>,
}

fn opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

fn shape(e: &Entry) -> String {
    if e.out_features == 0 {
        "-".to_string()
    } else {
        format!("{}x{}", e.out_features, e.in_features)
    }
}

fn rows(e: &Entry) -> String {
    if e.m == 0 {
        "-".to_string()
    } else {
        e.m.to_string()
    }
}

fn megabytes(bytes: usize) -> String {
    if bytes == 0 {
        "-".to_string()
    } else {
        format!("{:.2}", bytes as f64 / 1e6)
    }
}

fn launches(e: &Entry) -> String {
    match e.timing {
        Timing::GpuTimestamps => e.launches.to_string(),
        Timing::WallClock => "wall clock".to_string(),
    }
}

fn verdict(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "pass",
        Verdict::Miss => "miss",
        Verdict::NotJudged => "not judged (software adapter)",
    }
}

/// Columns padded to their widest cell.
fn text_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..headers.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].chars().count())
                .chain([headers[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out += &line(r.iter().map(String::as_str).collect());
    }
    out
}

fn markdown_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = format!("| {} |\n", headers.join(" | "));
    out += &format!("|{}\n", " --- |".repeat(headers.len()));
    for r in rows {
        out += &format!("| {} |\n", r.join(" | "));
    }
    out
}

impl Report {
    /// Every column of every entry.
    pub fn table(&self) -> String {
        let headers = [
            "item",
            "shape",
            "M",
            "launches",
            "us",
            "GB/s",
            "% read",
            "GFLOP/s",
            "% FMA",
            "x dense f16",
            "/ baseline",
            "resident MB",
            "B/weight",
            "copies",
        ];
        let rows: Vec<Vec<String>> = self
            .entries
            .iter()
            .map(|e| {
                vec![
                    e.name.clone(),
                    shape(e),
                    rows(e),
                    launches(e),
                    format!("{:.1}", e.us),
                    opt(e.gb_per_s, 2),
                    opt(e.pct_read_roofline, 1),
                    opt(e.gflop_per_s, 2),
                    opt(e.pct_fma_ceiling, 1),
                    opt(e.speedup_vs_dense_f16, 2),
                    opt(e.ratio_to_baseline, 2),
                    megabytes(e.resident_bytes),
                    opt(e.bytes_per_weight, 3),
                    e.copies.to_string(),
                ]
            })
            .collect();
        text_table(&headers, &rows) + &self.baselines_note()
    }

    /// Which item each "/ baseline" ratio divides by, one line per baseline.
    fn baselines_note(&self) -> String {
        let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
        for e in &self.entries {
            let Some(base) = e.baseline.as_deref() else {
                continue;
            };
            match groups.iter_mut().find(|(b, _)| *b == base) {
                Some((_, items)) if items.contains(&e.name.as_str()) => {}
                Some((_, items)) => items.push(&e.name),
                None => groups.push((base, vec![&e.name])),
            }
        }
        groups
            .iter()
            .map(|(base, items)| {
                format!(
                    "\"/ baseline\" is the time over {base} at the same shape and M for: {}\n",
                    items.join("; ")
                )
            })
            .collect()
    }

    /// The targets, one line each.
    pub fn targets_table(&self) -> String {
        let rows = self.target_rows();
        text_table(&["target", "item", "value", "bound", "verdict"], &rows)
    }

    fn target_rows(&self) -> Vec<Vec<String>> {
        self.targets
            .iter()
            .map(|t| {
                vec![
                    t.target.to_string(),
                    t.item.clone(),
                    format!("{:.2}{}", t.value, t.unit),
                    format!(
                        "{} {}{}",
                        if t.at_least { ">=" } else { "<=" },
                        t.threshold,
                        t.unit
                    ),
                    verdict(t.verdict).to_string(),
                ]
            })
            .collect()
    }

    /// The ratios (and, on a real GPU, the absolute figures and the wall-clock items) and the
    /// targets as Markdown.
    pub fn markdown(&self) -> String {
        let absolute = !self.software_adapter;
        let mut headers = vec!["item", "shape", "M", "launches"];
        if absolute {
            headers.extend(["us", "GB/s", "GFLOP/s"]);
        }
        headers.extend([
            "% read roofline",
            "% FMA ceiling",
            "x dense f16",
            "/ baseline",
            "resident MB",
            "B/weight",
        ]);
        let rows: Vec<Vec<String>> = self
            .entries
            .iter()
            .filter(|e| absolute || e.timing == Timing::GpuTimestamps)
            .map(|e| {
                let mut row = vec![e.name.clone(), shape(e), rows(e), launches(e)];
                if absolute {
                    row.extend([
                        format!("{:.1}", e.us),
                        opt(e.gb_per_s, 1),
                        opt(e.gflop_per_s, 1),
                    ]);
                }
                row.extend([
                    opt(e.pct_read_roofline, 1),
                    opt(e.pct_fma_ceiling, 1),
                    opt(e.speedup_vs_dense_f16, 2),
                    opt(e.ratio_to_baseline, 2),
                    megabytes(e.resident_bytes),
                    opt(e.bytes_per_weight, 3),
                ]);
                row
            })
            .collect();
        let mut out = format!(
            "- device: {}\n- date: {}\n- command: `{}`\n- scale: {}; yardsticks: streaming read {:.2} GB/s, f32 FMA {:.2} GFLOP/s\n\n",
            self.device,
            self.date,
            self.command,
            self.scale.name(),
            self.read_gb_per_s,
            self.fma_gflop_per_s
        );
        out += &markdown_table(&headers, &rows);
        out += "\n";
        out += &self.baselines_note().replace('\n', "\n\n");
        out += &markdown_table(
            &["target", "item", "value", "bound", "verdict"],
            &self.target_rows(),
        );
        out
    }

    /// Writes [`Self::markdown`] to `path`; fails with [`Error::Io`].
    pub fn write_markdown(&self, path: &Path) -> Result<()> {
        write_file(path, self.markdown().as_bytes())
    }

    /// Writes the report as pretty-printed JSON to `path`; fails with [`Error::Io`].
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        write_file(path, text.as_bytes())
    }
}

pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Today's date in UTC as `YYYY-MM-DD`.
pub fn utc_date(now: SystemTime) -> String {
    let days = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Proleptic Gregorian date of a count of days since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_of_known_day_counts() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_780), (2026, 11, 23));
    }
}
