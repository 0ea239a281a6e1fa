// y = x · Wᵀ + bias for many rows: TILE x TILE output tiles, x and the dequantized weight staged
// through workgroup memory one K-slice at a time, f32 accumulation. With LORA_EPILOGUE one
// adapter's term joins the single write of y (common/fused_ops.wgsl).
#include "common/quant_format.wgsl"

@group(0) @binding(6) var<storage, read> x: array<Act>;
@group(0) @binding(7) var<storage, read> bias: array<f32>;
@group(0) @binding(8) var<storage, read_write> y: array<Act>;

#include "common/fused_ops.wgsl"

var<workgroup> xs: array<array<f32, TILE>, TILE>;
var<workgroup> ws: array<array<f32, TILE>, TILE>;

@compute @workgroup_size(TILE, TILE)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = wid.y * TILE + lid.y;
    let col = wid.x * TILE + lid.x;
    let w_row = wid.x * TILE + lid.y;
    var acc = 0.0;
    for (var k0 = 0u; k0 < p.k; k0 += TILE) {
        let k = k0 + lid.x;
        var xv = 0.0;
        if (row < p.m && k < p.k) {
            xv = f32(x[row * p.k + k]);
        }
        xs[lid.y][lid.x] = xv;
        var wv = 0.0;
        if (w_row < p.n && k < p.k) {
            wv = dequant_weight(w_row, k);
        }
        ws[lid.y][lid.x] = wv;
        workgroupBarrier();
        for (var t = 0u; t < TILE; t++) {
            acc += xs[lid.y][t] * ws[lid.x][t];
        }
        workgroupBarrier();
    }
    if (row < p.m && col < p.n) {
        var bias_value = 0.0;
        if (p.has_bias == 1u) {
            bias_value = bias[col];
        }
        acc += bias_value;
#ifdef LORA_EPILOGUE
        acc = lora_epilogue(row, p.n_offset + col, acc, bias_value);
#endif
        y[row * p.y_cols + p.n_offset + col] = Act(acc);
    }
}
