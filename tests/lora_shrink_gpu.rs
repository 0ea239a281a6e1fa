//! The LoRA shrink `h = x · Aᵀ` (single adapter and mixed batch) and the whole LoRA / DoRA term
//! on the GPU against the CPU, at real models' K (4096) and at K not a multiple of 4, with each
//! reduction kind (subgroup operations and workgroup memory) and every activation dtype. Outputs
//! are NaN-poisoned, so an element no workgroup writes fails.

mod common;

use common::{act_dtypes, random_matrix, reduction_contexts};
use quantadapt::adapters::lora::LoraAdapter;
use quantadapt::gpu::buffers::{read_f32, storage_from_bytes, storage_from_f32};
use quantadapt::gpu::{ActDtype, GpuContext, GpuTensor};
use quantadapt::kernels::Dispatch;
use quantadapt::kernels::lora::GpuLora;
use quantadapt::kernels::mixed::{GpuMixedAdapters, MixedSlot, NONE};
use quantadapt::tensor::{Matrix, max_rel_error};

/// f32 sums over a few thousand products, in another order than the CPU's f64.
const TOLERANCE: f64 = 1e-4;

/// x as the GPU holds it in `act` (f16 rounds).
fn as_act(x: &Matrix, act: ActDtype) -> Matrix {
    let mut held = x.clone();
    if act == ActDtype::F16 {
        held.round_to_f16();
    }
    held
}

fn shrink_case(ctx: &GpuContext, act: ActDtype, k: usize, m: usize, rank: usize) {
    let a = random_matrix(rank, k, 0.2);
    let b = random_matrix(8, rank, 0.2);
    let x = as_act(&random_matrix(m, k, 1.0), act);
    let expected = x.matmul_t(&a).unwrap();
    let lora = GpuLora::upload(ctx, &a, &b, 1.0, None).unwrap();
    let xg = GpuTensor::upload(ctx, &x, act).unwrap();
    let (shrink, h) = lora.prepare_shrink(ctx, &xg).unwrap();
    Dispatch::submit_all(ctx, &[&shrink]).unwrap();
    let got = read_f32(ctx, &h, m * rank).unwrap();
    let err = max_rel_error(&got, &expected.data);
    assert!(
        err < TOLERANCE,
        "{}: {act:?} K={k} M={m} r={rank}: {err}",
        ctx.describe()
    );
}

#[test]
fn shrink_matches_cpu_for_every_rank_row_count_and_reduction() {
    for ctx in reduction_contexts() {
        for act in act_dtypes(ctx) {
            for k in [4096, 4099, 1030] {
                for m in 1..=16 {
                    shrink_case(ctx, act, k, m, 16);
                }
                for rank in [1, 8, 64] {
                    for m in [1, 5, 16] {
                        shrink_case(ctx, act, k, m, rank);
                    }
                }
            }
        }
    }
}

fn adapter_case(ctx: &GpuContext, act: ActDtype, k: usize, m: usize, rank: usize, dora: bool) {
    let out = 96;
    let a = random_matrix(rank, k, 0.05);
    let b = random_matrix(out, rank, 0.2);
    let base_weight = random_matrix(out, k, 0.05);
    let bias = random_matrix(1, out, 0.5).data;
    let magnitude = dora.then(|| {
        random_matrix(1, out, 1.0)
            .data
            .iter()
            .map(|v| v.abs() + 0.5)
            .collect()
    });
    let lora = LoraAdapter::from_matrices("l", k, out, a, b, 1.7, magnitude).unwrap();
    let x = as_act(&random_matrix(m, k, 1.0), act);
    let mut base_out = x.matmul_t(&base_weight).unwrap();
    base_out.add_row_vector(&bias);
    let base_out = as_act(&base_out, act);
    let mut expected = base_out.clone();
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
    let xg = GpuTensor::upload(ctx, &x, act).unwrap();
    let yg = GpuTensor::upload(ctx, &base_out, act).unwrap();
    let bias_buf = storage_from_f32(ctx, "bias", &bias).unwrap();
    gl.apply(ctx, &xg, &yg, Some(&bias_buf)).unwrap();
    let y = yg.download(ctx).unwrap();
    // f16 activations round the output once more.
    let tolerance = if act == ActDtype::F32 {
        TOLERANCE
    } else {
        2e-3
    };
    let err = max_rel_error(&y.data, &expected.data);
    assert!(
        err < tolerance,
        "{act:?} K={k} M={m} r={rank} dora={dora}: {err}"
    );
}

#[test]
fn lora_and_dora_match_cpu_at_k_4096_and_odd_k() {
    for ctx in reduction_contexts() {
        for act in act_dtypes(ctx) {
            for k in [4096, 4099] {
                for (m, rank) in [(1, 16), (16, 8)] {
                    adapter_case(ctx, act, k, m, rank, false);
                    adapter_case(ctx, act, k, m, rank, true);
                }
            }
        }
    }
}

#[test]
fn mixed_shrink_matches_cpu_per_row_slot() {
    let ranks = [1usize, 8, 16, 64];
    for ctx in reduction_contexts() {
        for act in act_dtypes(ctx) {
            for k in [4096, 4099] {
                let adapters: Vec<(Matrix, Matrix)> = ranks
                    .iter()
                    .map(|&r| (random_matrix(r, k, 0.2), random_matrix(8, r, 0.2)))
                    .collect();
                let blocks = random_matrix(1, 4, 0.3).data;
                let mut slots: Vec<MixedSlot<'_>> = vec![MixedSlot::Oft {
                    blocks: &blocks,
                    block_size: 2,
                }];
                slots.extend(adapters.iter().map(|(a, b)| MixedSlot::Lora {
                    a,
                    b,
                    scaling: 1.0,
                    dora_scale: None,
                }));
                let mixed = GpuMixedAdapters::upload(ctx, k, 8, &slots).unwrap();
                // Rows cycle through no adapter, the OFT slot and every LoRA slot.
                let m = 13;
                let row_slot: Vec<u32> = (0..m)
                    .map(|row| match row % 6 {
                        0 => NONE,
                        s => (s - 1) as u32,
                    })
                    .collect();
                let x = as_act(&random_matrix(m, k, 1.0), act);
                let max_rank = 64;
                let mut expected = vec![0f32; m * max_rank];
                for (row, slot) in row_slot.iter().enumerate() {
                    if *slot == NONE || *slot == 0 {
                        continue;
                    }
                    let a = &adapters[*slot as usize - 1].0;
                    let x_row = Matrix {
                        rows: 1,
                        cols: k,
                        data: x.row(row).to_vec(),
                    };
                    let h = x_row.matmul_t(a).unwrap();
                    expected[row * max_rank..row * max_rank + a.rows].copy_from_slice(&h.data);
                }
                let slots_buf =
                    storage_from_bytes(ctx, "row slots", bytemuck::cast_slice(&row_slot)).unwrap();
                let xg = GpuTensor::upload(ctx, &x, act).unwrap();
                let (shrink, h) = mixed.prepare_shrink(ctx, &slots_buf, &xg).unwrap();
                Dispatch::submit_all(ctx, &[&shrink]).unwrap();
                let got = read_f32(ctx, &h, m * max_rank).unwrap();
                let err = max_rel_error(&got, &expected);
                assert!(err < TOLERANCE, "{}: {act:?} K={k}: {err}", ctx.describe());
            }
        }
    }
}
