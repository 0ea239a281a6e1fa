//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use quantadapt::gpu::GpuContext;
use quantadapt::tensor::Matrix;
use rand::Rng;

/// The GPU every GPU test runs on. A missing adapter fails the test: it is never skipped.
pub fn gpu() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| match GpuContext::new() {
        Ok(ctx) => ctx,
        Err(e) => panic!("GPU tests need an adapter (install mesa-vulkan-drivers): {e}"),
    })
}

pub fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden")
}

/// A matrix of fresh random values in [-scale, scale), never all zeros.
pub fn random_matrix(rows: usize, cols: usize, scale: f32) -> Matrix {
    let mut rng = rand::rng();
    let data: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-scale..scale))
        .collect();
    assert!(data.iter().any(|v| *v != 0.0));
    Matrix::new(rows, cols, data).unwrap()
}
