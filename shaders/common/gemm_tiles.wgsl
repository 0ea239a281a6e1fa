// The tiled GEMM shared by quant_gemm.wgsl and dense_matmul.wgsl: y[M, N] = x[M, K] · W[N, K]ᵀ.
// A workgroup of TILE x TILE invocations computes an OUT_TILE x OUT_TILE block of y (rows of x by
// output features), each invocation BLOCK x BLOCK of it in registers, at rows ty + TILE * i and
// features tx + TILE * j (reads of workgroup memory and writes of y stay contiguous across tx).
// x and the weight are staged TILE inputs at a time, so each staged value feeds BLOCK
// multiply-adds in every invocation that reads it; BLOCK is 1 for few rows (more workgroups),
// 4 for many. Sums run over k in order, wherever an output sits in its tile.
// The includer provides `x: array<Act>`, `p` with m, n, k, `fn gemm_weight(n, k) -> f32` and
// `fn gemm_store(row, col, acc)`.
const OUT_TILE: u32 = TILE * BLOCK;
// Row stride of the staging arrays: one past OUT_TILE. Neighbouring invocations of the staging
// loop write neighbouring kk of one row of x or W (so their global reads are contiguous); with a
// stride of OUT_TILE (16 or 64) a subgroup's 32 writes fell on 2 to 4 of 32 banks (8- to 16-way
// conflicts), with this one at most 2 share a bank.
const STAGE_STRIDE: u32 = OUT_TILE + 1u;

// [kk][row] and [kk][feature] of the current K-slice.
var<workgroup> xs: array<f32, TILE * STAGE_STRIDE>;
var<workgroup> ws: array<f32, TILE * STAGE_STRIDE>;

fn gemm_tiles(wid: vec3<u32>, lid: vec3<u32>, li: u32) {
    let row0 = wid.y * OUT_TILE;
    let col0 = wid.x * OUT_TILE;
    var acc: array<f32, BLOCK * BLOCK>;
    for (var k0 = 0u; k0 < p.k; k0 += TILE) {
        for (var i = li; i < TILE * OUT_TILE; i += TILE * TILE) {
            let kk = i % TILE;
            let j = i / TILE;
            let k = k0 + kk;
            var xv = 0.0;
            if (row0 + j < p.m && k < p.k) {
                xv = f32(x[(row0 + j) * p.k + k]);
            }
            xs[kk * STAGE_STRIDE + j] = xv;
            var wv = 0.0;
            if (col0 + j < p.n && k < p.k) {
                wv = gemm_weight(col0 + j, k);
            }
            ws[kk * STAGE_STRIDE + j] = wv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TILE; kk++) {
            var xr: array<f32, BLOCK>;
            var wr: array<f32, BLOCK>;
            for (var b = 0u; b < BLOCK; b++) {
                xr[b] = xs[kk * STAGE_STRIDE + lid.y + TILE * b];
                wr[b] = ws[kk * STAGE_STRIDE + lid.x + TILE * b];
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
