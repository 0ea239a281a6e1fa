// The dense f16 yardstick: y = x · Wᵀ + bias with W [N, K] in f16, each row padded with zeros to
// a whole number of 16-byte chunks of 8 values, read as vec4<u32> and widened with
// unpack2x16float (no SHADER_F16 needed for the weight). f32 accumulation. The GEMV is shaped
// as a strong bandwidth-bound kernel would be, so that "x dense f16" divides by an honest time.
struct DenseParams {
    m: u32,
    n: u32,
    k: u32,
    has_bias: u32,
}

@group(0) @binding(0) var<uniform> p: DenseParams;
@group(0) @binding(1) var<storage, read> weight: array<vec4<u32>>;
#ifdef X_VEC4
@group(0) @binding(2) var<storage, read> x: array<vec4<Act>>;
#else
@group(0) @binding(2) var<storage, read> x: array<Act>;
#endif
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<Act>;

#include "common/x_quads.wgsl"

fn row_chunks() -> u32 {
    return (p.k + 7u) / 8u;
}

fn finish(row: u32, col: u32, acc: f32) {
    var v = acc;
    if (p.has_bias == 1u) {
        v += bias[col];
    }
    y[row * p.n + col] = Act(v);
}

// A few rows of x (M <= MAX_M, the specialization's power of two): each workgroup owns ROWS
// output features, ROW_LANES invocations each, which walk the feature's weight row one 16-byte
// chunk (8 values) at a time, neighbours on neighbouring chunks, with x as vec4s. With SUBGROUP
// the ROW_LANES invocations of a feature are one subgroup (ROW_LANES is the device's one
// subgroup size) and add with subgroupAdd; otherwise a tree in workgroup memory.
const GEMV_WG: u32 = ROWS * ROW_LANES;

// A unit (tests/gemv_ops.rs counts its operations): the 8 weights of one chunk of a feature's
// row, at `index` in the weight and `c` along it, times x[r, 8c .. 8c + 8) into acc[r].
const UNIT_WEIGHTS: u32 = 8u;

fn gemv_unit(acc: ptr<function, array<f32, MAX_M>>, index: u32, c: u32) {
    let w = weight[index];
    let lo = vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
    let hi = vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w));
    for (var r = 0u; r < MAX_M; r++) {
        if (r < p.m) {
            (*acc)[r] += dot(x_quad(r, 2u * c), lo) + dot(x_quad(r, 2u * c + 1u), hi);
        }
    }
}

#ifndef SUBGROUP
var<workgroup> partial: array<f32, MAX_M * GEMV_WG>;
#endif

@compute @workgroup_size(GEMV_WG)
fn gemv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
#ifdef SUBGROUP
        @builtin(subgroup_id) feature_in_group: u32,
        @builtin(subgroup_invocation_id) lane: u32) {
#else
        @builtin(local_invocation_index) lid: u32) {
    let feature_in_group = lid / ROW_LANES;
    let lane = lid % ROW_LANES;
#endif
    let n = (wid.x + wid.y * nwg.x) * ROWS + feature_in_group;
    let chunks = row_chunks();
    // Past N, no chunk: the reductions below still run in step with the other features.
    let walked = select(0u, chunks, n < p.n);
    var acc: array<f32, MAX_M>;
    for (var c = lane; c < walked; c += ROW_LANES) {
        gemv_unit(&acc, n * chunks + c, c);
    }
#ifdef SUBGROUP
    for (var r = 0u; r < MAX_M; r++) {
        let total = subgroupAdd(acc[r]);
        if (lane == 0u && n < p.n && r < p.m) {
            finish(r, n, total);
        }
    }
#else
    for (var r = 0u; r < MAX_M; r++) {
        partial[r * GEMV_WG + lid] = acc[r];
    }
    workgroupBarrier();
    for (var stride = ROW_LANES / 2u; stride > 0u; stride /= 2u) {
        if (lane < stride) {
            for (var r = 0u; r < MAX_M; r++) {
                partial[r * GEMV_WG + lid] += partial[r * GEMV_WG + lid + stride];
            }
        }
        workgroupBarrier();
    }
    if (lane == 0u && n < p.n) {
        for (var r = 0u; r < p.m; r++) {
            finish(r, n, partial[r * GEMV_WG + lid]);
        }
    }
#endif
}

// Many rows: tiled (common/gemm_tiles.wgsl, which reads x by element: GEMM keys leave X_VEC4
// off).
#ifndef X_VEC4
#include "common/gemm_tiles.wgsl"

// A run of four inputs (4 | k0) is half of a 16-byte chunk; the zero padding of a row's last
// chunk supplies the inputs past K, and a run starting past K reads nothing.
fn gemm_weight_run(n: u32, k0: u32) -> array<f32, GEMM_RUN> {
    var w: array<f32, GEMM_RUN>;
    if (k0 < p.k) {
        let chunk = weight[n * row_chunks() + k0 / 8u];
        let half = (k0 % 8u) / 2u;
        let lo = unpack2x16float(chunk[half]);
        let hi = unpack2x16float(chunk[half + 1u]);
        w = array<f32, GEMM_RUN>(lo.x, lo.y, hi.x, hi.y);
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
#endif
