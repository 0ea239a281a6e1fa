// The flat index of an invocation in a launch of one invocation per element, 256 per workgroup,
// whose workgroups are split over x and y past the 65535-per-dimension limit (`kernels::grid`).
fn element_index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

// DoRA's output from the base output `base` (bias included), the bias, g = m / n, the scaling
// s and acc = (x Aᵀ)Bᵀ: the bias stays out of the rescale.
fn dora_output(base: f32, bias_value: f32, g: f32, scaling: f32, acc: f32) -> f32 {
    return base + (g - 1.0) * (base - bias_value) + g * scaling * acc;
}
