// The dense f16 yardstick: y = x · Wᵀ + bias with W [N, K] in f16, two values per u32 word
// (unpack2x16float, so no SHADER_F16 is needed for the weight), each row padded to a whole
// number of words. f32 accumulation; the same launch shapes as quant_gemv / quant_gemm, so a
// ratio against this kernel isolates what the weight format costs or saves.
struct DenseParams {
    m: u32,
    n: u32,
    k: u32,
    has_bias: u32,
}

@group(0) @binding(0) var<uniform> p: DenseParams;
@group(0) @binding(1) var<storage, read> weight: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<Act>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<Act>;

var<workgroup> partial: array<f32, WG * MAX_M>;

#include "common/gemm_tiles.wgsl"

fn row_words() -> u32 {
    return (p.k + 1u) / 2u;
}

fn finish(row: u32, col: u32, acc: f32) {
    var v = acc;
    if (p.has_bias == 1u) {
        v += bias[col];
    }
    y[row * p.n + col] = Act(v);
}

// A few rows (M <= MAX_M, the specialization's power of two): one workgroup per output
// feature, each invocation takes whole words (two k) strided over K, and the workgroup reduces
// in shared memory.
@compute @workgroup_size(WG)
fn gemv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let n = wid.x + wid.y * nwg.x;
    var acc: array<f32, MAX_M>;
    if (n < p.n) {
        let words = row_words();
        for (var w = lid; w < words; w += WG) {
            let pair = unpack2x16float(weight[n * words + w]);
            let k = 2u * w;
            let has_second = k + 1u < p.k;
            for (var r = 0u; r < MAX_M; r++) {
                if (r < p.m) {
                    var v = pair.x * f32(x[r * p.k + k]);
                    if (has_second) {
                        v += pair.y * f32(x[r * p.k + k + 1u]);
                    }
                    acc[r] += v;
                }
            }
        }
    }
    for (var r = 0u; r < MAX_M; r++) {
        partial[r * WG + lid] = acc[r];
    }
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride) {
            for (var r = 0u; r < MAX_M; r++) {
                partial[r * WG + lid] += partial[r * WG + lid + stride];
            }
        }
        workgroupBarrier();
    }
    if (n < p.n && lid < p.m) {
        finish(lid, n, partial[lid * WG]);
    }
}

// Many rows: tiled (common/gemm_tiles.wgsl).
// Two words hold a run of four inputs (k0 is a multiple of four); the pad half of a row's
// last word and anything past K read as zero.
fn gemm_weight_run(n: u32, k0: u32) -> array<f32, GEMM_RUN> {
    var w: array<f32, GEMM_RUN>;
    for (var t = 0u; t < GEMM_RUN; t += 2u) {
        let k = k0 + t;
        if (k < p.k) {
            let pair = unpack2x16float(weight[n * row_words() + k / 2u]);
            w[t] = pair.x;
            if (k + 1u < p.k) {
                w[t + 1u] = pair.y;
            }
        }
    }
    return w;
}

fn gemm_store(row: u32, col: u32, acc: f32) {
    finish(row, col, acc);
}

@compute @workgroup_size(TILE, TILE)
fn gemm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    gemm_tiles(wid, lid, li);
}
