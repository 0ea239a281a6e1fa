// EETQ: int8 codes in plain row-major [K, N] (the CUTLASS layout is undone at load), four per
// word, and one f16 scale per output channel (held as f32).
#include "common/rounding.wgsl"

@group(0) @binding(2) var<storage, read> codes: array<u32>;
@group(0) @binding(3) var<storage, read> scales: array<f32>;

fn eetq_code(k: u32, n: u32) -> i32 {
    let e = k * p.n + n;
    let byte = (codes[e >> 2u] >> ((e & 3u) * 8u)) & 0xffu;
    return (i32(byte) << 24u) >> 24u;
}

// q * scale, rounded once to f16 as EETQ's fp16 dequantization is.
fn dequant_weight(n: u32, k: u32) -> f32 {
    return to_compute(f32(eetq_code(k, n)) * scales[n]);
}

#ifdef WORD_UNITS
// Word-at-a-time decoding for the GEMV when 4 | N: the word holding code (k, n) with 4 | n also
// holds outputs n+1..n+3, so a tile (ROWS a multiple of 4, starting at a multiple of ROWS)
// loads one word per four rows.
const UNIT_K: u32 = 1u;

fn gemv_row(tile: u32, t: u32) -> u32 {
    return tile * ROWS + t;
}

fn gemv_unit(acc: ptr<function, array<f32, MAX_M * ROWS>>, tile: u32, k: u32) {
    let xk = x_column(k);
    var word = 0u;
    for (var t = 0u; t < ROWS; t++) {
        let n = gemv_row(tile, t);
        if (n < p.n) {
            if (t % 4u == 0u) {
                word = codes[(k * p.n + n) >> 2u];
            }
            let code = i32(word << (24u - 8u * (t % 4u))) >> 24u;
            let w = to_compute(f32(code) * scales[n]);
            for (var r = 0u; r < MAX_M; r++) {
                (*acc)[t * MAX_M + r] += w * xk[r];
            }
        }
    }
}
#endif
