// HQQ quantization on the GPU: min-max init, the half-quadratic zero solver, rounding and
// packing into HQQ's storage layout. Mirrors `src/formats/hqq/mod.rs::quantize_codes` and
// `src/formats/hqq/solver.rs::optimize_zero`.
//
// Consts: WG (invocations per workgroup of the per-group entries, a power of two) and COMPUTE
// (see rounding.wgsl; only `finalize` uses it).
//
// Entries, dispatched in this order by `src/kernels/hqq_quantize.rs`:
//   init          one workgroup per group: min/max, inv_scale, scale, zero
//   iterate       one workgroup per group: one solver step (zero update, the group's L1 error)
//   reduce_error  one workgroup: the global mean error, the early-stop decision (state buffer)
//   pack          one invocation per u32 word of the packed output
//   finalize      one invocation per group: scale and zero rounded to the compute dtype
// The early stop stays on the GPU: once `state.stopped` is set, `iterate` does nothing.
#include "common/elementwise.wgsl"
#include "common/rounding.wgsl"

struct QuantParams {
    numel: u32,
    group_size: u32,
    groups: u32,
    // 1: group of f is f / group_size; 0: f % groups.
    axis: u32,
    max_code: f32,
    round_zero: u32,
    // Stored elements per slab (packed rows x packed cols).
    slab_len: u32,
    // u32 words of the packed output.
    words: u32,
    // Bits of one field (8 for 5/6/8-bit), fields per stored element, 1 for 3-bit's int32.
    field_bits: u32,
    per_element: u32,
    three_bit: u32,
    lp_norm: f32,
    kappa: f32,
    grow_beta: u32,
    // Always 0: XORed into a product so that no compiler fuses `w * s + z` into an fma.
    opaque: u32,
    _pad: u32,
}

// Solver state shared across dispatches.
struct SolverState {
    stopped: u32,
    beta: f32,
    best: f32,
    iterations: u32,
}

@group(0) @binding(0) var<uniform> qp: QuantParams;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read_write> inv_scale: array<f32>;
@group(0) @binding(3) var<storage, read_write> scale: array<f32>;
@group(0) @binding(4) var<storage, read_write> zero: array<f32>;
@group(0) @binding(5) var<storage, read_write> group_error: array<f32>;
@group(0) @binding(6) var<storage, read_write> state: SolverState;
@group(0) @binding(7) var<storage, read_write> packed: array<u32>;

var<workgroup> red_a: array<f32, WG>;
var<workgroup> red_b: array<f32, WG>;
var<workgroup> stop_flag: u32;

// Flat index of element i of group g.
fn flat_index(g: u32, i: u32) -> u32 {
    if (qp.axis == 1u) {
        return g * qp.group_size + i;
    }
    return i * qp.groups + g;
}

fn group_of(f: u32) -> u32 {
    if (qp.axis == 1u) {
        return f / qp.group_size;
    }
    return f % qp.groups;
}

// Correctly rounded 1 / x for a normal x with a normal result (WGSL's `/` may be off by 2.5 ulp),
// by integer long division of the significands. Other inputs fall back to `/`.
fn recip_exact(x: f32) -> f32 {
    let b = bitcast<u32>(x);
    let sign = b & 0x80000000u;
    let e = (b >> 23u) & 0xffu;
    if (e == 0u || e > 252u) {
        return 1.0 / x;
    }
    let m = (b & 0x7fffffu) | 0x800000u;
    if (m == 0x800000u) {
        return bitcast<f32>(sign | ((254u - e) << 23u));
    }
    // 2^48 / m in [2^24, 2^25): the leading 1, 23 fraction bits and a guard bit.
    var quotient = 1u;
    var rem = 0x1000000u - m;
    for (var i = 0u; i < 24u; i++) {
        rem = rem << 1u;
        quotient = quotient << 1u;
        if (rem >= m) {
            rem -= m;
            quotient |= 1u;
        }
    }
    var mant = quotient >> 1u;
    let guard = quotient & 1u;
    if (guard == 1u && (rem != 0u || (mant & 1u) == 1u)) {
        mant += 1u;
    }
    var exp = 253u - e;
    if (mant == 0x1000000u) {
        mant = 0x800000u;
        exp += 1u;
    }
    return bitcast<f32>(sign | (exp << 23u) | (mant & 0x7fffffu));
}

// The code of weight value v: clamp(round_even(v * s + z), 0, max_code), the product rounded
// to f32 on its own as on the CPU.
fn code_of(v: f32, s: f32, z: f32) -> f32 {
    let prod = bitcast<f32>(bitcast<u32>(v * s) ^ qp.opaque);
    return clamp(round(prod + z), 0.0, qp.max_code);
}

