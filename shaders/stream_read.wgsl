// The streaming-read yardstick: a grid-stride read of a whole buffer as vec4<u32>, xor-reduced
// per invocation and written out so that no read can be optimized away. Its time over the
// buffer's bytes is the device's streaming-read bandwidth.

struct StreamParams {
    // vec4<u32> elements in `data`.
    len: u32,
    // Invocations in the launch (the grid stride).
    invocations: u32,
}

@group(0) @binding(0) var<uniform> p: StreamParams;
@group(0) @binding(1) var<storage, read> data: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= p.invocations) {
        return;
    }
    var acc = vec4<u32>(0u);
    for (var j = i; j < p.len; j += p.invocations) {
        acc ^= data[j];
    }
    out[i] = acc.x ^ acc.y ^ acc.z ^ acc.w;
}
