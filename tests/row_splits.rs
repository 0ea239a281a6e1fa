//! Host-side row splits of every format on fresh random weights: slices dequantize and run
//! exactly like the rows they were cut from, illegal boundaries are refused, and the planner
//! keeps every GPU buffer under the limit while covering every row.

mod common;

use std::ops::Range;

use quantadapt::Error;
use quantadapt::formats::eetq::EetqWeight;
use quantadapt::formats::gptq::{GptqConfig, GptqWeight, GptqZeros};
use quantadapt::formats::hqq::{HqqConfig, HqqWeight};
use quantadapt::formats::split::{RowSplit, plan_row_splits};
use quantadapt::formats::{QuantFormat, QuantWeight};
use quantadapt::tensor::Matrix;
use rand::Rng;
use rand::seq::SliceRandom;

use common::random_matrix;

fn random_bias(n: usize) -> Vec<f32> {
    random_matrix(1, n, 1.0).data
}

fn hqq(out: usize, inp: usize, nbits: u32, group_size: usize, axis: usize) -> QuantWeight {
    let mut config = HqqConfig::new(nbits, group_size, axis);
    config.optimize = false;
    let w = random_matrix(out, inp, 1.0);
    QuantWeight::Hqq(HqqWeight::quantize(&w, Some(random_bias(out)), &config).unwrap())
}

fn gptq(
    out: usize,
    inp: usize,
    bits: u32,
    group_size: Option<usize>,
    zeros: GptqZeros,
) -> QuantWeight {
    let config = GptqConfig {
        bits,
        group_size,
        sym: false,
        desc_act: true,
        zeros,
    };
    // A shuffled g_idx, as act-order writes it.
    let len = config.group_len(inp);
    let mut g_idx: Vec<u32> = (0..inp).map(|k| (k / len) as u32).collect();
    g_idx.shuffle(&mut rand::rng());
    let w = random_matrix(out, inp, 1.0);
    let mut q = GptqWeight::quantize_rtn(&w, config, Some(g_idx)).unwrap();
    q.bias = Some(random_bias(out));
    QuantWeight::Gptq(q)
}

fn eetq(out: usize, inp: usize) -> QuantWeight {
    let mut q = EetqWeight::quantize(&random_matrix(out, inp, 1.0)).unwrap();
    q.bias = Some(random_bias(out));
    QuantWeight::Eetq(q)
}

/// Every format, bit width and HQQ axis, with shapes whose row counts are not powers of two.
fn weights() -> Vec<(String, QuantWeight)> {
    let mut all = Vec::new();
    for nbits in [8, 6, 5, 4, 3, 2, 1] {
        for axis in [0, 1] {
            for group_size in [16, 64] {
                all.push((
                    format!("hqq b{nbits} ax{axis} g{group_size}"),
                    hqq(48, 96, nbits, group_size, axis),
                ));
            }
        }
    }
    for bits in [2, 3, 4, 8] {
        for (group_size, zeros) in [(Some(32), GptqZeros::V1), (None, GptqZeros::V2)] {
            all.push((
                format!("gptq b{bits} g{group_size:?} {zeros:?}"),
                gptq(37, 96, bits, group_size, zeros),
            ));
        }
    }
    all.push(("eetq".into(), eetq(37, 64)));
    all
}

/// Legal boundaries strictly inside the weight.
fn inner_boundaries(w: &QuantWeight) -> Vec<usize> {
    let g = w.row_split_granularity();
    (1..w.out_features()).filter(|r| r % g == 0).collect()
}

/// A random cut of the weight into legal ranges.
fn random_ranges(w: &QuantWeight) -> Vec<Range<usize>> {
    let mut rng = rand::rng();
    let inner = inner_boundaries(w);
    let mut cuts: Vec<usize> = inner
        .iter()
        .copied()
        .filter(|_| rng.random_bool(0.3))
        .collect();
    if cuts.is_empty() && !inner.is_empty() {
        cuts.push(inner[rng.random_range(0..inner.len())]);
    }
    cuts.insert(0, 0);
    cuts.push(w.out_features());
    cuts.windows(2).map(|p| p[0]..p[1]).collect()
}

