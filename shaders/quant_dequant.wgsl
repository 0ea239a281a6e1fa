// Dequantizes a weight (or one row slice of it) to f32 [N, K], one invocation per element (for
// checks and merges).
#include "common/elementwise.wgsl"
#include "common/quant_format.wgsl"

@group(0) @binding(8) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let f = element_index(gid, nwg);
    if (f >= p.n * p.k) {
        return;
    }
    out[p.n_offset * p.k + f] = dequant_weight(f / p.k, f % p.k);
}
