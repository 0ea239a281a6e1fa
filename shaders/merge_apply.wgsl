// Merging an adapter into a dequantized weight W [N, K] (f32), one invocation per element:
//   oft:  W'[n, i*b + c] = sum_j W[n, i*b + j] * R_i[c, j]       (W · blockdiag(R)ᵀ)
//   lora: W'[n, k] = g[n] * (W[n, k] + s * sum_r B[n, r] * A[r, k])  (g = 1 unless DoRA)
#include "common/elementwise.wgsl"

struct MergeParams {
    n: u32,
    k: u32,
    // OFT: block size and distinct blocks stored; LoRA: rank.
    b: u32,
    stored_blocks: u32,
    rank: u32,
    scaling: f32,
    dora: u32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> p: MergeParams;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> first: array<f32>;
@group(0) @binding(3) var<storage, read> second: array<f32>;
@group(0) @binding(4) var<storage, read> dora_scale: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

// `first` holds the rotation blocks.
@compute @workgroup_size(256)
fn oft(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = element_index(gid, nwg);
    if (idx >= p.n * p.k) {
        return;
    }
    let row = idx / p.k;
    let col = idx % p.k;
    let block = col / p.b;
    let c = col % p.b;
    let r0 = min(block, p.stored_blocks - 1u) * p.b * p.b + c * p.b;
    let w0 = row * p.k + block * p.b;
    var acc = 0.0;
    for (var j = 0u; j < p.b; j++) {
        acc += w[w0 + j] * first[r0 + j];
    }
    out[idx] = acc;
}

// `first` holds A [rank, K], `second` B [N, rank].
@compute @workgroup_size(256)
fn lora(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = element_index(gid, nwg);
    if (idx >= p.n * p.k) {
        return;
    }
    let row = idx / p.k;
    let col = idx % p.k;
    var acc = 0.0;
    for (var r = 0u; r < p.rank; r++) {
        acc += second[row * p.rank + r] * first[r * p.k + col];
    }
    var v = w[idx] + p.scaling * acc;
    if (p.dora == 1u) {
        v *= dora_scale[row];
    }
    out[idx] = v;
}
