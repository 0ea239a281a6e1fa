// HQQ's packed codes and per-group meta. Consts: FIELD_BITS (8, 4, 3, 2 or 1: the width of one
// field in storage) and COMPUTE (see rounding.wgsl).
#include "common/rounding.wgsl"

struct FormatParams {
    group_size: u32,
    groups: u32,
    axis: u32,
    // Stored elements per slab: packed rows x packed cols.
    slab_len: u32,
}

@group(0) @binding(1) var<uniform> q: FormatParams;
@group(0) @binding(2) var<storage, read> packed: array<u32>;
@group(0) @binding(3) var<storage, read> scale: array<f32>;
@group(0) @binding(4) var<storage, read> zero: array<f32>;

// Code of flat weight index f = row * K + col: slab f / slab_len, element f % slab_len, the
// first slab in the high bits. 3-bit packs 10 fields per int32 word, the others pack bytes.
fn hqq_code(f: u32) -> u32 {
    let slab = f / q.slab_len;
    let e = f % q.slab_len;
    if (FIELD_BITS == 3u) {
        return (packed[e] >> (27u - 3u * slab)) & 7u;
    }
    let byte = (packed[e >> 2u] >> ((e & 3u) * 8u)) & 0xffu;
    return (byte >> (8u - FIELD_BITS * (slab + 1u))) & ((1u << FIELD_BITS) - 1u);
}

fn hqq_group(f: u32) -> u32 {
    if (q.axis == 1u) {
        return f / q.group_size;
    }
    return f % q.groups;
}

// Weight (n, k) of the [N, K] layer: (q - zero) * scale, each op rounded to the compute dtype
// as PyTorch does.
fn dequant_weight(n: u32, k: u32) -> f32 {
    let f = n * p.k + k;
    let g = hqq_group(f);
    return to_compute(to_compute(f32(hqq_code(f)) - zero[g]) * scale[g]);
}
