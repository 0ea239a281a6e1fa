// Shapes of a quantized matmul y[M, N] = x[M, K] · W[N, K]ᵀ (+ bias), shared by all formats.
// A launch covers the output features [n_offset, n_offset + n) of y's y_cols: a weight too big
// for one binding is split by rows, one launch per slice.
struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    has_bias: u32,
    n_offset: u32,
    y_cols: u32,
    // Slices of K a split-K GEMV sums (1 for every other kernel).
    split_k: u32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> p: MatmulParams;
