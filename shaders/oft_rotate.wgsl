// OFT on activations: x_rot = x · blockdiag(R_0, R_1, ...) with row-vector convention,
//   x_rot[m, i*b + c] = sum_j x[m, i*b + j] * R_i[j, c].
// `blocks` holds the distinct b x b blocks row-major; with block sharing there is one.
// One invocation per output element; the result is rounded to the activation dtype, as PEFT
// casts the rotated input back before the base matmul.
#include "common/elementwise.wgsl"

struct OftParams {
    m: u32,
    k: u32,
    b: u32,
    // Distinct blocks stored (1 when shared).
    stored_blocks: u32,
}

@group(0) @binding(0) var<uniform> p: OftParams;
@group(0) @binding(1) var<storage, read> blocks: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<Act>;
@group(0) @binding(3) var<storage, read_write> y: array<Act>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = element_index(gid, nwg);
    if (idx >= p.m * p.k) {
        return;
    }
    let row = idx / p.k;
    let col = idx % p.k;
    let block = col / p.b;
    let c = col % p.b;
    let stored = min(block, p.stored_blocks - 1u);
    let base = stored * p.b * p.b;
    let x0 = row * p.k + block * p.b;
    var acc = 0.0;
    for (var j = 0u; j < p.b; j++) {
        acc += f32(x[x0 + j]) * blocks[base + j * p.b + c];
    }
    y[idx] = Act(acc);
}
