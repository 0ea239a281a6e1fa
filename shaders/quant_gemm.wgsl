// y = x · Wᵀ + bias for many rows, tiled (common/gemm_tiles.wgsl) with the weight dequantized as
// it is staged, f32 accumulation. With GEMM_WORDS the format decodes a run of inputs from one
// packed word (`gemm_decode_run` in its shader); otherwise each element is decoded on its own.
// With LORA_EPILOGUE one adapter's term joins the single write of y (common/fused_ops.wgsl).
#include "common/quant_format.wgsl"

@group(0) @binding(6) var<storage, read> x: array<Act>;
@group(0) @binding(7) var<storage, read> bias: array<f32>;
@group(0) @binding(8) var<storage, read_write> y: array<Act>;

#include "common/fused_ops.wgsl"
#include "common/gemm_tiles.wgsl"

fn gemm_weight_run(n: u32, k0: u32) -> array<f32, GEMM_RUN> {
#ifdef GEMM_WORDS
    return gemm_decode_run(n, k0);
#else
    var w: array<f32, GEMM_RUN>;
    for (var t = 0u; t < GEMM_RUN; t++) {
        if (k0 + t < p.k) {
            w[t] = dequant_weight(n, k0 + t);
        }
    }
    return w;
#endif
}

fn gemm_store(row: u32, col: u32, acc: f32) {
    store_output(row, col, acc);
}

@compute @workgroup_size(TILE, TILE)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    gemm_tiles(wid, lid, li);
}
