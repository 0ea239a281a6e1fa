// Four consecutive inputs of a row of x as f32: x[row, 4q .. 4q + 4), zero past K. With X_VEC4
// (K a multiple of 4) the includer binds `x: array<vec4<Act>>` and this is one vector load;
// otherwise `x: array<Act>` and four bounded scalar loads. The includer provides `p.k`.
fn x_quad(row: u32, q: u32) -> vec4<f32> {
    if (4u * q >= p.k) {
        return vec4<f32>(0.0);
    }
#ifdef X_VEC4
    return vec4<f32>(x[row * (p.k / 4u) + q]);
#else
    let base = row * p.k + 4u * q;
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        if (4u * q + i < p.k) {
            v[i] = f32(x[base + i]);
        }
    }
    return v;
#endif
}
