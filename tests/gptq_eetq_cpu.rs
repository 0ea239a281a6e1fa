//! GPTQ and EETQ on the CPU: the golden `oft_gptq*` / `oft_eetq*` base layers (checkpoints and
//! bare tensors), random quantize / pack / unpack round trips, and malformed files.

use std::path::PathBuf;

use quantadapt::formats::QuantFormat;
use quantadapt::formats::eetq::{EetqLayout, EetqWeight};
use quantadapt::formats::gptq::{GptqConfig, GptqWeight, GptqZeros};
use quantadapt::io::{HostTensor, TensorFile};
use quantadapt::tensor::{Matrix, max_rel_error};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use safetensors::Dtype;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Golden vectors

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden")
}

fn golden_cases(kind: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(golden_dir().join("manifest.json")).unwrap();
    let manifest: Value = serde_json::from_str(&text).unwrap();
    let cases: Vec<Value> = manifest["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == kind)
        .cloned()
        .collect();
    assert!(!cases.is_empty(), "no golden `{kind}` cases");
    cases
}

fn case_str<'a>(case: &'a Value, key: &str) -> &'a str {
    case[key].as_str().unwrap()
}

fn case_tensors(case: &Value) -> TensorFile {
    TensorFile::open(
        golden_dir()
            .join(case_str(case, "name"))
            .join("tensors.safetensors"),
    )
    .unwrap()
}

fn checkpoint_dir(case: &Value) -> PathBuf {
    golden_dir()
        .join(case_str(case, "name"))
        .join(case_str(case, "checkpoint_dir"))
}

fn matrix(file: &TensorFile, name: &str) -> Matrix {
    let t = file.get(name).unwrap();
    Matrix::new(t.shape[0], t.shape[1], t.to_f32().unwrap()).unwrap()
}

fn assert_bit_exact(ours: &Matrix, reference: &Matrix, what: &str) {
    assert_eq!(
        (ours.rows, ours.cols),
        (reference.rows, reference.cols),
        "{what}"
    );
    let mismatch = ours
        .data
        .iter()
        .zip(&reference.data)
        .position(|(a, b)| a.to_bits() != b.to_bits());
    if let Some(i) = mismatch {
        panic!(
            "{what}: element {i} is {} instead of {}",
            ours.data[i], reference.data[i]
        );
    }
}

/// `forward_cpu(x)` against `x · W_deqᵀ + bias` and against PyTorch's own output (`y_disabled`,
/// the layer with the adapter off).
fn check_forward(layer: &dyn QuantFormat, file: &TensorFile, what: &str) {
    let x = matrix(file, "x");
    let y = layer.forward_cpu(&x).unwrap();
    let mut expected = x.matmul_t(&matrix(file, "base.W_deq")).unwrap();
    expected.add_row_vector(&file.get("base.bias").unwrap().to_f32().unwrap());
    let err = max_rel_error(&y.data, &expected.data);
    assert!(
        err < 1e-5,
        "{what}: forward error {err} against x W_deq^T + b"
    );
    let err = max_rel_error(&y.data, &matrix(file, "y_disabled").data);
    assert!(err < 1e-5, "{what}: forward error {err} against PyTorch");
}

fn gptq_config_from_meta(meta: &Value) -> GptqConfig {
    let group_size = meta["group_size"].as_i64().unwrap();
    GptqConfig {
        bits: meta["bits"].as_u64().unwrap() as u32,
        group_size: (group_size > 0).then_some(group_size as usize),
        sym: meta["sym"].as_bool().unwrap(),
        desc_act: meta["desc_act"].as_bool().unwrap(),
        zeros: match meta["checkpoint_format"].as_str().unwrap() {
            "gptq" => GptqZeros::V1,
            "gptq_v2" => GptqZeros::V2,
            other => panic!("unexpected checkpoint_format {other}"),
        },
    }
}

#[test]
fn golden_gptq_layers_decode_exactly() {
    let cases = golden_cases("oft_gptq");
    for case in &cases {
        let name = case_str(case, "name");
        let config = gptq_config_from_meta(&case["base_meta"]);
        let file = case_tensors(case);
        let bare = GptqWeight::from_tensors(&file, "base.", config).unwrap();
        let loaded = GptqWeight::load(&checkpoint_dir(case), case_str(case, "module")).unwrap();
        assert_eq!(loaded.config, config, "{name}: config files");
        assert_eq!(loaded, bare, "{name}: checkpoint vs tensors");

        let codes = file.get("base.codes").unwrap().to_u8().unwrap();
        assert_eq!(bare.codes(), codes, "{name}: codes");
        if config.sym {
            let midpoint = config.max_code().div_ceil(2);
            for g in 0..bare.groups {
                assert!(
                    (0..bare.out_features).all(|n| bare.zero(g, n) == midpoint),
                    "{name}"
                );
            }
        }
        assert_bit_exact(&bare.dequantize(), &matrix(&file, "base.W_deq"), name);
        check_forward(&bare, &file, name);
    }
    assert!(
        cases.len() >= 16,
        "expected both shapes of all eight GPTQ variants"
    );
}

