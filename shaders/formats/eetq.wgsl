// EETQ: int8 codes, repacked at load to row-major [N, K] (the CUTLASS layout undone, then
// transposed so each output's codes run along K), stored offset by 128 (code + 128 as a byte),
// four per word, and one f16 scale per output channel (held as f32). For the grouped GEMV each
// row is cut into groups of GEMV_GROUP inputs (`kernels::eetq::GEMV_GROUP`; the host checks that
// it divides K) that share the row's scale and a zero of 128.
#include "common/rounding.wgsl"

const GEMV_GROUP: u32 = 64u;
#ifdef VEC4_WORDS
@group(0) @binding(2) var<storage, read> packed: array<vec4<u32>>;

fn code_word(i: u32) -> u32 {
    return packed[i >> 2u][i & 3u];
}
#else
@group(0) @binding(2) var<storage, read> packed: array<u32>;

fn code_word(i: u32) -> u32 {
    return packed[i];
}
#endif
@group(0) @binding(3) var<storage, read> scales: array<f32>;

const ZERO_CODE: f32 = 128.0;

// Code q of weight (n, k), in -128..127.
fn eetq_code(n: u32, k: u32) -> f32 {
    let e = n * p.k + k;
    let byte = (code_word(e >> 2u) >> ((e & 3u) * 8u)) & 0xffu;
    return f32(byte) - ZERO_CODE;
}

// q * scale, rounded once to f16 as EETQ's fp16 dequantization is.
fn dequant_weight(n: u32, k: u32) -> f32 {
    return to_compute(eetq_code(n, k) * scales[n]);
}

// The grouped GEMV's view (gemv_grouped.wgsl): one slab of whole rows; group g is in row
// g / (groups per row).
fn group_size() -> u32 {
    return GEMV_GROUP;
}

fn slab_rows() -> u32 {
    return p.n;
}

fn group_scale(g: u32) -> f32 {
    return scales[g / (p.k / GEMV_GROUP)];
}

fn group_zero(g: u32) -> f32 {
    return ZERO_CODE;
}
