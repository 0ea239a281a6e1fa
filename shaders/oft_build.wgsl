// OFT rotation blocks built from their generators (PEFT >= 0.18, spec section 1), f32 throughout.
// `params` is [rows, b(b-1)/2]: row i holds the strict upper triangle of block i's skew-symmetric
// generator in `triu_indices(b, b, 1)` order (row-major), and Q = S - S^T.
// `blocks` receives [rows, b, b] row-major, the layout oft_rotate.wgsl reads.
// One workgroup per block (workgroup_id.x + workgroup_id.y * num_workgroups.x, so more than 65535
// blocks work); its working matrices live in `scratch` (global memory: a b x 2b system does not fit
// in workgroup memory for b = 128), 2b^2 + 3b floats per block. The WG invocations of a workgroup
// share each step by rows, columns or elements and meet at barriers between steps. No subgroup
// operations, so any subgroup size works.

const WG: u32 = 64u;

struct BuildParams {
    b: u32,
    // Blocks to build (parameter rows).
    rows: u32,
    // Cayley-Neumann term count (the `neumann` entry only).
    terms: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: BuildParams;
@group(0) @binding(1) var<storage, read> params: array<f32>;
@group(0) @binding(2) var<storage, read_write> blocks: array<f32>;
@group(0) @binding(3) var<storage, read_write> scratch: array<f32>;

// Pivot search of the `cayley` entry.
var<workgroup> red_val: array<f32, WG>;
var<workgroup> red_idx: array<u32, WG>;

fn sync() {
    storageBarrier();
    workgroupBarrier();
}

fn scratch_stride(b: u32) -> u32 {
    return 2u * b * b + 3u * b;
}

// Q[i, j] of the block whose parameter row starts at `base`.
fn q_at(base: u32, i: u32, j: u32) -> f32 {
    if (i == j) {
        return 0.0;
    }
    let lo = min(i, j);
    let hi = max(i, j);
    // Rows 0..lo of the upper triangle hold sum_{r < lo} (b - 1 - r) = lo (2b - lo - 1) / 2 entries.
    let v = params[base + lo * (2u * p.b - lo - 1u) / 2u + (hi - lo - 1u)];
    return select(-v, v, i < j);
}

// Exact Cayley. PEFT solves X (I + Q) = I - Q; I + Q and I - Q commute, so X = (I + Q)^-1 (I - Q)
// as well, which Gauss-Jordan elimination with partial pivoting on [I + Q | I - Q] yields (the CPU
// reference solves the same system). The right half of the system is the output block itself.
// Scratch per block: A (b x b), the eliminated column of factors (b), the pivot row of [A | B] (2b).
@compute @workgroup_size(64)
fn cayley(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let blk = wid.x + wid.y * nwg.x;
    if (blk >= p.rows) {
        return;
    }
    let b = p.b;
    let bb = b * b;
    let qbase = blk * (bb - b) / 2u;
    let a0 = blk * scratch_stride(b);
    let f0 = a0 + bb;
    let piv0 = f0 + b;
    let r0 = blk * bb;

    for (var e = t; e < bb; e += WG) {
        let q = q_at(qbase, e / b, e % b);
        let d = select(0.0, 1.0, e / b == e % b);
        scratch[a0 + e] = d + q;
        blocks[r0 + e] = d - q;
    }
    sync();

    for (var col = 0u; col < b; col++) {
        // Partial pivoting: the row >= col with the largest |A[row, col]| (lowest row on ties).
        var best = -1.0;
        var best_row = col;
        for (var r = col + t; r < b; r += WG) {
            let v = abs(scratch[a0 + r * b + col]);
            if (v > best) {
                best = v;
                best_row = r;
            }
        }
        red_val[t] = best;
        red_idx[t] = best_row;
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s >>= 1u) {
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

        // Snapshot the factors (column col) and the pivot row of [A | B].
        for (var r = t; r < b; r += WG) {
            scratch[f0 + r] = scratch[a0 + r * b + col];
        }
        for (var j = t; j < 2u * b; j += WG) {
            var v: f32;
            if (j < b) {
                v = scratch[a0 + piv * b + j];
            } else {
                v = blocks[r0 + piv * b + (j - b)];
            }
            scratch[piv0 + j] = v;
        }
        sync();

        // Swap rows col and piv, scale the pivot row, eliminate column col from every other row.
        // One invocation owns a whole column of [A | B], so the update needs no more barriers.
        // Columns of A left of col are already unit vectors and stay so.
        let pv = scratch[f0 + piv];
        let fc = scratch[f0 + col];
        for (var j = col + t; j < 2u * b; j += WG) {
            let pj = scratch[piv0 + j] / pv;
            var base = a0 + j;
            if (j >= b) {
                base = r0 + (j - b);
            }
            var old_col: f32;
            if (j < b) {
                old_col = scratch[base + col * b];
            } else {
                old_col = blocks[base + col * b];
            }
            for (var r = 0u; r < b; r++) {
                var v: f32;
                if (r == col) {
                    v = pj;
                } else if (r == piv) {
                    v = old_col - fc * pj;
                } else {
                    let f = scratch[f0 + r];
                    if (j < b) {
                        v = scratch[base + r * b] - f * pj;
                    } else {
                        v = blocks[base + r * b] - f * pj;
                    }
                }
                if (j < b) {
                    scratch[base + r * b] = v;
                } else {
                    blocks[base + r * b] = v;
                }
            }
        }
        sync();
    }
}

// Cayley-Neumann, PEFT >= 0.18: R = I; + 2Q if terms > 1; if terms > 2, + 2Q^2 + ... + 2Q^(last-1)
// + Q^last with last = max(terms - 1, 3). The powers ping-pong between two b x b scratch matrices;
// each invocation owns the same output elements in every pass, so R needs no barrier of its own.
@compute @workgroup_size(64)
fn neumann(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let blk = wid.x + wid.y * nwg.x;
    if (blk >= p.rows) {
        return;
    }
    let b = p.b;
    let bb = b * b;
    let qbase = blk * (bb - b) / 2u;
    let r0 = blk * bb;
    let terms = p.terms;
    let q_coef = select(0.0, 2.0, terms > 1u);

    for (var e = t; e < bb; e += WG) {
        let d = select(0.0, 1.0, e / b == e % b);
        blocks[r0 + e] = d + q_coef * q_at(qbase, e / b, e % b);
    }
    if (terms > 2u) {
        var src = blk * scratch_stride(b);
        var dst = src + bb;
        // Q^2
        for (var e = t; e < bb; e += WG) {
            let i = e / b;
            let j = e % b;
            var acc = 0.0;
            for (var k = 0u; k < b; k++) {
                acc += q_at(qbase, i, k) * q_at(qbase, k, j);
            }
            scratch[src + e] = acc;
            blocks[r0 + e] += 2.0 * acc;
        }
        sync();
        let last = max(terms - 1u, 3u);
        for (var power = 3u; power <= last; power++) {
            let c = select(2.0, 1.0, power == last);
            for (var e = t; e < bb; e += WG) {
                let i = e / b;
                let j = e % b;
                var acc = 0.0;
                for (var k = 0u; k < b; k++) {
                    acc += scratch[src + i * b + k] * q_at(qbase, k, j);
                }
                scratch[dst + e] = acc;
                blocks[r0 + e] += c * acc;
            }
            sync();
            let tmp = src;
            src = dst;
            dst = tmp;
        }
    }
}
