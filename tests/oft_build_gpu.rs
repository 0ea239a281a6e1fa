//! OFT rotation blocks built on the GPU (`shaders/oft_build.wgsl`, checked by
//! `shaders/oft_check.wgsl`) against the CPU reference (`OftAdapter`), on fresh random generators
//! drawn as PEFT's `init_weights=False` draws them (N(0, 0.1)): block sizes from 2 to 512, both
//! parameterizations, with and without block sharing and COFT. The output buffer starts as NaN
//! poison, so unwritten elements fail.

mod common;

use std::time::Instant;

use common::{gpu, random_matrix, random_normal};
use quantadapt::adapters::oft::{OftAdapter, Parameterization};
use quantadapt::error::Error;
use quantadapt::gpu::{ActDtype, GpuTensor};
use quantadapt::kernels::oft::{GpuOft, defect_tolerance};
use quantadapt::tensor::max_rel_error;

const BLOCK_SIZES: [usize; 8] = [2, 16, 32, 64, 128, 172, 256, 512];

/// GPU (f32) against CPU (f64, rounded once) blocks, relative to the largest entry. With N(0, 0.1)
/// generators at b = 512 the spectral radius of Q is about 4.5, so the Neumann series' last terms
/// are hundreds of times larger than I and f32 sums of 512 products lose a few ulps of them.
const BLOCK_TOLERANCE: f64 = 2e-5;

/// Inputs for blocks of `b`: a few blocks, never many of the large ones (lavapipe on 2 cores).
fn in_features_for(b: usize) -> usize {
    match b {
        256.. => b,
        128.. => 2 * b,
        _ => 256,
    }
}

fn peft_init_adapter(
    b: usize,
    in_features: usize,
    parameterization: Parameterization,
    share: bool,
    coft: Option<f32>,
) -> OftAdapter {
    let rows = if share { 1 } else { in_features / b };
    let params = random_normal(rows, b * (b - 1) / 2, 0.1);
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

/// Builds on the GPU, compares the blocks and one rotation with the CPU, and reports what the
/// post-build check measured.
fn check_against_cpu(oft: &OftAdapter, what: &str) {
    let ctx = gpu();
    let b = oft.block_size();
    let start = Instant::now();
    let gpu_oft = gpu_build(oft);
    let elapsed = start.elapsed();
    let got = gpu_oft.download_blocks(ctx).unwrap();
    let expected = oft.blocks_flat();
    assert_eq!(got.len(), expected.len(), "{what}");
    assert!(got.iter().all(|v| v.is_finite()), "{what}: unwritten");
    let err = max_rel_error(&got, &expected);
    let defect = gpu_oft.build_defect().unwrap();
    let tolerance = defect_tolerance(b);
    println!(
        "{what}: blocks differ by {err:.2e}; check defect {defect:.2e} = {:.3} of its tolerance \
         {tolerance:.2e}; {elapsed:.2?}",
        defect / tolerance
    );
    assert!(err < BLOCK_TOLERANCE, "{what}: blocks differ by {err}");
    assert!(defect <= tolerance, "{what}");

    let x = random_matrix(3, oft.in_features(), 1.0);
    let expected = oft.rotate_cpu(&x).unwrap();
    let y = gpu_oft
        .rotate(ctx, &GpuTensor::upload(ctx, &x, ActDtype::F32).unwrap())
        .unwrap()
        .download(ctx)
        .unwrap();
    let err = max_rel_error(&y.data, &expected.data);
    assert!(err < BLOCK_TOLERANCE, "{what}: rotation differs by {err}");
}

#[test]
fn peft_initialized_blocks_match_cpu_at_every_block_size() {
    for b in BLOCK_SIZES {
        let in_features = in_features_for(b);
        for parameterization in [
            Parameterization::Cayley,
            Parameterization::Neumann { terms: 5 },
        ] {
            let oft = peft_init_adapter(b, in_features, parameterization, false, None);
            check_against_cpu(
                &oft,
                &format!("b={b} in={in_features} {parameterization:?}"),
            );
        }
    }
}

#[test]
fn block_sharing_coft_and_every_series_length() {
    for b in [16usize, 172] {
        let in_features = in_features_for(b);
        for parameterization in [
            Parameterization::Cayley,
            Parameterization::Neumann { terms: 5 },
        ] {
            let oft = peft_init_adapter(b, in_features, parameterization, true, None);
            check_against_cpu(&oft, &format!("b={b} {parameterization:?} shared"));
            // PEFT's COFT radius in the golden adapters (eps 1e-2).
            let oft = peft_init_adapter(b, in_features, parameterization, false, Some(1e-2));
            check_against_cpu(&oft, &format!("b={b} {parameterization:?} COFT"));
        }
        for terms in [0, 1, 2, 3, 4, 7] {
            let parameterization = Parameterization::Neumann { terms };
            let oft = peft_init_adapter(b, in_features, parameterization, false, None);
            check_against_cpu(&oft, &format!("b={b} {parameterization:?}"));
        }
    }
}

/// Generators of every magnitude PEFT may meet: far smaller than its init (trained from zero)
/// and far larger (I + Q no longer diagonally dominant, so the elimination swaps rows).
#[test]
fn small_and_large_generators() {
    for (b, scale) in [(3usize, 3.0f32), (32, 0.3 / 32.0), (32, 3.0), (128, 3.0)] {
        for parameterization in [
            Parameterization::Cayley,
            Parameterization::Neumann { terms: 5 },
        ] {
            let in_features = 2 * b;
            let params = random_matrix(2, b * (b - 1) / 2, scale);
            let oft =
                OftAdapter::from_params("r", in_features, params, parameterization, None, false)
                    .unwrap();
            check_against_cpu(&oft, &format!("b={b} |Q| ~ {scale} {parameterization:?}"));
        }
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
        let oft = peft_init_adapter(b, in_features, parameterization, false, None);
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
    let too_big = quantadapt::kernels::oft::MAX_GPU_BLOCK_SIZE + 1;
    assert!(matches!(
        GpuOft::build(ctx, &[], too_big, 1, too_big, cayley),
        Err(Error::Unsupported(_))
    ));
    let nan = [f32::NAN; 6];
    assert!(matches!(
        GpuOft::build(ctx, &nan, 4, 1, 8, cayley),
        Err(Error::NonFinite { .. })
    ));
}
