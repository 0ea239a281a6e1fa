// Round-to-nearest-even of an f32 to f16 or bf16 precision, done with integer ops because WGSL
// leaves the rounding of f32 -> f16 conversions to the implementation. Subnormals are kept.
// COMPUTE selects the dtype: 0 = f32 (no rounding), 1 = f16, 2 = bf16.

fn round_f16(x: f32) -> f32 {
    let b = bitcast<u32>(x);
    let sign = b & 0x80000000u;
    let a = b & 0x7fffffffu;
    if (a >= 0x7f800000u) {
        return x;
    }
    if (a >= 0x477ff000u) {
        return bitcast<f32>(sign | 0x7f800000u);
    }
    if (a < 0x38800000u) {
        // f16 subnormal range: multiples of 2^-24; the scaling by 2^24 is exact.
        let r = round(bitcast<f32>(a) * 16777216.0) / 16777216.0;
        return bitcast<f32>(sign | bitcast<u32>(r));
    }
    let lsb = (a >> 13u) & 1u;
    return bitcast<f32>(sign | ((a + 0xfffu + lsb) & 0xffffe000u));
}

fn round_bf16(x: f32) -> f32 {
    let b = bitcast<u32>(x);
    if ((b & 0x7fffffffu) >= 0x7f800000u) {
        return x;
    }
    let lsb = (b >> 16u) & 1u;
    return bitcast<f32>((b + 0x7fffu + lsb) & 0xffff0000u);
}

fn to_compute(x: f32) -> f32 {
    if (COMPUTE == 1u) {
        return round_f16(x);
    }
    if (COMPUTE == 2u) {
        return round_bf16(x);
    }
    return x;
}
