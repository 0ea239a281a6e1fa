// y = x · Wᵀ + bias for a few rows of x (M <= MAX_M, the specialization's power of two, so loops
// over rows have constant bounds; rows past M see x = 0 and are never written): each workgroup owns one tile of ROWS output
// features, its invocations stride over K one unit at a time and reduce in workgroup memory.
// A unit is UNIT_K consecutive inputs of the tile's rows: one element here, or with WORD_UNITS
// one packed word decoded by the format (`gemv_unit` in shaders/formats/<format>.wgsl), so each
// word is loaded once and its fields feed every output row they belong to.
// Makes no assumption about the subgroup size.
// With OFT_PROLOGUE, x is rotated CHUNK columns at a time into workgroup memory, so the rotation
// needs no launch of its own; with LORA_EPILOGUE one adapter's term joins the single write of y
// (common/fused_ops.wgsl).
#include "common/quant_format.wgsl"

@group(0) @binding(6) var<storage, read> x: array<Act>;
@group(0) @binding(7) var<storage, read> bias: array<f32>;
@group(0) @binding(8) var<storage, read_write> y: array<Act>;

fn x_elem(i: u32) -> f32 {
    return f32(x[i]);
}

#include "common/fused_ops.wgsl"

var<workgroup> partial: array<f32, WG * MAX_M * REDUCE_ROWS>;

#ifdef OFT_PROLOGUE
var<workgroup> x_chunk: array<f32, MAX_M * CHUNK>;
// First column of the chunk in x_chunk.
var<private> chunk_start: u32;

fn x_at(r: u32, k: u32) -> f32 {
    return x_chunk[r * CHUNK + k - chunk_start];
}
#else
fn x_at(r: u32, k: u32) -> f32 {
    return f32(x[r * p.k + k]);
}
#endif

// Column k of x in every row slot, zero past the p.m rows in use.
fn x_column(k: u32) -> array<f32, MAX_M> {
    var column: array<f32, MAX_M>;
    for (var r = 0u; r < MAX_M; r++) {
        if (r < p.m) {
            column[r] = x_at(r, k);
        }
    }
    return column;
}

#ifndef WORD_UNITS
const UNIT_K: u32 = 1u;

// Output feature of the tile's t-th accumulator row (>= p.n past the end).
fn gemv_row(tile: u32, t: u32) -> u32 {
    return tile * ROWS + t;
}

// Adds x[r, k] · W[n, k] into acc[t * MAX_M + r] for every owned row n = gemv_row(tile, t).
fn gemv_unit(acc: ptr<function, array<f32, MAX_M * ROWS>>, tile: u32, k: u32) {
    let xk = x_column(k);
    for (var t = 0u; t < ROWS; t++) {
        let n = gemv_row(tile, t);
        if (n < p.n) {
            let w = dequant_weight(n, k);
            for (var r = 0u; r < MAX_M; r++) {
                (*acc)[t * MAX_M + r] += w * xk[r];
            }
        }
    }
}
#endif

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let tile = wid.x + wid.y * nwg.x;
    var acc: array<f32, MAX_M * ROWS>;
#ifdef OFT_PROLOGUE
    for (var c0 = 0u; c0 < p.k; c0 += CHUNK) {
        for (var i = lid; i < p.m * CHUNK; i += WG) {
            let k = c0 + i % CHUNK;
            if (k < p.k) {
                x_chunk[i] = rotated_x(i / CHUNK, k);
            }
        }
        chunk_start = c0;
        workgroupBarrier();
        // The units this invocation would take without the prologue (u % WG == lid), in the
        // same order, so both paths sum alike.
        let first = c0 / UNIT_K;
        let end = min(c0 + CHUNK, p.k) / UNIT_K;
        for (var u = first + (lid + WG - first % WG) % WG; u < end; u += WG) {
            gemv_unit(&acc, tile, u * UNIT_K);
        }
        workgroupBarrier();
    }
#else
    for (var k = lid * UNIT_K; k < p.k; k += WG * UNIT_K) {
        gemv_unit(&acc, tile, k);
    }
#endif
    // REDUCE_ROWS of the tile's rows per pass, so `partial` fits beside x_chunk at any MAX_M.
    for (var t0 = 0u; t0 < ROWS; t0 += REDUCE_ROWS) {
        for (var i = 0u; i < MAX_M * REDUCE_ROWS; i++) {
            partial[i * WG + lid] = acc[t0 * MAX_M + i];
        }
        workgroupBarrier();
        for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
            if (lid < stride) {
                for (var i = 0u; i < MAX_M * REDUCE_ROWS; i++) {
                    partial[i * WG + lid] += partial[i * WG + lid + stride];
                }
            }
            workgroupBarrier();
        }
        if (lid < p.m * REDUCE_ROWS) {
            let t = t0 + lid / p.m;
            let r = lid % p.m;
            let n = gemv_row(tile, t);
            if (n < p.n) {
                store_output(r, n, partial[((t - t0) * MAX_M + r) * WG]);
            }
        }
        workgroupBarrier();
    }
}
