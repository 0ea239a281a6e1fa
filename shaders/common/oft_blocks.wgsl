// What the OFT block builder (oft_build.wgsl) and its check (oft_check.wgsl) share.
// `params` is [rows, b(b-1)/2]: row i holds the strict upper triangle of block i's skew-symmetric
// generator in `triu_indices(b, b, 1)` order (row-major), and Q = S - S^T. `blocks` is
// [rows, b, b] row-major, the layout oft_rotate.wgsl reads.
//
// llvmpipe (lavapipe) ends loops silently once an invocation has run 65535 loop trips in all,
// summed over every loop of the shader, nested or not (one budget per invocation, never reset).
// So no invocation here loops much more than b times: each launch gives an invocation a few
// elements (a dot product of length b at most) or one block's short scan, and the sequential
// parts (Gauss-Jordan columns, powers of Q) are a chain of launches. A launch that
// needs its place in the chain reads it from `step[0]`, which `advance` increments between
// launches, so the chain is recorded with one bind group per entry point.

struct BuildParams {
    b: u32,
    // Blocks (parameter rows).
    rows: u32,
    // Cayley-Neumann term count.
    terms: u32,
    // 1 for exact Cayley, 0 for Cayley-Neumann.
    cayley: u32,
}

@group(0) @binding(0) var<uniform> p: BuildParams;
@group(0) @binding(1) var<storage, read> params: array<f32>;
@group(0) @binding(2) var<storage, read_write> blocks: array<f32>;
@group(0) @binding(3) var<storage, read_write> scratch: array<f32>;
@group(0) @binding(4) var<storage, read_write> step: array<u32>;

// Invocations of a launch with one invocation per element.
const ELEMENT_WG: u32 = 256u;
// Invocations of a launch with one workgroup per block.
const BLOCK_WG: u32 = 64u;

// The element of an element-wise launch this invocation owns (2-D grid past 65535 workgroups).
fn element_index(wid: vec3<u32>, nwg: vec3<u32>, t: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * ELEMENT_WG + t;
}

// The block of a launch with one workgroup per block.
fn block_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// Where block `blk`'s generator starts in `params`.
fn q_base(blk: u32) -> u32 {
    return blk * ((p.b * p.b - p.b) / 2u);
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

// Cayley-Neumann, PEFT >= 0.18: R = I; + 2Q if terms > 1; if terms > 2, + 2Q^2 + ... +
// 2Q^(last-1) + Q^last with last = max(terms - 1, 3).
fn last_power() -> u32 {
    return max(p.terms - 1u, 3u);
}

fn power_coefficient(power: u32) -> f32 {
    if (power == 1u) {
        return select(0.0, 2.0, p.terms > 1u);
    }
    return select(2.0, 1.0, power == last_power());
}
