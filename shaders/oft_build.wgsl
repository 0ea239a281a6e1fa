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
// (= step[0]) takes two launches: `cayley_pivot` picks its pivot row and writes what the
// elimination needs into scratch, then `cayley_eliminate` computes each element of [A | B] from
// its own old value and those, so no element waits for another:
//   new [A | B][r, j] = base[r, j] - factor[r] * pivot_row[j], with
//   pivot_row = the pivot row of [A | B] divided by its pivot,
//   base = 0 on row col, the old row col on the pivot row (the swap), else the old value,
//   factor = -1 on row col, old A[col, col] on the pivot row, else old A[r, col].
// Scratch per block: A (b x b), factor (b), pivot_row (2b), the old row col (2b), the pivot row's
// index.

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
// then factor, pivot_row and the old row col.
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
    let factor0 = a0 + b * b;
    let pivot_row0 = factor0 + b;
    let col_row0 = pivot_row0 + 2u * b;
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
        var f = scratch[a0 + r * b + col];
        if (r == col) {
            f = -1.0;
        } else if (r == piv) {
            f = scratch[a0 + col * b + col];
        }
        scratch[factor0 + r] = f;
    }
    let pivot = scratch[a0 + piv * b + col];
    for (var j = t; j < 2u * b; j += BLOCK_WG) {
        scratch[pivot_row0 + j] = ab_get(a0, r0, piv, j) / pivot;
        scratch[col_row0 + j] = ab_get(a0, r0, col, j);
    }
    if (t == 0u) {
        scratch[col_row0 + 2u * b] = f32(piv);
    }
}

// Columns of [A | B] one cayley_eliminate invocation updates (in one row).
const ELIMINATE_COLUMNS: u32 = 4u;

// One invocation per ELIMINATE_COLUMNS elements of a row of [A | B] of every block: swap rows col
// and piv, scale the pivot row, eliminate column col from every other row. Columns of A left of
// col are unit vectors already and stay so.
@compute @workgroup_size(ELEMENT_WG)
fn cayley_eliminate(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let b = p.b;
    let groups_per_row = (2u * b + ELIMINATE_COLUMNS - 1u) / ELIMINATE_COLUMNS;
    let per_block = b * groups_per_row;
    let g = element_index(wid, nwg, t);
    if (g >= p.rows * per_block) {
        return;
    }
    let col = step[0];
    let blk = g / per_block;
    let r = (g % per_block) / groups_per_row;
    let j0 = (g % groups_per_row) * ELIMINATE_COLUMNS;
    if (j0 + ELIMINATE_COLUMNS <= col) {
        return;
    }
    let a0 = blk * cayley_stride(b);
    let factor0 = a0 + b * b;
    let pivot_row0 = factor0 + b;
    let col_row0 = pivot_row0 + 2u * b;
    let r0 = blk * b * b;
    let piv = u32(scratch[col_row0 + 2u * b]);
    let factor = scratch[factor0 + r];
    for (var c = 0u; c < ELIMINATE_COLUMNS; c++) {
        let j = j0 + c;
        if (j >= col && j < 2u * b) {
            var base = 0.0;
            if (r == piv && r != col) {
                base = scratch[col_row0 + j];
            } else if (r != col) {
                base = ab_get(a0, r0, r, j);
            }
            ab_set(a0, r0, r, j, base - factor * scratch[pivot_row0 + j]);
        }
    }
}

// Cayley-Neumann (common/oft_blocks.wgsl has the series). The powers of Q ping-pong between two
// b x b scratch matrices; power k (= step[0] + 2) is one launch in which each invocation computes
// a TILE x TILE tile of it (so each value it loads feeds TILE multiply-adds), in a loop of b trips.
// Scratch per block: Q (b x b), then the two powers.

const TILE: u32 = 4u;

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

// Q^k = Q^(k-1) Q, added to R with its coefficient. Tiles past the block's edge load clamped
// indices and store nothing there.
@compute @workgroup_size(ELEMENT_WG)
fn neumann_power(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let b = p.b;
    let tiles = (b + TILE - 1u) / TILE;
    let g = element_index(wid, nwg, t);
    if (g >= p.rows * tiles * tiles) {
        return;
    }
    let k = step[0] + 2u;
    let blk = g / (tiles * tiles);
    let i0 = (g % (tiles * tiles)) / tiles * TILE;
    let j0 = g % tiles * TILE;
    let q0 = blk * neumann_stride(b);
    let src = power_at(blk, k - 1u);
    // Clamped rows and columns of the tile. The loop over l runs b trips in all: its body is
    // written out for TILE = 4 rather than looping, whatever a compiler unrolls.
    let row0 = src + min(i0, b - 1u) * b;
    let row1 = src + min(i0 + 1u, b - 1u) * b;
    let row2 = src + min(i0 + 2u, b - 1u) * b;
    let row3 = src + min(i0 + 3u, b - 1u) * b;
    let col0 = min(j0, b - 1u);
    let col1 = min(j0 + 1u, b - 1u);
    let col2 = min(j0 + 2u, b - 1u);
    let col3 = min(j0 + 3u, b - 1u);
    var acc: array<vec4<f32>, TILE>;
    for (var l = 0u; l < b; l++) {
        let q_row = q0 + l * b;
        let q = vec4(
            scratch[q_row + col0],
            scratch[q_row + col1],
            scratch[q_row + col2],
            scratch[q_row + col3],
        );
        acc[0] += scratch[row0 + l] * q;
        acc[1] += scratch[row1 + l] * q;
        acc[2] += scratch[row2 + l] * q;
        acc[3] += scratch[row3 + l] * q;
    }
    let dst = power_at(blk, k);
    let coefficient = power_coefficient(k);
    for (var r = 0u; r < TILE; r++) {
        for (var c = 0u; c < TILE; c++) {
            let i = i0 + r;
            let j = j0 + c;
            if (i < b && j < b) {
                scratch[dst + i * b + j] = acc[r][c];
                blocks[blk * b * b + i * b + j] += coefficient * acc[r][c];
            }
        }
    }
}
