// Shapes of a quantized matmul y[M, N] = x[M, K] · W[N, K]ᵀ (+ bias), shared by all formats.
struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    has_bias: u32,
}

@group(0) @binding(0) var<uniform> p: MatmulParams;
