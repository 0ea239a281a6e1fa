// GPTQ: qweight int32 [ceil(K*BITS/32), N] packed along K, qzeros int32 [G, ceil(N*BITS/32)]
// packed along N, both as little-endian bit streams (3-bit: 32 values in 3 words); scales f16
// [G, N] (held as f32); g_idx [K]. Const BITS; ZERO_OFFSET 1 for v1 files (stored zero - 1).
#include "common/rounding.wgsl"

struct FormatParams {
    zero_words: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(1) var<uniform> q: FormatParams;
#ifdef WORD_UNITS
// Read a tile's four rows at a time by the GEMV's units.
@group(0) @binding(2) var<storage, read> qweight: array<vec4<u32>>;

fn qweight_word(i: u32) -> u32 {
    return qweight[i >> 2u][i & 3u];
}
#else
@group(0) @binding(2) var<storage, read> qweight: array<u32>;

fn qweight_word(i: u32) -> u32 {
    return qweight[i];
}
#endif
@group(0) @binding(3) var<storage, read> qzeros: array<u32>;
@group(0) @binding(4) var<storage, read> scales: array<f32>;
@group(0) @binding(5) var<storage, read> g_idx: array<u32>;

const MASK: u32 = (1u << BITS) - 1u;

// Field i of a bit stream whose word j is read by `word(j)`, as (word index, shift) pairs.
fn stream_field(i: u32) -> vec2<u32> {
    if (BITS == 3u) {
        let bit = 96u * (i / 32u) + 3u * (i % 32u);
        return vec2<u32>(bit / 32u, bit % 32u);
    }
    let per_word = 32u / BITS;
    return vec2<u32>(i / per_word, BITS * (i % per_word));
}

fn gptq_code(k: u32, n: u32) -> u32 {
    let at = stream_field(k);
    var v = qweight_word(at.x * p.n + n) >> at.y;
    if (at.y > 32u - BITS) {
        v |= qweight_word((at.x + 1u) * p.n + n) << (32u - at.y);
    }
    return v & MASK;
}

fn gptq_zero(g: u32, n: u32) -> u32 {
    let at = stream_field(n);
    var v = qzeros[g * q.zero_words + at.x] >> at.y;
    if (at.y > 32u - BITS) {
        v |= qzeros[g * q.zero_words + at.x + 1u] << (32u - at.y);
    }
    return ((v & MASK) + ZERO_OFFSET) & MASK;
}

// scale * (q - z), rounded once to f16 as GPTQ's fp16 dequantization is.
fn dequant_weight(n: u32, k: u32) -> f32 {
    let g = g_idx[k];
    let diff = i32(gptq_code(k, n)) - i32(gptq_zero(g, n));
    return to_compute(scales[g * p.n + n] * f32(diff));
}

#ifdef WORD_UNITS
// Word-at-a-time decoding for the GEMV, for widths whose fields never straddle a word (2, 4 and
// 8 bits), 32 / BITS | K and 4 | N: the word (k0 / UNIT_K, n) of qweight holds inputs
// k0..k0+UNIT_K-1 of row n, and the words of a tile's ROWS = 4 rows are one 16-byte load. A
// unit fetches a group's zero and scale once per run of inputs in that group (every input of a
// word unless act-order interleaves groups).
const UNIT_K: u32 = 32u / BITS;

fn gemv_row(tile: u32, t: u32) -> u32 {
    return tile * ROWS + t;
}

fn gemv_unit(acc: ptr<function, array<f32, MAX_M * ROWS>>, tile: u32, k0: u32) {
    let words = qweight[((k0 / UNIT_K) * p.n + gemv_row(tile, 0u)) >> 2u];
    var unit_zero: array<i32, ROWS>;
    var unit_scale: array<f32, ROWS>;
    var group = 0xffffffffu;
    for (var j = 0u; j < UNIT_K; j++) {
        let k = k0 + j;
        if (g_idx[k] != group) {
            group = g_idx[k];
            for (var t = 0u; t < ROWS; t++) {
                let n = gemv_row(tile, t);
                if (n < p.n) {
                    unit_zero[t] = i32(gptq_zero(group, n));
                    unit_scale[t] = scales[group * p.n + n];
                }
            }
        }
        let xk = x_column(k);
        for (var t = 0u; t < ROWS; t++) {
            if (gemv_row(tile, t) < p.n) {
                let code = i32((words[t] >> (BITS * j)) & MASK);
                let w = to_compute(unit_scale[t] * f32(code - unit_zero[t]));
                for (var r = 0u; r < MAX_M; r++) {
                    (*acc)[t * MAX_M + r] += w * xk[r];
                }
            }
        }
    }
}
#endif