fn workgroup_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// Tree reduction of red_a (sum or min) and red_b (sum or max) over the workgroup.
fn reduce_pair(lid: u32, minmax: bool) {
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        workgroupBarrier();
        if (lid < stride) {
            if (minmax) {
                red_a[lid] = min(red_a[lid], red_a[lid + stride]);
                red_b[lid] = max(red_b[lid], red_b[lid + stride]);
            } else {
                red_a[lid] = red_a[lid] + red_a[lid + stride];
                red_b[lid] = red_b[lid] + red_b[lid + stride];
            }
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(WG)
fn init(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = workgroup_index(wid, nwg);
    if (g >= qp.groups) {
        return;
    }
    // The largest finite magnitudes, not infinities: a constant expression that evaluates to an
    // infinity is a shader-creation error in WGSL. Every group holds a finite value, so the
    // results are the same.
    var lo = bitcast<f32>(0x7f7fffffu);
    var hi = bitcast<f32>(0xff7fffffu);
    for (var i = lid; i < qp.group_size; i += WG) {
        let v = w[flat_index(g, i)];
        lo = min(lo, v);
        hi = max(hi, v);
    }
    red_a[lid] = lo;
    red_b[lid] = hi;
    reduce_pair(lid, true);
    if (lid == 0u) {
        let mn = red_a[0];
        let mx = red_b[0];
        let range = mx - mn;
        var s = 1.0;
        if (abs(range) > 1e-4) {
            // torch's `scalar / tensor`: scalar * reciprocal(tensor), two roundings.
            s = qp.max_code * recip_exact(range);
        }
        s = min(s, 2e4);
        var z = -mn * s;
        if (qp.round_zero != 0u) {
            z = round(z);
        }
        inv_scale[g] = s;
        scale[g] = recip_exact(s);
        zero[g] = z;
    }
}

// `sign(x) * max(|x| - (|x| + 1e-8)^(p-1) / beta, 0)`, as `solver::shrink`.
fn shrink(x: f32, beta: f32) -> f32 {
    var threshold = 1.0 / beta;
    if (qp.lp_norm != 1.0) {
        threshold = (1.0 / beta) * pow(abs(x) + 1e-8, qp.lp_norm - 1.0);
    }
    return sign(x) * max(abs(x) - threshold, 0.0);
}

@compute @workgroup_size(WG)
fn iterate(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = workgroup_index(wid, nwg);
    if (g >= qp.groups) {
        return;
    }
    if (lid == 0u) {
        stop_flag = state.stopped;
    }
    if (workgroupUniformLoad(&stop_flag) != 0u) {
        return;
    }
    let beta = state.beta;
    let s = inv_scale[g];
    let z = zero[g];
    var sum = 0.0;
    var err = 0.0;
    for (var i = lid; i < qp.group_size; i += WG) {
        let v = w[flat_index(g, i)];
        let q = code_of(v, s, z);
        let wr = (q - z) / s;
        let we = shrink(v - wr, beta);
        sum += q - (v - we) * s;
        err += abs(v - wr);
    }
    red_a[lid] = sum;
    red_b[lid] = err;
    reduce_pair(lid, false);
    if (lid == 0u) {
        zero[g] = red_a[0] / f32(qp.group_size);
        group_error[g] = red_b[0];
    }
}

@compute @workgroup_size(WG)
fn reduce_error(@builtin(local_invocation_index) lid: u32) {
    if (lid == 0u) {
        stop_flag = state.stopped;
    }
    if (workgroupUniformLoad(&stop_flag) != 0u) {
        return;
    }
    var total = 0.0;
    for (var g = lid; g < qp.groups; g += WG) {
        total += group_error[g];
    }
    red_a[lid] = total;
    red_b[lid] = 0.0;
    reduce_pair(lid, false);
    if (lid == 0u) {
        let error = red_a[0] / f32(qp.numel);
        state.iterations += 1u;
        if (error < state.best) {
            state.best = error;
            if (qp.grow_beta != 0u) {
                state.beta = state.beta * qp.kappa;
            }
        } else {
            // The zero update of this iteration is kept, as in HQQ.
            state.stopped = 1u;
        }
    }
}

fn code_at(f: u32) -> u32 {
    let g = group_of(f);
    return u32(code_of(w[f], inv_scale[g], zero[g]));
}

// One stored element: slab j of element p is flat index p + j * slab_len, the first slab in
// the high bits; indices past the end are padding (zero).
fn stored_element(p: u32) -> u32 {
    var out = 0u;
    for (var j = 0u; j < qp.per_element; j++) {
        let f = p + j * qp.slab_len;
        if (f < qp.numel) {
            var shift = 8u - qp.field_bits * (j + 1u);
            if (qp.three_bit != 0u) {
                shift = 27u - 3u * j;
            }
            out |= code_at(f) << shift;
        }
    }
    return out;
}

@compute @workgroup_size(256)
fn pack(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let word = element_index(gid, nwg);
    if (word >= qp.words) {
        return;
    }
    if (qp.three_bit != 0u) {
        packed[word] = stored_element(word);
        return;
    }
    var out = 0u;
    for (var b = 0u; b < 4u; b++) {
        let p = word * 4u + b;
        if (p < qp.slab_len) {
            out |= stored_element(p) << (8u * b);
        }
    }
    packed[word] = out;
}

@compute @workgroup_size(256)
fn finalize(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = element_index(gid, nwg);
    if (g >= qp.groups) {
        return;
    }
    scale[g] = to_compute(scale[g]);
    zero[g] = to_compute(zero[g]);
}