#[test]
fn golden_eetq_layers_decode_and_encode_exactly() {
    let cases = golden_cases("oft_eetq");
    for case in &cases {
        let name = case_str(case, "name");
        let file = case_tensors(case);
        let w = EetqWeight::from_tensors(&file, "base.", EetqLayout::Cutlass).unwrap();
        let loaded = EetqWeight::load(&checkpoint_dir(case), case_str(case, "module")).unwrap();
        assert_eq!(loaded, w, "{name}: checkpoint vs tensors");

        let unprocessed = file
            .get("base.weight_unprocessed")
            .unwrap()
            .to_i8()
            .unwrap();
        assert_eq!(w.codes, unprocessed, "{name}: decoded codes");
        let stored = file.get("base.weight").unwrap().to_i8().unwrap();
        assert_eq!(
            w.encode_layout(EetqLayout::Cutlass).unwrap(),
            stored,
            "{name}"
        );
        assert_bit_exact(&w.dequantize(), &matrix(&file, "base.W_deq"), name);
        check_forward(&w, &file, name);

        let mut plain = TensorFile::default();
        let mut t = file.get("base.weight_unprocessed").unwrap().clone();
        t.name = "base.weight".to_string();
        plain.insert(t);
        plain.insert(file.get("base.weight_scales").unwrap().clone());
        let from_plain = EetqWeight::from_tensors(&plain, "base.", EetqLayout::Plain).unwrap();
        assert_eq!(from_plain.codes, w.codes, "{name}: plain layout");

        check_requantize(&w, name);
    }
}

/// Quantizing the dequantized weight again gives back codes and scale exactly in every channel
/// whose absolute maximum was a negative extreme (code -128, dequantized to exactly -128·s, so
/// amax/128 is s again), and in all-zero channels. A channel whose maximum was positive saturated
/// at 127 and dequantizes to about 127·s, which rescales the channel by 127/128: those codes
/// differ, but stay within the error bound of a fresh quantization.
fn check_requantize(w: &EetqWeight, name: &str) {
    let deq = w.dequantize();
    let again = EetqWeight::quantize(&deq).unwrap();
    let deq_again = again.dequantize();
    let n_out = w.out_features;
    let mut exact_channels = 0;
    for n in 0..n_out {
        let column = |e: &EetqWeight| -> Vec<i8> {
            e.codes.iter().skip(n).step_by(n_out).copied().collect()
        };
        let codes = column(w);
        if codes.contains(&-128) || w.scales[n] == 0.0 {
            assert_eq!(column(&again), codes, "{name}: channel {n}");
            assert_eq!(again.scales[n], w.scales[n], "{name}: channel {n}");
            exact_channels += 1;
        }
        let codes_again = column(&again);
        for (k, (a, b)) in deq_again.row(n).iter().zip(deq.row(n)).enumerate() {
            let bound = eetq_error_bound(codes_again[k], again.scales[n], *a);
            assert!((a - b).abs() <= bound, "{name}: channel {n}: {a} vs {b}");
        }
    }
    assert!(exact_channels > 0, "{name}: no channel reached -128");
}

// ---------------------------------------------------------------------------------------------
// Random round trips

/// Most that rounding `v` to f16 changes it: half an ulp, subnormals included.
fn f16_rounding(v: f32) -> f32 {
    (v.abs() / 2048.0).max(2f32.powi(-25))
}

/// How far EETQ's dequantized `deq` (code `q`, stored scale `s`) may be from the weight it came
/// from: half a step, or a whole step for a code of 127, where the positive maximum (128 steps)
/// saturates; plus the f16 rounding of the scale (times up to 128 steps) and of the product.
fn eetq_error_bound(q: i8, s: f32, deq: f32) -> f32 {
    let steps = if q == i8::MAX { 1.0 } else { 0.5 };
    steps * s + 129.0 * f16_rounding(s) + f16_rounding(deq)
}

fn seeded_rng(test: &str) -> StdRng {
    let seed: u64 = rand::rng().random();
    println!("{test}: seed {seed}");
    StdRng::seed_from_u64(seed)
}

/// Non-zero values of mixed magnitude, each output row with its own scale.
fn random_weight(rng: &mut StdRng, rows: usize, cols: usize) -> Matrix {
    let mut data = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        let row_scale = 10f32.powf(rng.random_range(-3.0..1.0));
        for _ in 0..cols {
            let mut v = 0.0;
            while v == 0.0 {
                v = rng.random_range(-1.0f32..1.0) * row_scale;
            }
            data.push(v);
        }
    }
    Matrix::new(rows, cols, data).unwrap()
}

