//! Property tests: loaders never panic on arbitrary or mutated input, and packing round-trips.

use proptest::prelude::*;
use quantadapt::adapters::lora::LoraAdapter;
use quantadapt::formats::QuantWeight;
use quantadapt::formats::hqq::{HqqConfig, HqqWeight, Packing, packing};
use quantadapt::io::TensorFile;
use quantadapt::tensor::Matrix;

fn golden_checkpoint() -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/golden/hqq_f16_o96_i128_b4/checkpoint/model.safetensors");
    std::fs::read(path).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn arbitrary_bytes_never_panic_the_safetensors_reader(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = TensorFile::from_bytes(&bytes, "fuzz");
    }

    #[test]
    fn mutated_checkpoints_load_or_fail_cleanly(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = golden_checkpoint();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if let Ok(file) = TensorFile::from_bytes(&bytes, "mutated") {
            let dir = std::env::temp_dir().join(format!("quantadapt-prop-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("model.safetensors");
            file.save(&path).unwrap();
            let _ = QuantWeight::load_file(&path, None, None);
            let _ = HqqWeight::from_tensors(&file, "model.layers.0.self_attn.q_proj.");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn packing_round_trips(nbits in prop::sample::select(vec![1u32, 2, 3, 4, 8]), rows8 in 1usize..6, cols in 1usize..40, seed in any::<u64>()) {
        let p = Packing::for_bits(nbits).unwrap();
        let rows = rows8 * 8;
        let mask = p.mask() as u64;
        let codes: Vec<u8> = (0..rows * cols).map(|i| ((seed.wrapping_mul(6364136223846793005).wrapping_add((i as u64).wrapping_mul(1442695040888963407)) >> 33) & mask) as u8).collect();
        let packed = packing::pack(&p, &codes, rows, cols).unwrap();
        let unpacked = packing::unpack(&p, &packed, p.packed_rows(rows).unwrap(), cols, 0..rows * cols);
        prop_assert_eq!(unpacked, codes);
    }

    #[test]
    fn quantize_never_panics_on_odd_shapes(out in 1usize..12, inp in 1usize..40, g in 1usize..64, nbits in 0u32..10, axis in 0usize..3) {
        let data: Vec<f32> = (0..out * inp).map(|i| ((i * 7919) % 113) as f32 / 50.0 - 1.0).collect();
        let m = Matrix::new(out, inp, data).unwrap();
        let _ = HqqWeight::quantize(&m, None, &HqqConfig::new(nbits, g, axis));
    }

    #[test]
    fn lora_shapes_are_checked(r in 0usize..5, inp in 1usize..9, out in 1usize..9, r2 in 0usize..5) {
        let a = Matrix::zeros(r, inp);
        let b = Matrix::zeros(out, r2);
        let _ = LoraAdapter::from_matrices("p", inp, out, a, b, 1.0, None);
    }
}
