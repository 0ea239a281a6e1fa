// The second launch of a split-K GEMV (gemv_grouped.wgsl with SPLIT_OUT): y[r, n] is the sum of
// the p.split_k partial sums of slices[split, r, n], plus bias and, with LORA_EPILOGUE, one
// adapter's term, written once. One invocation per output.
#include "common/matmul_params.wgsl"

@group(0) @binding(5) var<storage, read> slices: array<f32>;
@group(0) @binding(7) var<storage, read> bias: array<f32>;
@group(0) @binding(8) var<storage, read_write> y: array<Act>;

#include "common/fused_ops.wgsl"
#ifndef LORA_EPILOGUE
// (The LoRA epilogue includes it already.)
#include "common/elementwise.wgsl"
#endif

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = element_index(gid, nwg);
    if (i >= p.m * p.n) {
        return;
    }
    let r = i / p.n;
    let n = i % p.n;
    var sum = 0.0;
    for (var s = 0u; s < p.split_k; s++) {
        sum += slices[(s * p.m + r) * p.n + n];
    }
    store_output(r, n, sum);
}
