// What a quantized matmul can fuse around itself, switched on by flags:
//   OFT_PROLOGUE: x (read through the includer's `x_elem(flat index)`) is rotated by one OFT adapter's block-diagonal R on the way in (row-vector
//     convention, as `oft_rotate.wgsl`), rounded to Act as PEFT casts the rotated input back.
//   LORA_EPILOGUE: one LoRA / DoRA adapter's term s·(h·Bᵀ), with h = x·Aᵀ from `lora.wgsl`'s
//     shrink, is added to the output before its single write (as `lora.wgsl`'s expand does);
//     with PER_ROW_LORA each row's own adapter from a mixed batch's slot table instead (as
//     `mixed_adapters.wgsl`'s expand does).
// FUSED is on whenever either is. `store_output` is every includer's single write of y (the
// includer binds `bias` and `y`, except the split-K GEMV's first launch, SPLIT_OUT, which writes
// partial sums instead).
#ifdef FUSED
struct FusedParams {
    oft_b: u32,
    // Distinct blocks stored (1 when shared).
    oft_stored_blocks: u32,
    lora_r: u32,
    lora_scaling: f32,
    lora_dora: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(9) var<uniform> fused: FusedParams;

#ifdef OFT_PROLOGUE
@group(0) @binding(10) var<storage, read> oft_blocks: array<f32>;

// Element k of row `row` of x·blockdiag(R), rounded to Act.
fn rotated_x(row: u32, k: u32) -> f32 {
    let b = fused.oft_b;
    let block = k / b;
    let c = k % b;
    let stored = min(block, fused.oft_stored_blocks - 1u);
    let r0 = stored * b * b;
    let x0 = row * p.k + block * b;
    var acc = 0.0;
    for (var j = 0u; j < b; j++) {
        acc += x_elem(x0 + j) * oft_blocks[r0 + j * b + c];
    }
    return f32(Act(acc));
}
#endif

#ifdef LORA_EPILOGUE
#include "common/elementwise.wgsl"

@group(0) @binding(11) var<storage, read> lora_h: array<f32>;

#ifdef PER_ROW_LORA
#include "common/mixed_slots.wgsl"

@group(0) @binding(12) var<storage, read> row_slot: array<u32>;
@group(0) @binding(13) var<storage, read> slot_table: array<u32>;
@group(0) @binding(14) var<storage, read> adapter_weights: array<f32>;

// As below, with the adapter of row `row`'s slot in a mixed batch; rows without a LoRA slot keep
// the base output. `fused.lora_r` is h's row length (the largest rank).
fn lora_epilogue(row: u32, col: u32, out: f32, bias_value: f32) -> f32 {
    let slot = row_slot[row];
    if (slot == NONE || slot_table[slot * TABLE_STRIDE] != KIND_LORA) {
        return out;
    }
    let b_offset = slot_table[slot * TABLE_STRIDE + 2u];
    let rank = slot_table[slot * TABLE_STRIDE + 3u];
    let scaling = bitcast<f32>(slot_table[slot * TABLE_STRIDE + 4u]);
    let dora = slot_table[slot * TABLE_STRIDE + 5u];
    let base = f32(Act(out));
    var acc = 0.0;
    for (var j = 0u; j < rank; j++) {
        acc += lora_h[row * fused.lora_r + j] * adapter_weights[b_offset + col * rank + j];
    }
    if (dora != NO_DORA) {
        return dora_output(base, bias_value, adapter_weights[dora + col], scaling, acc);
    }
    return base + scaling * acc;
}
#else
@group(0) @binding(12) var<storage, read> lora_b: array<f32>;
@group(0) @binding(13) var<storage, read> dora_scale: array<f32>;

// The output at (row, col) from the base result `out` (bias included): the base is rounded to
// Act first, as PEFT adds the adapter to the base layer's output in the activation dtype.
fn lora_epilogue(row: u32, col: u32, out: f32, bias_value: f32) -> f32 {
    let base = f32(Act(out));
    let r = fused.lora_r;
    var acc = 0.0;
    for (var j = 0u; j < r; j++) {
        acc += lora_h[row * r + j] * lora_b[col * r + j];
    }
    if (fused.lora_dora == 1u) {
        return dora_output(base, bias_value, dora_scale[col], fused.lora_scaling, acc);
    }
    return base + fused.lora_scaling * acc;
}
#endif
#endif
#endif

#ifndef SPLIT_OUT
// y[r, n] (n within this launch's slice of outputs) = acc + bias[n], plus the fused adapter's
// term.
fn store_output(r: u32, n: u32, acc: f32) {
    var bias_value = 0.0;
    if (p.has_bias == 1u) {
        bias_value = bias[n];
    }
    var out = acc + bias_value;
#ifdef LORA_EPILOGUE
    out = lora_epilogue(r, p.n_offset + n, out, bias_value);
#endif
    y[r * p.y_cols + p.n_offset + n] = Act(out);
}
#endif
