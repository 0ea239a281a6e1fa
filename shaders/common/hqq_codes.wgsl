// HQQ's packed codes and per-group meta. Needs the consts FIELD_BITS (8, 4, 3, 2 or 1: the width
// of one field in storage) and COMPUTE, and the bindings `p: HqqParams`, `packed`, `scale`, `zero`.
#include "common/rounding.wgsl"

struct HqqParams {
    m: u32,
    n: u32,
    k: u32,
    group_size: u32,
    groups: u32,
    axis: u32,
    // Stored elements per slab: packed rows x packed cols.
    slab_len: u32,
    has_bias: u32,
}

// Code of flat weight index f = row * K + col: slab f / slab_len, element f % slab_len, the
// first slab in the high bits. 3-bit packs 10 fields per int32 word, the others pack bytes.
fn hqq_code(f: u32) -> u32 {
    let slab = f / p.slab_len;
    let e = f % p.slab_len;
    if (FIELD_BITS == 3u) {
        return (packed[e] >> (27u - 3u * slab)) & 7u;
    }
    let byte = (packed[e >> 2u] >> ((e & 3u) * 8u)) & 0xffu;
    return (byte >> (8u - FIELD_BITS * (slab + 1u))) & ((1u << FIELD_BITS) - 1u);
}

fn hqq_group(f: u32) -> u32 {
    if (p.axis == 1u) {
        return f / p.group_size;
    }
    return f % p.groups;
}

// (q - zero) * scale, each op rounded to the compute dtype as PyTorch does.
fn hqq_dequant(f: u32) -> f32 {
    let g = hqq_group(f);
    return to_compute(to_compute(f32(hqq_code(f)) - zero[g]) * scale[g]);
}
