// y = x · Wᵀ + bias for a few rows of x (M <= MAX_M), shaped for bandwidth, for layouts whose
// packed words run along K (HQQ with byte-packed fields, EETQ as repacked at load; VEC4_WORDS):
// one 16-byte load of packed row pr holds inputs k..k+15 of output rows s * slab_rows + pr for
// each of the SLABS slabs. The format provides `group_scale(g)` and `group_zero(g)` for group g
// of row n (g = n * K / group_size + the group's index in the row), `group_size()` and
// `slab_rows()`.
//
// A workgroup owns PACKED_ROWS packed rows (ROWS = SLABS * PACKED_ROWS outputs) and one of
// p.split_k slices of K's groups; each invocation takes whole groups, strided by WG. Per group it
// reads scale and zero once per row, and with FACTORED sums
//     y += s_g · (Σ_k x_k q_k − z_g Σ_k x_k)
// in f32, x read once per workgroup as vec4. Without FACTORED each weight is rounded to the
// compute dtype first, as the reference does (common/rounding.wgsl), for f32 activations on a
// rounding compute dtype, where the factored form would leave the 1e-4 tolerance.
// The WG partial sums of each output are reduced across the workgroup with subgroupAdd then
// workgroup memory, one slot per subgroup_id (SUBGROUP: the host checked that the adapter reports
// one subgroup size of at least MIN_SUBGROUP, so no workgroup has more than MAX_SUBGROUPS), or by
// a tree in workgroup memory.
// With SPLIT_OUT the sums go to `slices` ([split_k, M, n]) for gemv_split_sum.wgsl, which adds
// bias and the LoRA epilogue; otherwise they are written to y here. With OFT_PROLOGUE each
// workgroup rotates its slice of x CHUNK columns at a time into workgroup memory.
#include "common/quant_format.wgsl"

@group(0) @binding(6) var<storage, read> x: array<vec4<Act>>;

fn x_elem(i: u32) -> f32 {
    return f32(x[i >> 2u][i & 3u]);
}

#ifdef SPLIT_OUT
@group(0) @binding(5) var<storage, read_write> slices: array<f32>;
#else
@group(0) @binding(7) var<storage, read> bias: array<f32>;
@group(0) @binding(8) var<storage, read_write> y: array<Act>;
#endif

#include "common/fused_ops.wgsl"

const SLABS: u32 = 8u / FIELD_BITS;
const ROWS: u32 = SLABS * PACKED_ROWS;
const OUTPUTS: u32 = ROWS * MAX_M;
const MASK: u32 = (1u << FIELD_BITS) - 1u;
// Right shifts that bring the four byte fields of a word to bit 0, for the first slab (the high
// bits of each byte).
const BYTE_SHIFTS: vec4<u32> = vec4<u32>(8u - FIELD_BITS, 16u - FIELD_BITS, 24u - FIELD_BITS, 32u - FIELD_BITS);

#ifdef SUBGROUP
const MIN_SUBGROUP: u32 = 8u;
const MAX_SUBGROUPS: u32 = WG / MIN_SUBGROUP;
var<workgroup> partial: array<f32, OUTPUTS * MAX_SUBGROUPS>;
#else
// The host keeps OUTPUTS * WG within 2048 (8 KiB): one pass reduces every output.
var<workgroup> partial: array<f32, OUTPUTS * WG>;
#endif

#ifdef OFT_PROLOGUE
var<workgroup> x_chunk: array<vec4<f32>, MAX_M * CHUNK / 4u>;
var<private> chunk_start: u32;

// x[r, k..k+3] (4 | k) for a k of the current chunk, rotated.
fn x_vec(r: u32, k: u32) -> vec4<f32> {
    return x_chunk[(r * CHUNK + k - chunk_start) >> 2u];
}
#else
fn x_vec(r: u32, k: u32) -> vec4<f32> {
    return vec4<f32>(x[(r * p.k + k) >> 2u]);
}
#endif

// Output feature of accumulator row t = s * PACKED_ROWS + j (p.n when past the end).
fn output_row(tile: u32, t: u32) -> u32 {
    let pr = tile * PACKED_ROWS + t % PACKED_ROWS;
    let n = (t / PACKED_ROWS) * slab_rows() + pr;
    return select(p.n, n, pr < slab_rows() && n < p.n);
}

// The four codes of slab s in `word`, as floats.
fn codes(word: u32, s: u32) -> vec4<f32> {
    return vec4<f32>((vec4<u32>(word) >> (BYTE_SHIFTS - FIELD_BITS * s)) & vec4<u32>(MASK));
}

// Weights one unit covers: 16 inputs of each of the ROWS outputs (what tests/gemv_ops.rs divides
// a unit's ALU operations by).
const UNIT_WEIGHTS: u32 = 16u * ROWS;

