// LoRA / DoRA on the output of a base layer, in two entry points:
//   shrink: h[m, r] = sum_k x[m, k] * A[r, k]                     (one workgroup per h element)
//   expand: y[m, n] = y + (g - 1) * (y - bias) + g * s * sum_r h[m, r] * B[n, r]
// with g = 1 for LoRA and g = magnitude / ||W + s B A||_row for DoRA (precomputed per n).
#include "common/elementwise.wgsl"
#include "common/workgroup_sum.wgsl"

struct LoraParams {
    m: u32,
    k: u32,
    n: u32,
    r: u32,
    scaling: f32,
    dora: u32,
    has_bias: u32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> p: LoraParams;
// A's rows padded with zeros to a whole number of vec4.
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
#ifdef X_VEC4
@group(0) @binding(3) var<storage, read> x: array<vec4<Act>>;
#else
@group(0) @binding(3) var<storage, read> x: array<Act>;
#endif
@group(0) @binding(4) var<storage, read_write> h: array<f32>;
@group(0) @binding(5) var<storage, read> dora_scale: array<f32>;
@group(0) @binding(6) var<storage, read> bias: array<f32>;
@group(0) @binding(7) var<storage, read_write> y: array<Act>;

#include "common/x_quads.wgsl"

// The WG invocations of a workgroup walk K four inputs at a time, neighbours on neighbouring
// vectors, then add their sums (common/workgroup_sum.wgsl).
@compute @workgroup_size(WG)
fn shrink(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          lanes: Lanes) {
    let idx = wid.x + wid.y * nwg.x;
    if (idx >= p.m * p.r) {
        return;
    }
    let row = idx / p.r;
    let rank = idx % p.r;
    let quads = (p.k + 3u) / 4u;
    var acc = 0.0;
    for (var q = lanes.index; q < quads; q += WG) {
        acc += dot(x_quad(row, q), a[rank * quads + q]);
    }
    let total = workgroup_sum(acc, lanes);
    if (lanes.index == 0u) {
        h[idx] = total;
    }
}

@compute @workgroup_size(256)
fn expand(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = element_index(gid, nwg);
    if (idx >= p.m * p.n) {
        return;
    }
    let row = idx / p.n;
    let col = idx % p.n;
    var acc = 0.0;
    for (var j = 0u; j < p.r; j++) {
        acc += h[row * p.r + j] * b[col * p.r + j];
    }
    let base = f32(y[idx]);
    var out = base + p.scaling * acc;
    if (p.dora == 1u) {
        let g = dora_scale[col];
        var bias_value = 0.0;
        if (p.has_bias == 1u) {
            bias_value = bias[col];
        }
        out = dora_output(base, bias_value, g, p.scaling, acc);
    }
    y[idx] = Act(out);
}
