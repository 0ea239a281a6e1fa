//! OFT rotation and LoRA / DoRA kernels on the GPU against the CPU reference, on fresh random
//! adapters and inputs.

mod common;

use common::{gpu, random_matrix};
use quantadapt::adapters::lora::LoraAdapter;
use quantadapt::adapters::oft::{OftAdapter, Parameterization};
use quantadapt::gpu::{ActDtype, GpuTensor};
use quantadapt::kernels::lora::GpuLora;
use quantadapt::kernels::oft::GpuOft;
use quantadapt::tensor::{Matrix, max_rel_error};

fn rounded_f16(m: &Matrix) -> Matrix {
    let mut r = m.clone();
    r.round_to_f16();
    r
}

#[test]
fn oft_rotation_matches_cpu_for_every_block_size_and_parameterization() {
    let ctx = gpu();
    for b in [2usize, 8, 16, 32, 64, 128] {
        let in_features = 256;
        for (parameterization, share) in [
            (Parameterization::Cayley, false),
            (Parameterization::Neumann { terms: 5 }, false),
            (Parameterization::Cayley, true),
        ] {
            let rows = if share { 1 } else { in_features / b };
            let params = random_matrix(rows, b * (b - 1) / 2, 0.3 / b as f32);
            let oft =
                OftAdapter::from_params("r", in_features, params, parameterization, None, share)
                    .unwrap();
            let gpu_oft = GpuOft::upload(ctx, &oft.blocks_flat(), b, in_features).unwrap();
            for act in common::act_dtypes(ctx) {
                let x = match act {
                    ActDtype::F32 => random_matrix(5, in_features, 1.0),
                    ActDtype::F16 => rounded_f16(&random_matrix(5, in_features, 1.0)),
                };
                let expected = oft.rotate_cpu(&x).unwrap();
                let y = gpu_oft
                    .rotate(ctx, &GpuTensor::upload(ctx, &x, act).unwrap())
                    .unwrap()
                    .download(ctx)
                    .unwrap();
                let tol = if act == ActDtype::F32 { 1e-5 } else { 2e-3 };
                let err = max_rel_error(&y.data, &expected.data);
                assert!(
                    err < tol,
                    "b={b} {parameterization:?} share={share} {act:?}: {err}"
                );
            }
        }
    }
}

fn lora_case(rank: usize, dora: bool) {
    let ctx = gpu();
    let (inp, out, m) = (96, 80, 6);
    let a = random_matrix(rank, inp, 0.2);
    let b = random_matrix(out, rank, 0.2);
    let base_weight = random_matrix(out, inp, 0.1);
    let bias = random_matrix(1, out, 0.5).data;
    let magnitude = dora.then(|| {
        random_matrix(1, out, 1.0)
            .data
            .iter()
            .map(|v| v.abs() + 0.5)
            .collect()
    });
    let lora =
        LoraAdapter::from_matrices("l", inp, out, a.clone(), b.clone(), 1.7, magnitude).unwrap();
    let x = random_matrix(m, inp, 1.0);
    let mut expected = x.matmul_t(&base_weight).unwrap();
    expected.add_row_vector(&bias);
    let base_out = expected.clone();
    lora.apply_cpu(&x, &mut expected, Some(&bias), &base_weight)
        .unwrap();

    let dora_scale = lora.dora_scale(&base_weight).unwrap();
    let gl = GpuLora::upload(
        ctx,
        lora.a(),
        lora.b(),
        lora.scaling(),
        dora_scale.as_deref(),
    )
    .unwrap();
    let xg = GpuTensor::upload(ctx, &x, ActDtype::F32).unwrap();
    let yg = GpuTensor::upload(ctx, &base_out, ActDtype::F32).unwrap();
    let bias_buf = quantadapt::gpu::buffers::storage_from_f32(ctx, "bias", &bias).unwrap();
    gl.apply(ctx, &xg, &yg, Some(&bias_buf)).unwrap();
    let y = yg.download(ctx).unwrap();
    let err = max_rel_error(&y.data, &expected.data);
    assert!(err < 1e-5, "rank {rank} dora={dora}: {err}");
}

#[test]
fn lora_and_dora_match_cpu_at_several_ranks() {
    for rank in [1, 8, 16, 64] {
        lora_case(rank, false);
        lora_case(rank, true);
    }
}
