// y = x · Wᵀ + bias for a few rows of x (M <= MAX_M): each workgroup owns ROWS output features,
// its invocations stride over K, dequantize in registers and reduce in workgroup memory.
// Makes no assumption about the subgroup size.
// With OFT_PROLOGUE, x is rotated CHUNK columns at a time into workgroup memory, so the rotation
// needs no launch of its own; with LORA_EPILOGUE one adapter's term joins the single write of y
// (common/fused_ops.wgsl).
#include "common/quant_format.wgsl"

@group(0) @binding(6) var<storage, read> x: array<Act>;
@group(0) @binding(7) var<storage, read> bias: array<f32>;
@group(0) @binding(8) var<storage, read_write> y: array<Act>;

#include "common/fused_ops.wgsl"

var<workgroup> partial: array<f32, WG * MAX_M * ROWS>;

// Adds x[r, k] · W[n0 + t, k] into acc[t * MAX_M + r] for every owned row t, with x[r, k] = xk(r).
fn accumulate(acc: ptr<function, array<f32, MAX_M * ROWS>>, n0: u32, k: u32,
              xk: array<f32, MAX_M>) {
    for (var t = 0u; t < ROWS; t++) {
        let n = n0 + t;
        if (n < p.n) {
            let w = dequant_weight(n, k);
            for (var r = 0u; r < p.m; r++) {
                (*acc)[t * MAX_M + r] += w * xk[r];
            }
        }
    }
}

#ifdef OFT_PROLOGUE
var<workgroup> x_chunk: array<f32, MAX_M * CHUNK>;
#endif

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let n0 = (wid.x + wid.y * nwg.x) * ROWS;
    var acc: array<f32, MAX_M * ROWS>;
    var xk: array<f32, MAX_M>;
#ifdef OFT_PROLOGUE
    for (var c0 = 0u; c0 < p.k; c0 += CHUNK) {
        for (var i = lid; i < p.m * CHUNK; i += WG) {
            let k = c0 + i % CHUNK;
            if (k < p.k) {
                x_chunk[i] = rotated_x(i / CHUNK, k);
            }
        }
        workgroupBarrier();
        for (var c = lid; c < CHUNK && c0 + c < p.k; c += WG) {
            for (var r = 0u; r < p.m; r++) {
                xk[r] = x_chunk[r * CHUNK + c];
            }
            accumulate(&acc, n0, c0 + c, xk);
        }
        workgroupBarrier();
    }
#else
    for (var k = lid; k < p.k; k += WG) {
        for (var r = 0u; r < p.m; r++) {
            xk[r] = f32(x[r * p.k + k]);
        }
        accumulate(&acc, n0, k, xk);
    }
#endif
    for (var i = 0u; i < MAX_M * ROWS; i++) {
        partial[i * WG + lid] = acc[i];
    }
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride) {
            for (var i = 0u; i < MAX_M * ROWS; i++) {
                partial[i * WG + lid] += partial[i * WG + lid + stride];
            }
        }
        workgroupBarrier();
    }
    if (lid < p.m * ROWS) {
        let t = lid / p.m;
        let r = lid % p.m;
        let n = n0 + t;
        if (n < p.n) {
            var v = partial[(t * MAX_M + r) * WG];
            var bias_value = 0.0;
            if (p.has_bias == 1u) {
                bias_value = bias[n];
            }
            v += bias_value;
#ifdef LORA_EPILOGUE
            v = lora_epilogue(r, p.n_offset + n, v, bias_value);
#endif
            y[r * p.y_cols + p.n_offset + n] = Act(v);
        }
    }
}
