// OFT rotation blocks built from their generators (PEFT >= 0.18, spec section 1), f32 throughout,
// every block of an adapter at once, as a chain of short launches (common/oft_blocks.wgsl says
// why). No subgroup operations, so any subgroup size works.

#include "common/oft_blocks.wgsl"

@compute @workgroup_size(1)
fn advance() {
    step[0] += 1u;
}

// Exact Cayley. PEFT solves X (I + Q) = I - Q; I + Q and I - Q commute, so X = (I + Q)^-1 (I - Q)
// as well, which Gauss-Jordan elimination with partial pivoting on [A | B] = [I + Q | I - Q]
// yields (the CPU reference solves the same system). B is the output block itself. Column `col`
// (= step[0]) takes two launches: `cayley_pivot` picks its pivot row and copies what the
// elimination reads into scratch, then `cayley_eliminate` computes every element of [A | B] from
// its own old value and those copies, so no element waits for another.
// Scratch per block: A (b x b), column col of A (b), the pivot row of [A | B] (2b), row col of
// [A | B] (2b), the pivot row's index.

fn cayley_stride(b: u32) -> u32 {
    return b * b + 5u * b + 1u;
}

// [A | B][r, j] of the block whose A starts at a0 and B at r0.
fn ab_get(a0: u32, r0: u32, r: u32, j: u32) -> f32 {
    if (j < p.b) {
        return scratch[a0 + r * p.b + j];
    }
    return blocks[r0 + r * p.b + (j - p.b)];
}

fn ab_set(a0: u32, r0: u32, r: u32, j: u32, v: f32) {
    if (j < p.b) {
        scratch[a0 + r * p.b + j] = v;
    } else {
        blocks[r0 + r * p.b + (j - p.b)] = v;
    }
}

// One invocation per element of every block: A = I + Q, B = I - Q.
@compute @workgroup_size(ELEMENT_WG)
fn cayley_init(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let b = p.b;
    let bb = b * b;
    let g = element_index(wid, nwg, t);
    if (g >= p.rows * bb) {
        return;
    }
    let blk = g / bb;
    let e = g % bb;
    let q = q_at(q_base(blk), e / b, e % b);
    let d = select(0.0, 1.0, e / b == e % b);
    scratch[blk * cayley_stride(b) + e] = d + q;
    blocks[g] = d - q;
}

var<workgroup> red_val: array<f32, BLOCK_WG>;
var<workgroup> red_idx: array<u32, BLOCK_WG>;

// One workgroup per block: the row >= col with the largest |A[row, col]| (lowest row on ties),
// and copies of column col of A, the pivot row and row col.
@compute @workgroup_size(BLOCK_WG)
fn cayley_pivot(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let blk = block_index(wid, nwg);
    if (blk >= p.rows) {
        return;
    }
    let b = p.b;
    let col = step[0];
    let a0 = blk * cayley_stride(b);
    let f0 = a0 + b * b;
    let piv_row0 = f0 + b;
    let col_row0 = piv_row0 + 2u * b;
    let r0 = blk * b * b;

    var best = -1.0;
    var best_row = col;
    for (var r = col + t; r < b; r += BLOCK_WG) {
        let v = abs(scratch[a0 + r * b + col]);
        if (v > best) {
            best = v;
            best_row = r;
        }
    }
    red_val[t] = best;
    red_idx[t] = best_row;
    workgroupBarrier();
    for (var s = BLOCK_WG / 2u; s > 0u; s >>= 1u) {
        if (t < s) {
            let ov = red_val[t + s];
            let oi = red_idx[t + s];
            if (ov > red_val[t] || (ov == red_val[t] && oi < red_idx[t])) {
                red_val[t] = ov;
                red_idx[t] = oi;
            }
        }
        workgroupBarrier();
    }
    let piv = red_idx[0];

    for (var r = t; r < b; r += BLOCK_WG) {
        scratch[f0 + r] = scratch[a0 + r * b + col];
    }
    for (var j = t; j < 2u * b; j += BLOCK_WG) {
        scratch[piv_row0 + j] = ab_get(a0, r0, piv, j);
        scratch[col_row0 + j] = ab_get(a0, r0, col, j);
    }
    if (t == 0u) {
        scratch[col_row0 + 2u * b] = f32(piv);
    }
}

// One invocation per element of [A | B] of every block: swap rows col and piv, scale the pivot row,
// eliminate column col from every other row. Columns of A left of col are unit vectors already and
// stay so.
@compute @workgroup_size(ELEMENT_WG)
fn cayley_eliminate(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let b = p.b;
    let per_block = 2u * b * b;
    let g = element_index(wid, nwg, t);
    if (g >= p.rows * per_block) {
        return;
    }
    let col = step[0];
    let blk = g / per_block;
    let r = (g % per_block) / (2u * b);
    let j = g % (2u * b);
    if (j < col) {
        return;
    }
    let a0 = blk * cayley_stride(b);
    let f0 = a0 + b * b;
    let piv_row0 = f0 + b;
    let col_row0 = piv_row0 + 2u * b;
    let r0 = blk * b * b;
    let piv = u32(scratch[col_row0 + 2u * b]);

    let pj = scratch[piv_row0 + j] / scratch[f0 + piv];
    var v: f32;
    if (r == col) {
        v = pj;
    } else if (r == piv) {
        v = scratch[col_row0 + j] - scratch[f0 + col] * pj;
    } else {
        v = ab_get(a0, r0, r, j) - scratch[f0 + r] * pj;
    }
    ab_set(a0, r0, r, j, v);
}

// Cayley-Neumann (common/oft_blocks.wgsl has the series). The powers of Q ping-pong between two
// b x b scratch matrices; power k (= step[0] + 2) is one launch with one invocation per element.
// Scratch per block: Q (b x b), then the two powers.

fn neumann_stride(b: u32) -> u32 {
    return 3u * b * b;
}

// Where power k of Q lives (k >= 1).
fn power_at(blk: u32, k: u32) -> u32 {
    let bb = p.b * p.b;
    return blk * neumann_stride(p.b) + bb * (1u + (k + 1u) % 2u);
}

// R = I + 2Q (or I), and Q twice in scratch: dense, and as the first power.
@compute @workgroup_size(ELEMENT_WG)
fn neumann_init(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let b = p.b;
    let bb = b * b;
    let g = element_index(wid, nwg, t);
    if (g >= p.rows * bb) {
        return;
    }
    let blk = g / bb;
    let e = g % bb;
    let q = q_at(q_base(blk), e / b, e % b);
    let d = select(0.0, 1.0, e / b == e % b);
    blocks[g] = d + power_coefficient(1u) * q;
    scratch[blk * neumann_stride(b) + e] = q;
    scratch[power_at(blk, 1u) + e] = q;
}

// Q^k = Q^(k-1) Q, added to R with its coefficient.
@compute @workgroup_size(ELEMENT_WG)
fn neumann_power(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let b = p.b;
    let bb = b * b;
    let g = element_index(wid, nwg, t);
    if (g >= p.rows * bb) {
        return;
    }
    let k = step[0] + 2u;
    let blk = g / bb;
    let i = (g % bb) / b;
    let j = g % b;
    let q0 = blk * neumann_stride(b);
    let src = power_at(blk, k - 1u) + i * b;
    var acc = 0.0;
    for (var l = 0u; l < b; l++) {
        acc += scratch[src + l] * scratch[q0 + l * b + j];
    }
    scratch[power_at(blk, k) + i * b + j] = acc;
    blocks[g] += power_coefficient(k) * acc;
}
