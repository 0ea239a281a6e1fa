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
