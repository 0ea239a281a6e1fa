//! OFT rotation blocks built on the GPU (`shaders/oft_build.wgsl`) against the CPU reference
//! (`OftAdapter`), on fresh random generators: every block size, both parameterizations, with and
//! without block sharing. The output buffer starts as NaN poison, so unwritten elements fail.

mod common;

use common::{gpu, random_matrix};
use quantadapt::adapters::oft::{OftAdapter, Parameterization};
use quantadapt::error::Error;
use quantadapt::gpu::{ActDtype, GpuTensor};
use quantadapt::kernels::oft::GpuOft;
use quantadapt::tensor::max_rel_error;

const PARAMETERIZATIONS: [Parameterization; 4] = [
    Parameterization::Cayley,
    Parameterization::Neumann { terms: 3 },
    Parameterization::Neumann { terms: 5 },
    Parameterization::Neumann { terms: 7 },
];

fn adapter(
    b: usize,
    in_features: usize,
    parameterization: Parameterization,
    share: bool,
    coft: Option<f32>,
) -> OftAdapter {
    let rows = if share { 1 } else { in_features / b };
    let params = random_matrix(rows, b * (b - 1) / 2, 0.3 / b as f32);
    OftAdapter::from_params("r", in_features, params, parameterization, coft, share).unwrap()
}

fn gpu_build(oft: &OftAdapter) -> GpuOft {
    GpuOft::build(
        gpu(),
        oft.params(),
        oft.block_size(),
        oft.param_rows(),
        oft.in_features(),
        oft.parameterization(),
    )
    .unwrap()
}

/// max |R Rᵀ − I| over every block.
fn orthogonality_error(blocks: &[f32], b: usize) -> f32 {
    let mut worst = 0f32;
    for r in blocks.chunks_exact(b * b) {
        for i in 0..b {
            for j in 0..b {
                let dot: f32 = (0..b).map(|k| r[i * b + k] * r[j * b + k]).sum();
                let id = if i == j { 1.0 } else { 0.0 };
                worst = worst.max((dot - id).abs());
            }
        }
    }
    worst
}

#[test]
fn gpu_built_blocks_match_cpu_for_every_block_size_and_parameterization() {
    let ctx = gpu();
    let in_features = 256;
    for b in [2usize, 8, 16, 32, 64, 128] {
        for parameterization in PARAMETERIZATIONS {
            for share in [false, true] {
                let what = format!("b={b} {parameterization:?} share={share}");
                let oft = adapter(b, in_features, parameterization, share, None);
                let gpu_oft = gpu_build(&oft);
                let got = gpu_oft.download_blocks(ctx).unwrap();
                let expected = oft.blocks_flat();
                assert_eq!(got.len(), expected.len(), "{what}");
                assert!(got.iter().all(|v| v.is_finite()), "{what}: unwritten");
                let err = max_rel_error(&got, &expected);
                assert!(err < 1e-5, "{what}: blocks differ by {err}");
                if parameterization == Parameterization::Cayley {
                    let orth = orthogonality_error(&got, b);
                    assert!(orth < 1e-5, "{what}: R Rᵀ − I = {orth}");
                }

                let x = random_matrix(5, in_features, 1.0);
                let expected = oft.rotate_cpu(&x).unwrap();
                let y = gpu_oft
                    .rotate(ctx, &GpuTensor::upload(ctx, &x, ActDtype::F32).unwrap())
                    .unwrap()
                    .download(ctx)
                    .unwrap();
                let err = max_rel_error(&y.data, &expected.data);
                assert!(err < 1e-5, "{what}: rotation differs by {err}");
            }
        }
    }
}

#[test]
fn short_neumann_series_and_coft_projected_params() {
    let ctx = gpu();
    for parameterization in [
        Parameterization::Neumann { terms: 0 },
        Parameterization::Neumann { terms: 1 },
        Parameterization::Neumann { terms: 2 },
        Parameterization::Neumann { terms: 4 },
    ] {
        let oft = adapter(16, 64, parameterization, false, None);
        let got = gpu_build(&oft).download_blocks(ctx).unwrap();
        let err = max_rel_error(&got, &oft.blocks_flat());
        assert!(err < 1e-5, "{parameterization:?}: {err}");
    }
    // COFT stays on the CPU: the GPU builds from the projected parameter.
    for parameterization in [
        Parameterization::Cayley,
        Parameterization::Neumann { terms: 5 },
    ] {
        let oft = adapter(32, 128, parameterization, false, Some(1e-2));
        let got = gpu_build(&oft).download_blocks(ctx).unwrap();
        let err = max_rel_error(&got, &oft.blocks_flat());
        assert!(err < 1e-5, "COFT {parameterization:?}: {err}");
    }
}

/// b = 1 (a zero-size parameter: the identity) and more than 65535 blocks (a 2-D grid).
#[test]
fn degenerate_block_size_and_more_blocks_than_one_grid_dimension() {
    let ctx = gpu();
    for parameterization in [
        Parameterization::Cayley,
        Parameterization::Neumann { terms: 5 },
    ] {
        let oft = GpuOft::build(ctx, &[], 1, 4, 4, parameterization).unwrap();
        assert_eq!(oft.download_blocks(ctx).unwrap(), vec![1.0; 4]);

        let b = 2;
        let in_features = b * 70_000;
        let oft = adapter(b, in_features, parameterization, false, None);
        let got = gpu_build(&oft).download_blocks(ctx).unwrap();
        let err = max_rel_error(&got, &oft.blocks_flat());
        assert!(err < 1e-5, "{parameterization:?} 70000 blocks: {err}");
    }
}

#[test]
fn bad_sizes_are_errors() {
    let ctx = gpu();
    let cayley = Parameterization::Cayley;
    let cases: [(&[f32], usize, usize, usize); 5] = [
        (&[0.1; 6], 0, 1, 4),  // block size 0
        (&[0.1; 6], 4, 1, 6),  // 4 does not divide 6
        (&[0.1; 6], 4, 3, 8),  // 3 rows for 2 blocks
        (&[0.1; 5], 4, 1, 8),  // 5 values, not 6
        (&[0.1; 12], 4, 1, 8), // two rows' worth under sharing
    ];
    for (params, b, rows, in_features) in cases {
        match GpuOft::build(ctx, params, b, rows, in_features, cayley) {
            Err(Error::Shape { .. }) => {}
            other => panic!("b={b} rows={rows} in={in_features}: {other:?}"),
        }
    }
    let nan = [f32::NAN; 6];
    assert!(matches!(
        GpuOft::build(ctx, &nan, 4, 1, 8, cayley),
        Err(Error::NonFinite { .. })
    ));
}

/// Exact Cayley for generators far from small (I + Q is no longer diagonally dominant, so the
/// elimination swaps rows): still orthogonal and equal to the CPU solve.
#[test]
fn exact_cayley_with_large_generators_pivots_correctly() {
    let ctx = gpu();
    for b in [3usize, 8, 32, 128] {
        let in_features = 2 * b;
        let params = random_matrix(2, b * (b - 1) / 2, 3.0);
        let oft = OftAdapter::from_params(
            "r",
            in_features,
            params,
            Parameterization::Cayley,
            None,
            false,
        )
        .unwrap();
        let got = gpu_build(&oft).download_blocks(ctx).unwrap();
        let err = max_rel_error(&got, &oft.blocks_flat());
        assert!(err < 1e-4, "b={b}: {err}");
        let orth = orthogonality_error(&got, b);
        assert!(orth < 1e-4, "b={b}: R Rᵀ − I = {orth}");
    }
}