/// act-order's g_idx: groups of consecutive positions in a random order of the inputs.
fn shuffled_g_idx(rng: &mut StdRng, in_features: usize, group_len: usize) -> Vec<u32> {
    let mut order: Vec<usize> = (0..in_features).collect();
    order.shuffle(rng);
    let mut g_idx = vec![0u32; in_features];
    for (position, k) in order.into_iter().enumerate() {
        g_idx[k] = (position / group_len) as u32;
    }
    g_idx
}

/// Field `index` of a bit stream read one bit at a time (independent of the crate's reader).
fn stream_field(words: &[u32], first: usize, stride: usize, index: usize, bits: u32) -> u32 {
    (0..bits).fold(0, |acc, b| {
        let bit = index * bits as usize + b as usize;
        let word = words[first + (bit / 32) * stride];
        acc | (((word >> (bit % 32)) & 1) << b)
    })
}

fn all_configs() -> Vec<GptqConfig> {
    let mut configs = Vec::new();
    for bits in [2, 3, 4, 8] {
        for group_size in [Some(32), Some(64), Some(128), None] {
            for zeros in [GptqZeros::V1, GptqZeros::V2] {
                for sym in [true, false] {
                    for desc_act in [false, true] {
                        configs.push(GptqConfig {
                            bits,
                            group_size,
                            sym,
                            desc_act,
                            zeros,
                        });
                    }
                }
            }
        }
    }
    configs
}

/// The shapes tried: K = 200 leaves a short last group for every group size and is not a whole
/// number of words for any width; N = 40 pads every qzeros row.
const SHAPES: [(usize, usize); 2] = [(40, 200), (64, 192)];

fn random_layer(
    rng: &mut StdRng,
    config: GptqConfig,
    (n_out, k_in): (usize, usize),
) -> (Matrix, GptqWeight) {
    let w = random_weight(rng, n_out, k_in);
    let g_idx = config
        .desc_act
        .then(|| shuffled_g_idx(rng, k_in, config.group_len(k_in)));
    let q = GptqWeight::quantize_rtn(&w, config, g_idx).unwrap();
    (w, q)
}

/// Whether group `g` of output row `n` has a negative member.
fn group_has_negative(w: &Matrix, g_idx: &[u32], n: usize, g: u32) -> bool {
    w.row(n)
        .iter()
        .zip(g_idx)
        .any(|(v, gi)| *gi == g && *v < 0.0)
}

#[test]
fn gptq_rtn_dequantizes_within_half_a_step() {
    let mut rng = seeded_rng("gptq_rtn_dequantizes_within_half_a_step");
    for config in all_configs() {
        for shape in SHAPES {
            let (w, q) = random_layer(&mut rng, config, shape);
            let deq = q.dequantize();
            let max_code = config.max_code();
            for n in 0..q.out_features {
                for k in 0..q.in_features {
                    let g = q.g_idx[k];
                    let s = q.scales[g as usize * q.out_features + n];
                    let (a, b) = (deq.at(n, k), w.at(n, k));
                    // find_params keeps a symmetric range at [0, max] when nothing is negative,
                    // while the zero stays at the midpoint: values above (max_code - zero) steps
                    // clip to the top code. That is AutoGPTQ's behaviour, not a packing error.
                    let top = (max_code - q.zero(g as usize, n)) as f32 * s;
                    let target = match config.sym && !group_has_negative(&w, &q.g_idx, n, g) {
                        true => b.min(top),
                        false => b,
                    };
                    // Half a step, plus what rounding the scale to f16 moves the clamped extremes
                    // (the code range was fitted with the f32 scale) and the f16 rounding of the
                    // product.
                    let bound = 0.5 * s + max_code as f32 * f16_rounding(s) + f16_rounding(a);
                    assert!(
                        (a - target).abs() <= bound,
                        "{config:?} {shape:?}: w[{n}][{k}] = {b} dequantized to {a} (step {s})"
                    );
                }
            }
        }
    }
}

