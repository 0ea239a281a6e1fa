// The tiled GEMM shared by quant_gemm.wgsl and dense_matmul.wgsl: y[M, N] = x[M, K] · W[N, K]ᵀ.
// A workgroup of TILE x TILE invocations computes an OUT_TILE x OUT_TILE block of y (rows of x by
// output features), each invocation BLOCK x BLOCK of it in registers, at rows ty + TILE * i and
// features tx + TILE * j (reads of workgroup memory and writes of y stay contiguous across tx).
// x and the weight are staged SLICE_K inputs at a time, so each staged value feeds BLOCK
// multiply-adds in every invocation that reads it; BLOCK is 1 for few rows (more workgroups),
// 4 for many. Sums run over k in order, wherever an output sits in its tile.
// Staging works in runs of GEMM_RUN consecutive inputs of one row: the weight's decoder
// reads a packed word once for all of a run (`gemm_weight_run`). Staged values sit at
// [k][row or feature] and consecutive invocations take consecutive rows, so both the staging
// writes and the tile reads of consecutive invocations hit consecutive banks.
// The includer provides `x: array<Act>`, `p` with m, n, k,
// `fn gemm_weight_run(n, k0) -> array<f32, GEMM_RUN>` (W[n, k0..k0 + GEMM_RUN], zero past K)
// and `fn gemm_store(row, col, acc)`.
const OUT_TILE: u32 = TILE * BLOCK;
const GEMM_RUN: u32 = 4u;
const SLICE_K: u32 = 16u;
const SLICE_RUNS: u32 = SLICE_K / GEMM_RUN;

var<workgroup> xs: array<f32, SLICE_K * OUT_TILE>;
var<workgroup> ws: array<f32, SLICE_K * OUT_TILE>;

// x[row, k0..k0 + GEMM_RUN], zero past M or K.
fn gemm_x_run(row: u32, k0: u32) -> array<f32, GEMM_RUN> {
    var v: array<f32, GEMM_RUN>;
    if (row < p.m) {
        for (var t = 0u; t < GEMM_RUN; t++) {
            if (k0 + t < p.k) {
                v[t] = f32(x[row * p.k + k0 + t]);
            }
        }
    }
    return v;
}

fn gemm_tiles(wid: vec3<u32>, lid: vec3<u32>, li: u32) {
    let row0 = wid.y * OUT_TILE;
    let col0 = wid.x * OUT_TILE;
    var acc: array<f32, BLOCK * BLOCK>;
    for (var k0 = 0u; k0 < p.k; k0 += SLICE_K) {
        for (var i = li; i < SLICE_RUNS * OUT_TILE; i += TILE * TILE) {
            let j = i % OUT_TILE;
            let kr = (i / OUT_TILE) * GEMM_RUN;
            let xv = gemm_x_run(row0 + j, k0 + kr);
            var wv: array<f32, GEMM_RUN>;
            if (col0 + j < p.n) {
                wv = gemm_weight_run(col0 + j, k0 + kr);
            }
            for (var t = 0u; t < GEMM_RUN; t++) {
                xs[(kr + t) * OUT_TILE + j] = xv[t];
                ws[(kr + t) * OUT_TILE + j] = wv[t];
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < SLICE_K; kk++) {
            var xr: array<f32, BLOCK>;
            var wr: array<f32, BLOCK>;
            for (var b = 0u; b < BLOCK; b++) {
                xr[b] = xs[kk * OUT_TILE + lid.y + TILE * b];
                wr[b] = ws[kk * OUT_TILE + lid.x + TILE * b];
            }
            for (var i = 0u; i < BLOCK; i++) {
                for (var j = 0u; j < BLOCK; j++) {
                    acc[i * BLOCK + j] += xr[i] * wr[j];
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < BLOCK; i++) {
        for (var j = 0u; j < BLOCK; j++) {
            let row = row0 + lid.y + TILE * i;
            let col = col0 + lid.x + TILE * j;
            if (row < p.m && col < p.n) {
                gemm_store(row, col, acc[i * BLOCK + j]);
            }
        }
    }
}