fn concat_rows(parts: &[Matrix]) -> Matrix {
    let cols = parts[0].cols;
    let data: Vec<f32> = parts.iter().flat_map(|m| m.data.clone()).collect();
    Matrix::new(data.len() / cols, cols, data).unwrap()
}

/// `[m, a] ++ [m, b]` side by side.
fn concat_cols(parts: &[Matrix]) -> Matrix {
    let rows = parts[0].rows;
    let cols: usize = parts.iter().map(|m| m.cols).sum();
    let mut data = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for m in parts {
            data.extend_from_slice(m.row(r));
        }
    }
    Matrix::new(rows, cols, data).unwrap()
}

fn bits(m: &Matrix) -> Vec<u32> {
    m.data.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn slices_dequantize_and_run_bit_for_bit_like_their_rows() {
    for (name, w) in weights() {
        let full = w.dequantize();
        let x = random_matrix(3, w.in_features(), 1.0);
        let y = w.forward_cpu(&x).unwrap();
        let ranges = random_ranges(&w);
        let slices: Vec<QuantWeight> = ranges.iter().map(|r| w.rows(r.clone()).unwrap()).collect();
        for (r, s) in ranges.iter().zip(&slices) {
            assert_eq!(s.format_name(), w.format_name(), "{name}");
            assert_eq!(
                (s.out_features(), s.in_features()),
                (r.len(), w.in_features())
            );
            assert_eq!(
                s.bias().unwrap(),
                &w.bias().unwrap()[r.clone()],
                "{name} {r:?}"
            );
        }
        let dequantized: Vec<Matrix> = slices.iter().map(QuantFormat::dequantize).collect();
        assert_eq!(
            bits(&concat_rows(&dequantized)),
            bits(&full),
            "{name} {ranges:?}"
        );
        let outputs: Vec<Matrix> = slices.iter().map(|s| s.forward_cpu(&x).unwrap()).collect();
        assert_eq!(bits(&concat_cols(&outputs)), bits(&y), "{name} {ranges:?}");
    }
}

#[test]
fn a_slice_of_a_slice_is_the_slice_of_the_whole() {
    for (name, w) in weights() {
        let b = inner_boundaries(&w);
        let (Some(first), Some(last)) = (b.first(), b.last()) else {
            continue;
        };
        if first == last {
            continue;
        }
        let outer = w.rows(*first..w.out_features()).unwrap();
        let inner = outer.rows(0..last - first).unwrap();
        let direct = w.rows(*first..*last).unwrap();
        assert_eq!(
            bits(&inner.dequantize()),
            bits(&direct.dequantize()),
            "{name}"
        );
    }
}

#[test]
fn illegal_ranges_are_refused_naming_the_constraint() {
    for (name, w) in weights() {
        let n = w.out_features();
        #[allow(clippy::reversed_empty_ranges)]
        for bad in [3..3, 5..2, 0..n + 1, n..n + 1] {
            let err = w.rows(bad.clone()).unwrap_err();
            assert!(
                matches!(&err, Error::RowSplit { start, end, .. } if *start == bad.start && *end == bad.end),
                "{name} {bad:?}: {err}"
            );
        }
        let g = w.row_split_granularity();
        if g > 1 && g < n {
            let err = w.rows(1..n).unwrap_err().to_string();
            assert!(
                err.contains(&format!("multiples of {g} rows")),
                "{name}: {err}"
            );
            assert!(err.contains("group_size"), "{name}: {err}");
            let err = w.rows(0..g + 1).unwrap_err().to_string();
            assert!(
                err.contains(&format!("multiples of {g} rows")),
                "{name}: {err}"
            );
        }
    }
}

#[test]
fn granularity_is_one_for_gptq_and_eetq_and_follows_groups_and_packing_for_hqq() {
    assert_eq!(
        gptq(37, 96, 3, Some(32), GptqZeros::V1).row_split_granularity(),
        1
    );
    assert_eq!(eetq(37, 64).row_split_granularity(), 1);
    // Axis 1, in 96: group 64 straddles rows; a boundary needs rows * 96 % 64 == 0: 2 rows.
    assert_eq!(hqq(48, 96, 8, 64, 1).row_split_granularity(), 2);
    // 4-bit packs two grouped rows per byte: rows * 96 % 128 == 0 needs 4 rows.
    assert_eq!(hqq(48, 96, 4, 64, 1).row_split_granularity(), 4);
    // Axis 0, group 16 over 48 x 96: 288 groups, one code of each per grouped row; 1-bit packs
    // 8 grouped rows: rows * 96 % 2304 == 0 needs 24 rows.
    assert_eq!(hqq(48, 96, 1, 16, 0).row_split_granularity(), 24);
    // 3-bit pads its last slab, so only the groups count: rows * 96 % 64 == 0.
    assert_eq!(hqq(48, 96, 3, 64, 1).row_split_granularity(), 2);
}

/// Bytes each GPU buffer of `w` takes, measured from what it holds (as the upload pads them).
fn measured_buffers(w: &QuantWeight) -> Vec<(&'static str, usize)> {
    let pad = |raw: usize| raw.div_ceil(4).max(1) * 4;
    let bias = ("bias", pad(4 * w.bias().map_or(1, <[f32]>::len)));
    match w {
        QuantWeight::Hqq(h) => vec![
            ("hqq W_q", pad(h.packed.len())),
            ("hqq scale", pad(4 * h.scale.len())),
            ("hqq zero", pad(4 * h.zero.len())),
            bias,
        ],
        QuantWeight::Gptq(g) => vec![
            ("gptq qweight", pad(4 * g.qweight.len())),
            ("gptq qzeros", pad(4 * g.qzeros.len())),
            ("gptq scales", pad(4 * g.scales.len())),
            ("gptq g_idx", pad(4 * g.g_idx.len())),
            bias,
        ],
        QuantWeight::Eetq(e) => vec![
            ("eetq codes", pad(e.codes.len())),
            ("eetq scales", pad(4 * e.scales.len())),
            bias,
        ],
    }
}

#[test]
fn planned_buffer_sizes_match_the_slices() {
    for (name, w) in weights() {
        assert_eq!(
            w.row_split_buffers(w.out_features()),
            measured_buffers(&w),
            "{name}"
        );
        for r in random_ranges(&w) {
            let s = w.rows(r.clone()).unwrap();
            assert_eq!(
                w.row_split_buffers(r.len()),
                measured_buffers(&s),
                "{name} {r:?}"
            );
        }
    }
}

#[test]
fn the_planner_covers_every_row_with_legal_slices_under_the_limit() {
    for (name, w) in weights() {
        let largest = |r: Range<usize>| {
            let buffers = measured_buffers(&w.rows(r).unwrap());
            buffers.into_iter().map(|(_, bytes)| bytes).max().unwrap()
        };
        let largest_of = |plan: &[Range<usize>]| plan.iter().cloned().map(largest).max().unwrap();
        let whole = largest(0..w.out_features());
        assert_eq!(
            plan_row_splits(&w, whole).unwrap(),
            vec![0..w.out_features()],
            "{name}"
        );
        let smallest = w.row_split_granularity().min(w.out_features());
        let floor = largest(0..smallest);
        // A buffer that does not shrink with the rows (HQQ axis 0's scale) can make floor == whole.
        for limit in [floor, (floor + whole) / 2, whole - 1]
            .into_iter()
            .filter(|l| *l >= floor)
        {
            let Ok(plan) = plan_row_splits(&w, limit) else {
                panic!("{name}: no plan under {limit} bytes");
            };
            assert_eq!(plan.first().unwrap().start, 0, "{name}");
            assert_eq!(plan.last().unwrap().end, w.out_features(), "{name}");
            assert!(
                plan.windows(2).all(|p| p[0].end == p[1].start),
                "{name} {plan:?}"
            );
            assert!(largest_of(&plan) <= limit, "{name} {plan:?} over {limit}");
            if limit < whole {
                assert!(plan.len() > 1, "{name}: {limit} < {whole} needs a split");
            }
            // Each slice is as long as allowed: one more legal step would not fit.
            let first = plan[0].clone();
            let longer = first.end + w.row_split_granularity();
            if plan.len() > 1 && longer <= w.out_features() {
                assert!(largest(0..longer) > limit, "{name}: {first:?} could grow");
            }
        }
        let err = plan_row_splits(&w, floor - 1).unwrap_err();
        assert!(matches!(err, Error::Allocation { .. }), "{name}: {err}");
    }
}
