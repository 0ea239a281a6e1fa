// y = x · Wᵀ + bias for a few rows of x (M <= MAX_M): one workgroup per output feature, the
// invocations stride over K, dequantize in registers, and reduce in workgroup memory.
// Makes no assumption about the subgroup size.
#include "common/quant_format.wgsl"

@group(0) @binding(6) var<storage, read> x: array<Act>;
@group(0) @binding(7) var<storage, read> bias: array<f32>;
@group(0) @binding(8) var<storage, read_write> y: array<Act>;

var<workgroup> partial: array<f32, WG * MAX_M>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let n = wid.x + wid.y * nwg.x;
    var acc: array<f32, MAX_M>;
    if (n < p.n) {
        for (var k = lid; k < p.k; k += WG) {
            let w = dequant_weight(n, k);
            for (var r = 0u; r < p.m; r++) {
                acc[r] += w * f32(x[r * p.k + k]);
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
        var v = partial[lid * WG];
        if (p.has_bias == 1u) {
            v += bias[n];
        }
        y[lid * p.n + n] = Act(v);
    }
}