// Adds inputs k..k+15 of every owned row (one 16-byte word per packed row) into
// acc[t * MAX_M + r], and x's sum over them into x_sum (FACTORED). `scale_of` and `zero_of` hold
// the group's metadata per accumulator row.
fn gemv_unit(acc: ptr<function, array<f32, OUTPUTS>>, x_sum: ptr<function, array<f32, MAX_M>>,
             tile: u32, k: u32, scale_of: array<f32, ROWS>, zero_of: array<f32, ROWS>) {
    var words: array<vec4<u32>, PACKED_ROWS>;
    for (var j = 0u; j < PACKED_ROWS; j++) {
        let pr = tile * PACKED_ROWS + j;
        if (pr < slab_rows()) {
            words[j] = packed[(pr * p.k + k) >> 4u];
        }
    }
    for (var c = 0u; c < 4u; c++) {
        var xv: array<vec4<f32>, MAX_M>;
        for (var r = 0u; r < MAX_M; r++) {
            if (r < p.m) {
                xv[r] = x_vec(r, k + 4u * c);
                (*x_sum)[r] += dot(xv[r], vec4<f32>(1.0));
            }
        }
        for (var s = 0u; s < SLABS; s++) {
            for (var j = 0u; j < PACKED_ROWS; j++) {
                let t = s * PACKED_ROWS + j;
                var w = codes(words[j][c], s);
                if (FACTORED == 0u) {
                    for (var e = 0u; e < 4u; e++) {
                        w[e] = to_compute(to_compute(w[e] - zero_of[t]) * scale_of[t]);
                    }
                }
                for (var r = 0u; r < MAX_M; r++) {
                    if (FACTORED == 1u) {
                        (*acc)[t * MAX_M + r] += scale_of[t] * dot(w, xv[r]);
                    } else {
                        (*acc)[t * MAX_M + r] += dot(w, xv[r]);
                    }
                }
            }
        }
    }
}

// Adds group g (inputs g * group_size ..) of every owned row into acc[t * MAX_M + r].
fn add_group(acc: ptr<function, array<f32, OUTPUTS>>, tile: u32, g: u32) {
    let groups_per_row = p.k / group_size();
    var scale_of: array<f32, ROWS>;
    var zero_of: array<f32, ROWS>;
    for (var t = 0u; t < ROWS; t++) {
        let n = output_row(tile, t);
        if (n < p.n) {
            let group = n * groups_per_row + g;
            scale_of[t] = group_scale(group);
            zero_of[t] = group_zero(group);
        }
    }
    var x_sum: array<f32, MAX_M>;
    let k0 = g * group_size();
    for (var i = 0u; i < group_size(); i += 16u) {
        gemv_unit(acc, &x_sum, tile, k0 + i, scale_of, zero_of);
    }
    if (FACTORED == 1u) {
        for (var t = 0u; t < ROWS; t++) {
            for (var r = 0u; r < MAX_M; r++) {
                (*acc)[t * MAX_M + r] -= scale_of[t] * zero_of[t] * x_sum[r];
            }
        }
    }
}

// Writes output v = t * MAX_M + r of the tile, summed over the workgroup.
fn write_output(tile: u32, split: u32, v: u32, sum: f32) {
    let t = v / MAX_M;
    let r = v % MAX_M;
    let n = output_row(tile, t);
    if (r >= p.m || n >= p.n) {
        return;
    }
#ifdef SPLIT_OUT
    slices[(split * p.m + r) * p.n + n] = sum;
#else
    store_output(r, n, sum);
#endif
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32
#ifdef SUBGROUP
        , @builtin(subgroup_invocation_id) sg_lane: u32
        , @builtin(subgroup_id) sg_id: u32
        , @builtin(num_subgroups) sg_count: u32
#endif
        ) {
    let linear = wid.x + wid.y * nwg.x;
    let tile = linear / p.split_k;
    let split = linear % p.split_k;
    let groups_per_row = p.k / group_size();
    let per_split = (groups_per_row + p.split_k - 1u) / p.split_k;
    let g_begin = split * per_split;
    let g_end = min(g_begin + per_split, groups_per_row);
    var acc: array<f32, OUTPUTS>;
#ifdef OFT_PROLOGUE
    // Chunks hold whole groups (the host checks group_size | CHUNK).
    let chunk_groups = CHUNK / group_size();
    for (var c0 = g_begin; c0 < g_end; c0 += chunk_groups) {
        chunk_start = c0 * group_size();
        let columns = min(c0 + chunk_groups, g_end) * group_size() - chunk_start;
        for (var i = lid; i < MAX_M * CHUNK; i += WG) {
            let r = i / CHUNK;
            let c = i % CHUNK;
            if (r < p.m && c < columns) {
                x_chunk[i >> 2u][i & 3u] = rotated_x(r, chunk_start + c);
            }
        }
        workgroupBarrier();
        // The groups this invocation takes without the prologue ((g - g_begin) % WG == lid), in
        // the same order, so both paths sum alike.
        let first = c0 + (lid + WG - (c0 - g_begin) % WG) % WG;
        for (var g = first; g < min(c0 + chunk_groups, g_end); g += WG) {
            add_group(&acc, tile, g);
        }
        workgroupBarrier();
    }
#else
    for (var g = g_begin + lid; g < g_end; g += WG) {
        add_group(&acc, tile, g);
    }
#endif
#ifdef SUBGROUP
    for (var v = 0u; v < OUTPUTS; v++) {
        let sum = subgroupAdd(acc[v]);
        if (sg_lane == 0u) {
            partial[v * MAX_SUBGROUPS + sg_id] = sum;
        }
    }
    workgroupBarrier();
    for (var v = lid; v < OUTPUTS; v += WG) {
        var sum = 0.0;
        for (var i = 0u; i < sg_count; i++) {
            sum += partial[v * MAX_SUBGROUPS + i];
        }
        write_output(tile, split, v, sum);
    }
#else
    for (var v = 0u; v < OUTPUTS; v++) {
        partial[v * WG + lid] = acc[v];
    }
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride) {
            for (var v = 0u; v < OUTPUTS; v++) {
                partial[v * WG + lid] += partial[v * WG + lid + stride];
            }
        }
        workgroupBarrier();
    }
    for (var v = lid; v < OUTPUTS; v += WG) {
        write_output(tile, split, v, partial[v * WG]);
    }
#endif
}
