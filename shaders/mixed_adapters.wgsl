// Mixed batches: each row of x picks its own adapter (or none), and every kernel runs once for
// the whole batch whatever the number of adapters (segmented by a per-row slot index, as Punica's
// BGMV does). The slot table (`table`) is laid out as common/mixed_slots.wgsl says. A row whose
// slot is NONE, or of the other kind, passes through unchanged.
#include "common/elementwise.wgsl"
#include "common/mixed_slots.wgsl"
#include "common/workgroup_sum.wgsl"

struct MixedParams {
    m: u32,
    k: u32,
    n: u32,
    max_rank: u32,
    has_bias: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> p: MixedParams;
@group(0) @binding(1) var<storage, read> row_slot: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<u32>;
@group(0) @binding(3) var<storage, read> weights: array<f32>;
@group(0) @binding(4) var<storage, read> x: array<Act>;
@group(0) @binding(5) var<storage, read_write> h: array<f32>;
@group(0) @binding(6) var<storage, read> bias: array<f32>;
@group(0) @binding(7) var<storage, read_write> y: array<Act>;

fn slot_word(slot: u32, i: u32) -> u32 {
    return table[slot * TABLE_STRIDE + i];
}

fn slot_kind(row: u32) -> vec2<u32> {
    let slot = row_slot[row];
    if (slot == NONE) {
        return vec2<u32>(NONE, 0u);
    }
    return vec2<u32>(slot, slot_word(slot, 0u));
}

// x_rot[row] = x[row] · blockdiag(R) of the row's OFT slot; other rows are copied.
@compute @workgroup_size(256)
fn rotate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = element_index(gid, nwg);
    if (idx >= p.m * p.k) {
        return;
    }
    let row = idx / p.k;
    let col = idx % p.k;
    let s = slot_kind(row);
    if (s.x == NONE || s.y != KIND_OFT) {
        y[idx] = x[idx];
        return;
    }
    let offset = slot_word(s.x, 1u);
    let b = slot_word(s.x, 2u);
    let stored = slot_word(s.x, 3u);
    let block = col / b;
    let c = col % b;
    let base = offset + min(block, stored - 1u) * b * b;
    let x0 = row * p.k + block * b;
    var acc = 0.0;
    for (var j = 0u; j < b; j++) {
        acc += f32(x[x0 + j]) * weights[base + j * b + c];
    }
    y[idx] = Act(acc);
}

// h[row, j] = x[row] · A[j] of the row's LoRA slot (zero past its rank or without one): one
// workgroup per element, its WG invocations strided over K, then added together
// (common/workgroup_sum.wgsl).
@compute @workgroup_size(WG)
fn shrink(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          lanes: Lanes) {
    let idx = wid.x + wid.y * nwg.x;
    if (idx >= p.m * p.max_rank) {
        return;
    }
    let row = idx / p.max_rank;
    let j = idx % p.max_rank;
    let s = slot_kind(row);
    var acc = 0.0;
    if (s.x != NONE && s.y == KIND_LORA && j < slot_word(s.x, 3u)) {
        let a = slot_word(s.x, 1u) + j * p.k;
        for (var k = lanes.index; k < p.k; k += WG) {
            acc += f32(x[row * p.k + k]) * weights[a + k];
        }
    }
    let total = workgroup_sum(acc, lanes);
    if (lanes.index == 0u) {
        h[idx] = total;
    }
}

// y[row, n] += s · h[row] · B[n] (with DoRA's rescale) for rows with a LoRA slot.
@compute @workgroup_size(256)
fn expand(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = element_index(gid, nwg);
    if (idx >= p.m * p.n) {
        return;
    }
    let row = idx / p.n;
    let col = idx % p.n;
    let s = slot_kind(row);
    if (s.x == NONE || s.y != KIND_LORA) {
        return;
    }
    let b_offset = slot_word(s.x, 2u);
    let rank = slot_word(s.x, 3u);
    let scaling = bitcast<f32>(slot_word(s.x, 4u));
    var acc = 0.0;
    for (var j = 0u; j < rank; j++) {
        acc += h[row * p.max_rank + j] * weights[b_offset + col * rank + j];
    }
    let base = f32(y[idx]);
    var out = base + scaling * acc;
    let dora = slot_word(s.x, 5u);
    if (dora != NO_DORA) {
        let g = weights[dora + col];
        var bias_value = 0.0;
        if (p.has_bias == 1u) {
            bias_value = bias[col];
        }
        out = dora_output(base, bias_value, g, scaling, acc);
    }
    y[idx] = Act(out);
}
