// HQQ's packed codes and per-group meta. Consts: FIELD_BITS (8, 4, 3, 2 or 1: the width of one
// field in storage) and COMPUTE (see rounding.wgsl).
#include "common/rounding.wgsl"

struct FormatParams {
    group_size: u32,
    groups: u32,
    axis: u32,
    // Stored elements per slab: packed rows x packed cols.
    slab_len: u32,
    // Rows of W per slab, where slabs hold whole rows (WORD_UNITS only).
    slab_rows: u32,
    // How scale and zero are stored: 0 = f32, 1 = f16 pairs, 2 = bf16 pairs (two per u32, the
    // even group in the low half); chosen at upload where the values convert exactly.
    meta_storage: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(1) var<uniform> q: FormatParams;
#ifdef VEC4_WORDS
// Read 16 bytes at a time by the GEMVs.
@group(0) @binding(2) var<storage, read> packed: array<vec4<u32>>;

fn packed_word(i: u32) -> u32 {
    return packed[i >> 2u][i & 3u];
}
#else
@group(0) @binding(2) var<storage, read> packed: array<u32>;

fn packed_word(i: u32) -> u32 {
    return packed[i];
}
#endif
@group(0) @binding(3) var<storage, read> scale: array<u32>;
@group(0) @binding(4) var<storage, read> zero: array<u32>;

// Where group g's value sits in a metadata buffer, and its value from that word, as `q.meta_storage`
// says (exact widening in every case).
fn meta_index(g: u32) -> u32 {
    return select(g >> 1u, g, q.meta_storage == 0u);
}

fn meta_value(word: u32, g: u32) -> f32 {
    if (q.meta_storage == 0u) {
        return bitcast<f32>(word);
    }
    let half = select(word & 0xffffu, word >> 16u, (g & 1u) == 1u);
    if (q.meta_storage == 1u) {
        return f16_bits_to_f32(half);
    }
    return bitcast<f32>(half << 16u);
}

// The f16 with bits h, widened exactly with integer ops (unpack2x16float may flush subnormals).
fn f16_bits_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let exponent = (h >> 10u) & 0x1fu;
    let mantissa = h & 0x3ffu;
    if (exponent == 0u) {
        // Subnormal or zero: mantissa * 2^-24, exact in f32.
        return bitcast<f32>(sign | bitcast<u32>(f32(mantissa) * 5.9604645e-8));
    }
    if (exponent == 31u) {
        return bitcast<f32>(sign | 0x7f800000u | (mantissa << 13u));
    }
    return bitcast<f32>(sign | ((exponent + 112u) << 23u) | (mantissa << 13u));
}

// The grouped GEMV's view (gemv_grouped.wgsl).
fn group_size() -> u32 {
    return q.group_size;
}

fn slab_rows() -> u32 {
    return q.slab_rows;
}

fn group_scale(g: u32) -> f32 {
    return meta_value(scale[meta_index(g)], g);
}

fn group_zero(g: u32) -> f32 {
    return meta_value(zero[meta_index(g)], g);
}

// Code of flat weight index f = row * K + col: slab f / slab_len, element f % slab_len, the
// first slab in the high bits. 3-bit packs 10 fields per int32 word, the others pack bytes.
fn hqq_code(f: u32) -> u32 {
    let slab = f / q.slab_len;
    let e = f % q.slab_len;
    if (FIELD_BITS == 3u) {
        return (packed_word(e) >> (27u - 3u * slab)) & 7u;
    }
    let byte = (packed_word(e >> 2u) >> ((e & 3u) * 8u)) & 0xffu;
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
    return to_compute(to_compute(f32(hqq_code(f)) - group_zero(g)) * group_scale(g));
}