#[test]
fn gptq_packing_round_trips_exactly() {
    let mut rng = seeded_rng("gptq_packing_round_trips_exactly");
    for config in all_configs() {
        for shape in SHAPES {
            let (w, q) = random_layer(&mut rng, config, shape);
            let (n_out, k_in) = shape;
            let bits = config.bits;
            let max_code = config.max_code();
            assert_eq!(q.qweight_rows(), (k_in * bits as usize).div_ceil(32));
            assert_eq!(q.qzeros_cols(), (n_out * bits as usize).div_ceil(32));
            assert_eq!(q.groups, k_in.div_ceil(config.group_len(k_in)));
            for n in 0..n_out {
                for k in 0..k_in {
                    let g = q.g_idx[k] as usize;
                    let (s, z) = (q.scales[g * n_out + n], q.zero(g, n));
                    let want =
                        ((w.at(n, k) / s).round_ties_even() + z as f32).clamp(0.0, max_code as f32);
                    assert_eq!(q.code(k, n), want as u32, "{config:?}: code ({k}, {n})");
                    assert_eq!(stream_field(&q.qweight, n, n_out, k, bits), q.code(k, n));
                }
            }
            let cols = q.qzeros_cols();
            for g in 0..q.groups {
                for n in 0..n_out {
                    let z = q.zero(g, n);
                    if config.sym {
                        assert_eq!(z, max_code.div_ceil(2));
                    }
                    let stored = match config.zeros {
                        GptqZeros::V1 => z.wrapping_sub(1) & max_code,
                        GptqZeros::V2 => z,
                    };
                    assert_eq!(
                        stream_field(&q.qzeros, g * cols, 1, n, bits),
                        stored,
                        "{config:?}"
                    );
                }
                // Padding fields past out_features stay zero.
                let padding = cols * 32 / bits as usize;
                for n in n_out..padding {
                    assert_eq!(stream_field(&q.qzeros, g * cols, 1, n, bits), 0);
                }
            }
        }
    }
}

#[test]
fn gptq_v1_and_v2_differ_only_in_qzeros() {
    let mut rng = seeded_rng("gptq_v1_and_v2_differ_only_in_qzeros");
    for config in all_configs()
        .into_iter()
        .filter(|c| c.zeros == GptqZeros::V1)
    {
        let w = random_weight(&mut rng, 40, 200);
        let v1 = GptqWeight::quantize_rtn(&w, config, None).unwrap();
        let v2 = GptqWeight::quantize_rtn(
            &w,
            GptqConfig {
                zeros: GptqZeros::V2,
                ..config
            },
            None,
        )
        .unwrap();
        assert_eq!(v1.qweight, v2.qweight);
        assert_eq!(v1.scales, v2.scales);
        assert_eq!(v1.dequantize(), v2.dequantize());
        assert_ne!(v1.qzeros, v2.qzeros);
    }
}

#[test]
fn gptq_symmetric_v1_zero_words_are_the_known_constants() {
    let mut rng = seeded_rng("gptq_symmetric_v1_zero_words_are_the_known_constants");
    let expected: [(u32, &[u32]); 4] = [
        (2, &[0x5555_5555]),
        (3, &[0xDB6D_B6DB, 0xB6DB_6DB6, 0x6DB6_DB6D]),
        (4, &[0x7777_7777]),
        (8, &[0x7F7F_7F7F]),
    ];
    for (bits, pattern) in expected {
        let config = GptqConfig {
            bits,
            group_size: Some(64),
            sym: true,
            desc_act: false,
            zeros: GptqZeros::V1,
        };
        let q = GptqWeight::quantize_rtn(&random_weight(&mut rng, 96, 128), config, None).unwrap();
        let want: Vec<u32> = pattern
            .iter()
            .copied()
            .cycle()
            .take(q.qzeros.len())
            .collect();
        assert_eq!(q.qzeros, want, "{bits} bits");
    }
}

fn words(name: &str, shape: &[usize], words: &[u32]) -> HostTensor {
    let bytes = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    HostTensor::from_raw(name, Dtype::I32, shape, bytes)
}

/// The tensors a checkpoint would hold for `q`, under `prefix`.
fn gptq_file(q: &GptqWeight, prefix: &str) -> TensorFile {
    let mut file = TensorFile::default();
    let n = q.out_features;
    file.insert(words(
        &format!("{prefix}qweight"),
        &[q.qweight_rows(), n],
        &q.qweight,
    ));
    file.insert(words(
        &format!("{prefix}qzeros"),
        &[q.groups, q.qzeros_cols()],
        &q.qzeros,
    ));
    file.insert(HostTensor::from_f16(
        &format!("{prefix}scales"),
        &[q.groups, n],
        &q.scales,
    ));
    file.insert(words(&format!("{prefix}g_idx"), &[q.in_features], &q.g_idx));
    if let Some(b) = &q.bias {
        file.insert(HostTensor::from_f32(&format!("{prefix}bias"), &[n], b));
    }
    file
}

#[test]
fn gptq_tensors_round_trip_through_a_file() {
    let mut rng = seeded_rng("gptq_tensors_round_trip_through_a_file");
    for config in all_configs() {
        for shape in SHAPES {
            let (_, mut q) = random_layer(&mut rng, config, shape);
            q.bias = Some((0..shape.0).map(|i| i as f32 * 0.25 - 3.0).collect());
            let mut file = gptq_file(&q, "layer.");
            assert_eq!(
                GptqWeight::from_tensors(&file, "layer.", config).unwrap(),
                q
            );
            let bytes = file.to_bytes().unwrap();
            let reread = TensorFile::from_bytes(&bytes, "memory").unwrap();
            assert_eq!(
                GptqWeight::from_tensors(&reread, "layer.", config).unwrap(),
                q
            );
            if !config.desc_act {
                // Without g_idx the groups are k / group_size, as written.
                file.tensors.remove("layer.g_idx");
                let (n_out, k_in) = shape;
                let back =
                    GptqWeight::from_tensors_with_shape(&file, "layer.", config, k_in, n_out)
                        .unwrap();
                assert_eq!(back, q);
            }
        }
    }
}

