// The compute-ceiling yardstick: every invocation runs four independent vec4 chains of
// `iterations` multiply-adds (16 FMAs per step, no memory traffic) and writes the sum of its
// chains, so the loop cannot be optimized away. `mul` and `add` come from a uniform so the
// compiler cannot fold the chains.

struct FmaParams {
    iterations: u32,
    invocations: u32,
    mul: f32,
    add: f32,
}

@group(0) @binding(0) var<uniform> p: FmaParams;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= p.invocations) {
        return;
    }
    let seed = f32(i % 1024u) * 0.001;
    var a = vec4<f32>(seed, seed + 0.25, seed + 0.5, seed + 0.75);
    var b = a + vec4<f32>(1.0);
    var c = a + vec4<f32>(2.0);
    var d = a + vec4<f32>(3.0);
    let m = vec4<f32>(p.mul);
    let s = vec4<f32>(p.add);
    for (var t = 0u; t < p.iterations; t++) {
        a = fma(a, m, s);
        b = fma(b, m, s);
        c = fma(c, m, s);
        d = fma(d, m, s);
    }
    let sum = a + b + c + d;
    out[i] = sum.x + sum.y + sum.z + sum.w;
}
