// Dequantizes a whole HQQ weight to f32, one invocation per element.
#include "common/hqq_codes.wgsl"

@group(0) @binding(0) var<uniform> p: HqqParams;
@group(0) @binding(1) var<storage, read> packed: array<u32>;
@group(0) @binding(2) var<storage, read> scale: array<f32>;
@group(0) @binding(3) var<storage, read> zero: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let f = gid.x + gid.y * nwg.x * 256u;
    if (f >= p.n * p.k) {
        return;
    }
    out[f] = hqq_dequant(f);
}