// The weights of flat indices f..f+3 whose byte fields sit in slab s of `word` (8, 4 and 2 bits;
// the four in one group on axis 1, in four consecutive groups on axis 0): the GEMV's and the
// GEMM's word decoder.
fn word_weights(word: u32, s: u32, f: u32) -> vec4<f32> {
    let shift = 8u - FIELD_BITS * (s + 1u);
    let mask = (1u << FIELD_BITS) - 1u;
    let g0 = hqq_group(f);
    var w: vec4<f32>;
    for (var i = 0u; i < 4u; i++) {
        var g = g0;
        if (q.axis == 0u) {
            g += i;
        }
        let code = (word >> (8u * i + shift)) & mask;
        w[i] = to_compute(to_compute(f32(code) - group_zero(g)) * group_scale(g));
    }
    return w;
}

#ifdef WORD_UNITS
// Word-at-a-time decoding for the GEMV, for byte-packed fields (8, 4 and 2 bits) where the host
// checked that each slab holds whole rows of W, 16 | K, and a word's four elements share a group
// (axis 1) or sit in four consecutive groups (axis 0). The word holding slab element
// e = pr * K + k (4 | k) has inputs k..k+3 of packed row pr in every slab, and slab s feeds
// output row s * slab_rows + pr: one load feeds SLABS rows, and a tile is PACKED_ROWS packed
// rows. A unit is four consecutive words (16 inputs), one 16-byte load per packed row.
const SLABS: u32 = 8u / FIELD_BITS;
const PACKED_ROWS: u32 = ROWS / SLABS;
const UNIT_K: u32 = 16u;

fn gemv_row(tile: u32, t: u32) -> u32 {
    let pr = tile * PACKED_ROWS + t % PACKED_ROWS;
    if (pr >= q.slab_rows) {
        return p.n;
    }
    return (t / PACKED_ROWS) * q.slab_rows + pr;
}

// Adds x[r, k0..k0+15] · W[n, k0..k0+15] into acc[t * MAX_M + r] for n = gemv_row(tile, t).
fn gemv_unit(acc: ptr<function, array<f32, MAX_M * ROWS>>, tile: u32, k0: u32) {
    var words: array<vec4<u32>, PACKED_ROWS>;
    for (var j = 0u; j < PACKED_ROWS; j++) {
        let pr = tile * PACKED_ROWS + j;
        if (pr < q.slab_rows) {
            words[j] = packed[(pr * p.k + k0) >> 4u];
        }
    }
    var xk: array<vec4<f32>, MAX_M>;
    for (var i = 0u; i < 4u; i++) {
        let k = k0 + 4u * i;
        let c0 = x_column(k);
        let c1 = x_column(k + 1u);
        let c2 = x_column(k + 2u);
        let c3 = x_column(k + 3u);
        for (var r = 0u; r < MAX_M; r++) {
            xk[r] = vec4<f32>(c0[r], c1[r], c2[r], c3[r]);
        }
        for (var j = 0u; j < PACKED_ROWS; j++) {
            let pr = tile * PACKED_ROWS + j;
            if (pr < q.slab_rows) {
                let e = pr * p.k + k;
                for (var s = 0u; s < SLABS; s++) {
                    let w = word_weights(words[j][i], s, s * q.slab_len + e);
                    let t = s * PACKED_ROWS + j;
                    for (var r = 0u; r < MAX_M; r++) {
                        (*acc)[t * MAX_M + r] += dot(w, xk[r]);
                    }
                }
            }
        }
    }
}
#endif

#ifdef GEMM_WORDS
// The tiled GEMM's decoder of a run of four inputs k0..k0+3 (4 | k0) of row n from one packed
// word, under the conditions the host checked for WORD_UNITS: byte-packed fields, slabs of
// whole rows, 16 | K, and a word's four elements in one group (axis 1) or in four consecutive
// groups (axis 0). Each element rounds as `dequant_weight` does.
fn gemm_decode_run(n: u32, k0: u32) -> array<f32, 4> {
    let f = n * p.k + k0;
    let slab = n / q.slab_rows;
    let w = word_weights(packed_word((f - slab * q.slab_len) >> 2u), slab, f);
    return array<f32, 4>(w.x, w.y, w.z, w.w);
}
#endif
