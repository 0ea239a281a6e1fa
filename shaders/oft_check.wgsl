// The check after an OFT build (oft_build.wgsl): every block R against the equation that defines
// it, on one probe vector v per block (Freivalds' test), so it costs O(b^2) per block where the
// build costs O(b^3):
//   exact Cayley: (I + Q) R = I - Q, so y = R v must equal (I - Q) v - Q y;
//   Cayley-Neumann: y = R v must equal v + 2 Q v + ... + Q^last v, with the powers applied to v
//   one after another.
// Per block and row i, `expect` holds what y_i must equal and `scale` the sum of the magnitudes of
// every term either side adds up, which bounds their rounding; `check_finish` writes per block
// max_i |y_i - expect_i| / scale_i. The same chain of short launches as the build.
// Scratch per block: y, expect, scale, and two vectors Q^k v (ping-pong), b each.

#include "common/oft_blocks.wgsl"

@group(0) @binding(5) var<storage, read_write> defects: array<f32>;

fn check_stride(b: u32) -> u32 {
    return 5u * b;
}

// v[i] of block `blk`: a hash of both, magnitude in [0.5, 1.5), either sign.
fn probe(blk: u32, i: u32) -> f32 {
    var h = blk * 0x9e3779b9u + i * 0x85ebca6bu + 0x165667b1u;
    h = (h ^ (h >> 16u)) * 0x7feb352du;
    h = (h ^ (h >> 15u)) * 0x846ca68bu;
    h = h ^ (h >> 16u);
    let magnitude = 0.5 + f32(h >> 8u) / 16777216.0;
    return select(-magnitude, magnitude, (h & 1u) == 0u);
}

// Where Q^k v lives (k >= 1).
fn power_vector_at(blk: u32, k: u32) -> u32 {
    return blk * check_stride(p.b) + p.b * (3u + k % 2u);
}

// y = R v; for Cayley-Neumann also the terms of I and Q.
@compute @workgroup_size(ELEMENT_WG)
fn check_start(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let b = p.b;
    let g = element_index(wid, nwg, t);
    if (g >= p.rows * b) {
        return;
    }
    let blk = g / b;
    let i = g % b;
    let qb = q_base(blk);
    let row = g * b;
    var y = 0.0;
    var y_scale = 0.0;
    var qv = 0.0;
    var qv_scale = 0.0;
    for (var l = 0u; l < b; l++) {
        let v = probe(blk, l);
        let ry = blocks[row + l] * v;
        y += ry;
        y_scale += abs(ry);
        if (p.cayley == 0u) {
            let qy = q_at(qb, i, l) * v;
            qv += qy;
            qv_scale += abs(qy);
        }
    }
    let s0 = blk * check_stride(b);
    scratch[s0 + i] = y;
    if (p.cayley == 0u) {
        let vi = probe(blk, i);
        let c = power_coefficient(1u);
        scratch[s0 + b + i] = vi + c * qv;
        scratch[s0 + 2u * b + i] = y_scale + abs(vi) + c * qv_scale;
        scratch[power_vector_at(blk, 1u) + i] = qv;
    } else {
        scratch[s0 + 2u * b + i] = y_scale;
    }
}

// Exact Cayley: expect = v - Q (v + y).
@compute @workgroup_size(ELEMENT_WG)
fn check_cayley(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let b = p.b;
    let g = element_index(wid, nwg, t);
    if (g >= p.rows * b) {
        return;
    }
    let blk = g / b;
    let i = g % b;
    let qb = q_base(blk);
    let s0 = blk * check_stride(b);
    var acc = 0.0;
    var acc_scale = 0.0;
    for (var l = 0u; l < b; l++) {
        let term = q_at(qb, i, l) * (probe(blk, l) + scratch[s0 + l]);
        acc += term;
        acc_scale += abs(term);
    }
    let vi = probe(blk, i);
    scratch[s0 + b + i] = vi - acc;
    scratch[s0 + 2u * b + i] += abs(vi) + acc_scale;
}

// Cayley-Neumann: Q^k v = Q (Q^(k-1) v) with k = step[0] + 2, added to expect with its
// coefficient.
@compute @workgroup_size(ELEMENT_WG)
fn check_power(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let b = p.b;
    let g = element_index(wid, nwg, t);
    if (g >= p.rows * b) {
        return;
    }
    let k = step[0] + 2u;
    let blk = g / b;
    let i = g % b;
    let qb = q_base(blk);
    let src = power_vector_at(blk, k - 1u);
    var acc = 0.0;
    var acc_scale = 0.0;
    for (var l = 0u; l < b; l++) {
        let term = q_at(qb, i, l) * scratch[src + l];
        acc += term;
        acc_scale += abs(term);
    }
    let c = power_coefficient(k);
    let s0 = blk * check_stride(b);
    scratch[power_vector_at(blk, k) + i] = acc;
    scratch[s0 + b + i] += c * acc;
    scratch[s0 + 2u * b + i] += c * acc_scale;
}

var<workgroup> worst: array<f32, BLOCK_WG>;

// Stands for a defect that is not a finite number (a NaN or infinite block).
const NOT_FINITE: f32 = 3.0e38;

// One workgroup per block: defects[blk] = max_i |y_i - expect_i| / scale_i.
@compute @workgroup_size(BLOCK_WG)
fn check_finish(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let blk = block_index(wid, nwg);
    if (blk >= p.rows) {
        return;
    }
    let b = p.b;
    let s0 = blk * check_stride(b);
    var w = 0.0;
    for (var i = t; i < b; i += BLOCK_WG) {
        let d = abs(scratch[s0 + i] - scratch[s0 + b + i]) / scratch[s0 + 2u * b + i];
        // Tested on the bits: a compiler may assume floats are never NaN.
        if ((bitcast<u32>(d) & 0x7f800000u) == 0x7f800000u) {
            w = NOT_FINITE;
        } else {
            w = max(w, d);
        }
    }
    worst[t] = w;
    workgroupBarrier();
    for (var s = BLOCK_WG / 2u; s > 0u; s >>= 1u) {
        if (t < s) {
            worst[t] = max(worst[t], worst[t + s]);
        }
        workgroupBarrier();
    }
    if (t == 0u) {
        defects[blk] = worst[0];
    }
}