#[test]
fn gptq_in_features_without_g_idx_come_from_whole_words() {
    let mut rng = seeded_rng("gptq_in_features_without_g_idx_come_from_whole_words");
    for config in all_configs().into_iter().filter(|c| !c.desc_act) {
        let (_, q) = random_layer(&mut rng, config, (64, 192));
        let mut file = gptq_file(&q, "");
        file.tensors.remove("g_idx");
        assert_eq!(GptqWeight::from_tensors(&file, "", config).unwrap(), q);
    }
}

#[test]
fn gptq_load_reads_either_config_file() {
    let dir = std::env::temp_dir().join(format!("quantadapt-gptq-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = seeded_rng("gptq_load_reads_either_config_file");
    let config = GptqConfig {
        zeros: GptqZeros::V2,
        ..gptq4()
    };
    let (_, q) = random_layer(&mut rng, config, (40, 200));
    gptq_file(&q, "model.layers.3.mlp.up_proj.")
        .save(dir.join("model.safetensors"))
        .unwrap();
    let load = || GptqWeight::load(&dir, "model.layers.3.mlp.up_proj");

    assert_mentions(
        &load().unwrap_err().to_string(),
        &["neither quantize_config.json nor config.json"],
    );
    let model_config = r#"{"quantization_config": {"bits": 4, "group_size": 64, "sym": false,
        "desc_act": false, "checkpoint_format": "gptq_v2", "quant_method": "gptq"}}"#;
    std::fs::write(dir.join("config.json"), model_config).unwrap();
    assert_eq!(load().unwrap(), q);
    // quantize_config.json comes first; without checkpoint_format it means v1 zeros.
    let quantize_config = r#"{"bits": 4, "group_size": 64, "sym": false, "desc_act": false}"#;
    std::fs::write(dir.join("quantize_config.json"), quantize_config).unwrap();
    assert_eq!(load().unwrap().config.zeros, GptqZeros::V1);
    std::fs::write(
        dir.join("quantize_config.json"),
        r#"{"bits": 4, "checkpoint_format": "marlin"}"#,
    )
    .unwrap();
    assert_mentions(
        &load().unwrap_err().to_string(),
        &["quantize_config.json", "Marlin"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Malformed input: an error naming the tensor, never a panic

fn gptq4() -> GptqConfig {
    GptqConfig {
        bits: 4,
        group_size: Some(64),
        sym: false,
        desc_act: false,
        zeros: GptqZeros::V1,
    }
}

/// A valid 4-bit layer file, `[out 40, in 200]` under prefix `layer.`, with its config.
fn valid_gptq_file() -> (TensorFile, GptqConfig) {
    let mut rng = seeded_rng("valid_gptq_file");
    let (_, q) = random_layer(&mut rng, gptq4(), (40, 200));
    (gptq_file(&q, "layer."), gptq4())
}

fn gptq_error(file: &TensorFile, config: GptqConfig) -> String {
    GptqWeight::from_tensors(file, "layer.", config)
        .unwrap_err()
        .to_string()
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "`{message}` does not mention `{part}`"
        );
    }
}

#[test]
fn gptq_rejects_wrong_dtypes() {
    let (mut file, config) = valid_gptq_file();
    let qweight = file.get("layer.qweight").unwrap().clone();
    let mut as_float = qweight.clone();
    as_float.dtype = Dtype::F32;
    file.insert(as_float);
    assert_mentions(&gptq_error(&file, config), &["layer.qweight", "dtype"]);
    file.insert(qweight);

    let scales = file.get("layer.scales").unwrap().clone();
    let values = scales.to_f32().unwrap();
    file.insert(HostTensor::from_f32("layer.scales", &scales.shape, &values));
    assert_mentions(&gptq_error(&file, config), &["layer.scales", "F16"]);
    file.insert(scales);

    let g_idx = file.get("layer.g_idx").unwrap().clone();
    let as_float = HostTensor::from_f32("layer.g_idx", &[200], &[0.0; 200]);
    file.insert(as_float);
    assert_mentions(&gptq_error(&file, config), &["layer.g_idx", "dtype"]);
    file.insert(g_idx);
    assert!(GptqWeight::from_tensors(&file, "layer.", config).is_ok());
}

#[test]
fn gptq_rejects_wrong_shapes() {
    let (file, config) = valid_gptq_file();
    let replace = |t: HostTensor| {
        let mut f = file.clone();
        f.insert(t);
        gptq_error(&f, config)
    };
    // qzeros: a column too many, a group too few.
    assert_mentions(
        &replace(words("layer.qzeros", &[4, 6], &[0; 24])),
        &["layer.qzeros", "[4, 5]"],
    );
    assert_mentions(
        &replace(words("layer.qzeros", &[3, 5], &[0; 15])),
        &["layer.qzeros", "4 rows"],
    );
    // scales: wrong width, wrong group count, wrong rank.
    let s = |shape: &[usize]| {
        HostTensor::from_f16("layer.scales", shape, &vec![0.01; shape.iter().product()])
    };
    assert_mentions(&replace(s(&[4, 41])), &["layer.scales", "[4, 40]"]);
    assert_mentions(&replace(s(&[2, 40])), &["layer.scales", "4 rows"]);
    assert_mentions(&replace(s(&[160])), &["layer.scales", "2-D"]);
    // g_idx: a wrong length decides in_features, which qweight then contradicts.
    assert_mentions(
        &replace(words("layer.g_idx", &[192], &[0; 192])),
        &["layer.qweight", "layer.g_idx"],
    );
    assert_mentions(
        &replace(words("layer.g_idx", &[200, 1], &[0; 200])),
        &["layer.g_idx"],
    );
    // bias
    assert_mentions(
        &replace(HostTensor::from_f32("layer.bias", &[41], &[0.0; 41])),
        &["layer.bias"],
    );
    // qweight of another rank
    assert_mentions(
        &replace(words("layer.qweight", &[1000], &[0; 1000])),
        &["layer.qweight", "2-D"],
    );

    // With the shape given, the g_idx length itself is the error.
    let mut f = file.clone();
    f.insert(words("layer.g_idx", &[192], &[0; 192]));
    let e = GptqWeight::from_tensors_with_shape(&f, "layer.", config, 200, 40).unwrap_err();
    assert_mentions(&e.to_string(), &["layer.g_idx", "[200]"]);
    let e = GptqWeight::from_tensors_with_shape(&file, "layer.", config, 200, 41).unwrap_err();
    assert_mentions(&e.to_string(), &["layer.qweight", "41"]);
}

#[test]
fn gptq_rejects_out_of_range_group_indices() {
    let (mut file, config) = valid_gptq_file();
    let mut g_idx: Vec<u32> = (0..200).map(|k| k / 64).collect();
    g_idx[5] = 4;
    file.insert(words("layer.g_idx", &[200], &g_idx));
    assert_mentions(
        &gptq_error(&file, config),
        &["layer.g_idx", "input 5", "4 groups"],
    );
    g_idx[5] = u32::MAX; // -1 as int32
    file.insert(words("layer.g_idx", &[200], &g_idx));
    assert_mentions(
        &gptq_error(&file, config),
        &["layer.g_idx", "input 5", "-1"],
    );
}

#[test]
fn gptq_rejects_non_finite_scales_and_missing_tensors() {
    let (mut file, config) = valid_gptq_file();
    let mut values = file.get("layer.scales").unwrap().to_f32().unwrap();
    values[7] = f32::NAN;
    file.insert(HostTensor::from_f16("layer.scales", &[4, 40], &values));
    assert_mentions(
        &gptq_error(&file, config),
        &["layer.scales", "non-finite", "index 7"],
    );

    let (mut file, config) = valid_gptq_file();
    file.tensors.remove("layer.qzeros");
    assert_mentions(&gptq_error(&file, config), &["missing", "layer.qzeros"]);
}

#[test]
fn gptq_rejects_unsupported_configs() {
    let (file, config) = valid_gptq_file();
    for bits in [0, 1, 5, 6, 16] {
        let e = gptq_error(&file, GptqConfig { bits, ..config });
        assert_mentions(&e, &[&format!("bits {bits}")]);
    }
    let e = gptq_error(
        &file,
        GptqConfig {
            group_size: Some(0),
            ..config
        },
    );
    assert_mentions(&e, &["group_size 0"]);
    let w = Matrix::zeros(4, 64);
    assert!(GptqWeight::quantize_rtn(&w, GptqConfig { bits: 6, ..config }, None).is_err());
}

#[test]
fn gptq_rejects_truncated_and_ambiguous_qweight() {
    let (mut file, config) = valid_gptq_file();
    // AutoGPTQ sizes qweight K / 32 * bits = 24 rows for K = 200, losing inputs 192..200.
    file.insert(words("layer.qweight", &[24, 40], &[0; 960]));
    assert_mentions(
        &gptq_error(&file, config),
        &["layer.qweight", "truncation", "192..200"],
    );

    // 3-bit, K = 200: 19 words per column, which no whole number of inputs fills.
    let config3 = GptqConfig { bits: 3, ..config };
    let mut rng = seeded_rng("gptq_rejects_truncated_and_ambiguous_qweight");
    let (_, q) = random_layer(&mut rng, config3, (40, 200));
    let mut file = gptq_file(&q, "layer.");
    file.tensors.remove("layer.g_idx");
    assert_mentions(
        &gptq_error(&file, config3),
        &["layer.qweight", "from_tensors_with_shape"],
    );
    let back = GptqWeight::from_tensors_with_shape(&file, "layer.", config3, 200, 40).unwrap();
    assert_eq!(back, q);

    // act-order without g_idx cannot be decoded.
    let e = GptqWeight::from_tensors_with_shape(
        &file,
        "layer.",
        GptqConfig {
            desc_act: true,
            ..config3
        },
        200,
        40,
    )
    .unwrap_err();
    assert_mentions(&e.to_string(), &["layer.g_idx", "desc_act"]);
}

#[test]
fn gptq_rtn_rejects_bad_weights_and_g_idx() {
    let mut w = Matrix::zeros(4, 64);
    w.data[9] = f32::NAN;
    let e = GptqWeight::quantize_rtn(&w, gptq4(), None)
        .unwrap_err()
        .to_string();
    assert_mentions(&e, &["weight", "non-finite"]);
    let w = Matrix::zeros(4, 64);
    let e = GptqWeight::quantize_rtn(&w, gptq4(), Some(vec![0; 63]))
        .unwrap_err()
        .to_string();
    assert_mentions(&e, &["g_idx", "[64]"]);
    let e = GptqWeight::quantize_rtn(&w, gptq4(), Some(vec![1; 64]))
        .unwrap_err()
        .to_string();
    assert_mentions(&e, &["g_idx", "1 groups"]);
}

/// A valid EETQ layer `[in 128, out 64]` under `layer.` in the CUTLASS layout.
fn valid_eetq_file() -> TensorFile {
    let mut rng = seeded_rng("valid_eetq_file");
    let w = EetqWeight::quantize(&random_weight(&mut rng, 64, 128)).unwrap();
    let stored = w.encode_layout(EetqLayout::Cutlass).unwrap();
    let mut file = TensorFile::default();
    let bytes = stored.iter().map(|v| *v as u8).collect();
    file.insert(HostTensor::from_raw(
        "layer.weight",
        Dtype::I8,
        &[128, 64],
        bytes,
    ));
    file.insert(HostTensor::from_f16(
        "layer.weight_scales",
        &[64],
        &w.scales,
    ));
    file.insert(HostTensor::from_f32("layer.bias", &[64], &[0.5; 64]));
    file
}

fn eetq_error(file: &TensorFile, layout: EetqLayout) -> String {
    EetqWeight::from_tensors(file, "layer.", layout)
        .unwrap_err()
        .to_string()
}

#[test]
fn eetq_rejects_malformed_tensors() {
    let file = valid_eetq_file();
    assert!(EetqWeight::from_tensors(&file, "layer.", EetqLayout::Cutlass).is_ok());
    let replace = |t: HostTensor| {
        let mut f = file.clone();
        f.insert(t);
        eetq_error(&f, EetqLayout::Cutlass)
    };
    let scales = |shape: &[usize], v: f32| {
        HostTensor::from_f16(
            "layer.weight_scales",
            shape,
            &vec![v; shape.iter().product()],
        )
    };
    assert_mentions(
        &replace(scales(&[63], 0.1)),
        &["layer.weight_scales", "[64]"],
    );
    assert_mentions(
        &replace(scales(&[1, 64], 0.1)),
        &["layer.weight_scales", "[64]"],
    );
    assert_mentions(
        &replace(scales(&[64], f32::INFINITY)),
        &["layer.weight_scales", "non-finite"],
    );
    let f32_scales = HostTensor::from_f32("layer.weight_scales", &[64], &[0.1; 64]);
    assert_mentions(&replace(f32_scales), &["layer.weight_scales", "F16"]);
    let as_i32 = words("layer.weight", &[128, 64], &[0; 128 * 64]);
    assert_mentions(&replace(as_i32), &["layer.weight", "I8"]);
    let flat = HostTensor::from_raw("layer.weight", Dtype::I8, &[128 * 64], vec![0; 128 * 64]);
    assert_mentions(&replace(flat), &["layer.weight", "[in, out]"]);
    assert_mentions(
        &replace(HostTensor::from_f32("layer.bias", &[65], &[0.0; 65])),
        &["layer.bias"],
    );

    let mut missing = file.clone();
    missing.tensors.remove("layer.weight_scales");
    assert_mentions(
        &eetq_error(&missing, EetqLayout::Cutlass),
        &["missing", "layer.weight_scales"],
    );
}

#[test]
fn eetq_cutlass_layout_needs_whole_tiles() {
    // K must be a multiple of 64 and N even; the plain layout takes any shape.
    for (k_in, n_out) in [(96, 64), (32, 64), (128, 63)] {
        let mut file = TensorFile::default();
        let bytes = vec![0u8; k_in * n_out];
        file.insert(HostTensor::from_raw(
            "layer.weight",
            Dtype::I8,
            &[k_in, n_out],
            bytes,
        ));
        file.insert(HostTensor::from_f16(
            "layer.weight_scales",
            &[n_out],
            &vec![0.1; n_out],
        ));
        let e = eetq_error(&file, EetqLayout::Cutlass);
        assert_mentions(
            &e,
            &[
                "layer.weight",
                "multiple of 64",
                &format!("[{k_in}, {n_out}]"),
            ],
        );
        assert!(EetqWeight::from_tensors(&file, "layer.", EetqLayout::Plain).is_ok());
        let w = EetqWeight::from_tensors(&file, "layer.", EetqLayout::Plain).unwrap();
        assert!(w.encode_layout(EetqLayout::Cutlass).is_err());
    }
    let mut file = TensorFile::default();
    file.insert(HostTensor::from_raw(
        "layer.weight",
        Dtype::I8,
        &[3, 5],
        vec![0; 15],
    ));
    file.insert(HostTensor::from_f16("layer.weight_scales", &[5], &[0.1; 5]));
    assert_mentions(
        &eetq_error(&file, EetqLayout::RowMajorOffsetSwizzled),
        &["layer.weight", "sm70"],
    );
}

#[test]
fn eetq_quantize_rejects_non_finite_weights_and_keeps_zero_channels() {
    let mut w = Matrix::zeros(3, 64);
    w.data[70] = f32::INFINITY;
    let e = EetqWeight::quantize(&w).unwrap_err().to_string();
    assert_mentions(&e, &["weight", "non-finite", "index 70"]);

    let mut w = Matrix::zeros(3, 64);
    w.row_mut(1)
        .iter_mut()
        .enumerate()
        .for_each(|(k, v)| *v = k as f32 - 32.0);
    let q = EetqWeight::quantize(&w).unwrap();
    assert_eq!(q.scales, vec![0.0, 0.25, 0.0]);
    let channel = |n: usize| -> Vec<i8> { q.codes.iter().skip(n).step_by(3).copied().collect() };
    assert_eq!(channel(0), vec![127; 64]);
    assert_eq!(
        channel(1),
        (0..64).map(|k| (k * 4 - 128) as i8).collect::<Vec<_>>()
    );
    assert!(q.dequantize().row(0).iter().all(|v| *v == 0.0));
    assert_eq!(q.dequantize(), w);
}

#[test]
fn eetq_random_layers_round_trip_every_layout() {
    let mut rng = seeded_rng("eetq_random_layers_round_trip_every_layout");
    for (n_out, k_in) in [(64, 128), (96, 192), (160, 320)] {
        let w = random_weight(&mut rng, n_out, k_in);
        let q = EetqWeight::quantize(&w).unwrap();
        let deq = q.dequantize();
        for n in 0..n_out {
            for (k, (a, b)) in deq.row(n).iter().zip(w.row(n)).enumerate() {
                let bound = eetq_error_bound(q.codes[k * n_out + n], q.scales[n], *a);
                assert!(
                    (a - b).abs() <= bound,
                    "channel {n}: {b} dequantized to {a}"
                );
            }
        }
        for layout in [
            EetqLayout::Cutlass,
            EetqLayout::RowMajorOffsetSwizzled,
            EetqLayout::Plain,
        ] {
            let stored = q.encode_layout(layout).unwrap();
            let mut file = TensorFile::default();
            let bytes = stored.iter().map(|v| *v as u8).collect();
            file.insert(HostTensor::from_raw(
                "w.weight",
                Dtype::I8,
                &[k_in, n_out],
                bytes,
            ));
            file.insert(HostTensor::from_f16("w.weight_scales", &[n_out], &q.scales));
            let back = EetqWeight::from_tensors(&file, "w.", layout).unwrap();
            assert_eq!(back, q, "{layout:?}");
        }
    }
}

#[test]
fn eetq_load_checks_the_config() {
    let dir = std::env::temp_dir().join(format!("quantadapt-eetq-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    valid_eetq_file()
        .save(dir.join("model.safetensors"))
        .unwrap();
    let write = |text: &str| std::fs::write(dir.join("config.json"), text).unwrap();

    write(r#"{"quantization_config": {"quant_method": "gptq", "bits": 4}}"#);
    let e = EetqWeight::load(&dir, "layer").unwrap_err().to_string();
    assert_mentions(&e, &["config.json", "quant_method", "gptq"]);
    write(r#"{"architectures": []}"#);
    let e = EetqWeight::load(&dir, "layer").unwrap_err().to_string();
    assert_mentions(&e, &["config.json", "quantization_config"]);
    write(r#"{"quantization_config": {"quant_method": "eetq", "weights": "int8"}}"#);
    assert!(EetqWeight::load(&dir, "layer").is_ok());
    assert!(EetqWeight::load(&dir, "layer.").is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}
