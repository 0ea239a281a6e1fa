//! The adapters' CPU reference against PEFT's golden vectors, random algebraic checks, and bad input.

use std::path::{Path, PathBuf};

use quantadapt::Error;
use quantadapt::adapters::lora::{LoraAdapter, LoraConfig, lora_scaling};
use quantadapt::adapters::oft::{OftAdapter, OftConfig, Parameterization, adjust};
use quantadapt::adapters::peft_dir::PeftAdapterDir;
use quantadapt::io::{HostTensor, TensorFile};
use quantadapt::tensor::{Matrix, max_rel_error};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const TOL: f64 = 1e-5;

// ---------------------------------------------------------------------------------------------
// Golden data

fn golden_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden")
}

fn golden_cases(kinds: &[&str]) -> Vec<Value> {
    let text = std::fs::read_to_string(golden_root().join("manifest.json")).unwrap();
    let manifest: Value = serde_json::from_str(&text).unwrap();
    manifest["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| kinds.contains(&c["kind"].as_str().unwrap()))
        .cloned()
        .collect()
}

struct Golden {
    name: String,
    dir: PathBuf,
    tensors: TensorFile,
}

impl Golden {
    fn load(case: &Value) -> Self {
        let name = case["name"].as_str().unwrap().to_string();
        let dir = golden_root().join(&name);
        let tensors = TensorFile::open(dir.join("tensors.safetensors")).unwrap();
        Self { name, dir, tensors }
    }

    fn vector(&self, name: &str) -> Vec<f32> {
        self.tensors.get(name).unwrap().to_f32().unwrap()
    }

    fn matrix(&self, name: &str) -> Matrix {
        let t = self.tensors.get(name).unwrap();
        assert_eq!(t.shape.len(), 2, "{}: {name} is not a matrix", self.name);
        Matrix::new(t.shape[0], t.shape[1], t.to_f32().unwrap()).unwrap()
    }

    fn adapter_dir(&self, sub: &str) -> PeftAdapterDir {
        PeftAdapterDir::open(self.dir.join("adapter").join(sub)).unwrap()
    }

    fn assert_close(&self, what: &str, ours: &[f32], reference: &str) {
        let err = max_rel_error(ours, &self.vector(reference));
        assert!(
            err < TOL,
            "{}: {what} vs `{reference}`: rel err {err:e}",
            self.name
        );
    }
}

fn base_forward(x: &Matrix, w: &Matrix, bias: &[f32]) -> Matrix {
    let mut y = x.matmul_t(w).unwrap();
    y.add_row_vector(bias);
    y
}

// ---------------------------------------------------------------------------------------------
// OFT against PEFT

#[test]
fn oft_golden_cases_match_peft() {
    let cases = golden_cases(&["oft_hqq", "oft_gptq", "oft_eetq"]);
    assert!(!cases.is_empty());
    let mut visited = 0;
    for case in &cases {
        let g = Golden::load(case);
        let x = g.matrix("x");
        let w = g.matrix("base.W_deq");
        let bias = g.vector("base.bias");
        let dir = g.adapter_dir("");
        let oft = OftAdapter::from_peft_dir("default", &dir, None, x.cols).unwrap();

        let cfg = &case["oft"];
        assert_eq!(oft.block_share(), cfg["block_share"].as_bool().unwrap());
        let neumann = cfg["use_cayley_neumann"].as_bool().unwrap();
        assert_eq!(
            matches!(oft.parameterization(), Parameterization::Neumann { .. }),
            neumann,
            "{}",
            g.name
        );

        g.assert_close("full_rotation()", &oft.full_rotation().data, "R");
        if g.tensors.contains("oft_R_weight_after_coft") {
            g.assert_close("params()", oft.params(), "oft_R_weight_after_coft");
        }
        let y = base_forward(&oft.rotate_cpu(&x).unwrap(), &w, &bias);
        g.assert_close("rotate_cpu(x)·Wᵀ + b", &y.data, "y");
        g.assert_close("x·Wᵀ + b", &base_forward(&x, &w, &bias).data, "y_disabled");
        visited += 1;
    }
    assert_eq!(visited, cases.len());
}

#[test]
fn oft_golden_blocks_flat_and_inverse_agree_with_full_rotation() {
    for case in golden_cases(&["oft_hqq"]) {
        let g = Golden::load(&case);
        let in_features = g.matrix("x").cols;
        let oft =
            OftAdapter::from_peft_dir("default", &g.adapter_dir(""), None, in_features).unwrap();
        let b = oft.block_size();
        let flat = oft.blocks_flat();
        assert_eq!(flat.len(), oft.param_rows() * b * b);
        let full = oft.full_rotation();
        for blk in 0..oft.n_blocks() {
            let src = if oft.block_share() { 0 } else { blk };
            for k in 0..b {
                for c in 0..b {
                    assert_eq!(
                        full.at(blk * b + k, blk * b + c),
                        flat[(src * b + k) * b + c]
                    );
                }
            }
        }
        for (r, inv) in oft
            .rotation_blocks()
            .iter()
            .zip(oft.inverse_blocks().unwrap())
        {
            assert_identity(&r.matmul(&inv).unwrap(), 1e-5, &g.name);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// LoRA / rsLoRA / DoRA against PEFT

#[test]
fn lora_golden_cases_match_peft() {
    let cases = golden_cases(&["lora_hqq"]);
    assert!(!cases.is_empty());
    let mut visited = 0;
    for case in &cases {
        let g = Golden::load(case);
        let x = g.matrix("x");
        let w = g.matrix("base.W_deq");
        let bias = g.vector("base.bias");
        let base = base_forward(&x, &w, &bias);
        let (out, inp) = (w.rows, w.cols);

        let load = |name: &str, cfg: &Value| {
            let lora =
                LoraAdapter::from_peft_dir(name, &g.adapter_dir(name), None, inp, out).unwrap();
            let r = cfg["r"].as_u64().unwrap() as usize;
            let alpha = cfg["lora_alpha"].as_f64().unwrap();
            let rslora = cfg.get("use_rslora").and_then(Value::as_bool) == Some(true);
            assert_eq!(lora.rank(), r);
            assert_eq!(lora.scaling(), lora_scaling(alpha, r, rslora));
            assert_eq!(
                lora.is_dora(),
                cfg.get("use_dora").and_then(Value::as_bool) == Some(true)
            );
            lora
        };
        let a = load("a", &case["lora_a"]);
        let b = load("b", &case["lora_b"]);

        for (lora, reference) in [(&a, "y_a"), (&b, "y_b")] {
            let mut y = base.clone();
            lora.apply_cpu(&x, &mut y, Some(&bias), &w).unwrap();
            g.assert_close(lora.name(), &y.data, reference);
        }
        if g.tensors.contains("y_mixed") {
            let names = case["mixed_adapter_names"].as_array().unwrap();
            let mut y = Matrix::zeros(x.rows, out);
            for (i, name) in names.iter().enumerate() {
                let xi = Matrix::new(1, inp, x.row(i).to_vec()).unwrap();
                let mut yi = Matrix::new(1, out, base.row(i).to_vec()).unwrap();
                match name.as_str().unwrap() {
                    "__base__" => {}
                    "a" => a.apply_cpu(&xi, &mut yi, Some(&bias), &w).unwrap(),
                    "b" => b.apply_cpu(&xi, &mut yi, Some(&bias), &w).unwrap(),
                    other => panic!("{}: unexpected adapter {other}", g.name),
                }
                y.row_mut(i).copy_from_slice(&yi.data);
            }
            g.assert_close("mixed batch", &y.data, "y_mixed");
        } else {
            assert!(a.is_dora(), "{}: only DoRA cases lack y_mixed", g.name);
        }
        g.assert_close("x·Wᵀ + b", &base.data, "y_disabled");
        visited += 1;
    }
    assert_eq!(visited, cases.len());
}

#[test]
fn lora_golden_shrink_expand_equals_delta_weight() {
    let case = &golden_cases(&["lora_hqq"])[0];
    let g = Golden::load(case);
    let x = g.matrix("x");
    let w = g.matrix("base.W_deq");
    let lora = LoraAdapter::from_peft_dir("a", &g.adapter_dir("a"), None, w.cols, w.rows).unwrap();
    let mut via_factors = Matrix::zeros(x.rows, w.rows);
    let h = lora.shrink_cpu(&x).unwrap();
    lora.expand_add_cpu(&h, lora.scaling(), &mut via_factors)
        .unwrap();
    let via_delta = x.matmul_t(&lora.delta_weight()).unwrap();
    assert!(max_rel_error(&via_factors.data, &via_delta.data) < TOL);
}

// ---------------------------------------------------------------------------------------------
// Random algebraic checks

fn random_matrix(rng: &mut StdRng, rows: usize, cols: usize, scale: f32) -> Matrix {
    let data = (0..rows * cols)
        .map(|_| rng.random_range(-scale..scale))
        .collect();
    Matrix::new(rows, cols, data).unwrap()
}

fn assert_identity(m: &Matrix, tol: f64, what: &str) {
    for i in 0..m.rows {
        for j in 0..m.cols {
            let expected = eye(i, j);
            let err = (m.at(i, j) as f64 - expected).abs();
            assert!(
                err <= tol,
                "{what}: entry ({i},{j}) off identity by {err:e}"
            );
        }
    }
}

/// A square f64 matrix for the checks that need more precision than the crate's f32 `Matrix`.
#[derive(Clone)]
struct Square {
    n: usize,
    data: Vec<f64>,
}

impl Square {
    fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.n + j]
    }

    fn mul(&self, other: &Square) -> Square {
        let n = self.n;
        let data = (0..n * n)
            .map(|ij| {
                (0..n)
                    .map(|k| self.at(ij / n, k) * other.at(k, ij % n))
                    .sum()
            })
            .collect();
        Square { n, data }
    }
}

/// The skew generator of one parameter row, in `triu_indices(b, b, 1)` order.
fn skew(row: &[f32], b: usize) -> Square {
    let mut data = vec![0.0; b * b];
    let mut values = row.iter();
    for i in 0..b {
        for j in i + 1..b {
            let v = *values.next().unwrap() as f64;
            data[i * b + j] = v;
            data[j * b + i] = -v;
        }
    }
    Square { n: b, data }
}

fn eye(i: usize, j: usize) -> f64 {
    if i == j { 1.0 } else { 0.0 }
}

/// The rotation of a one-block adapter whose parameter row is `params`.
fn single_block(params: &Matrix, p: Parameterization) -> Matrix {
    let b = (1..).find(|b| b * (b - 1) / 2 == params.cols).unwrap();
    let oft = OftAdapter::from_params("rand", b, params.clone(), p, None, false).unwrap();
    oft.rotation_blocks()[0].clone()
}

#[test]
fn exact_cayley_is_orthogonal() {
    let mut rng = StdRng::seed_from_u64(7);
    for b in [2usize, 8, 16, 32, 64, 128] {
        let params = random_matrix(&mut rng, 1, b * (b - 1) / 2, 1.0);
        let r = single_block(&params, Parameterization::Cayley);
        assert_identity(
            &r.transpose().matmul(&r).unwrap(),
            1e-5,
            &format!("RᵀR, b = {b}"),
        );
        assert_identity(
            &r.matmul(&r.transpose()).unwrap(),
            1e-5,
            &format!("RRᵀ, b = {b}"),
        );
    }
}

#[test]
fn exact_cayley_is_i_minus_q_times_inverse_of_i_plus_q() {
    let mut rng = StdRng::seed_from_u64(8);
    let b = 6;
    let params = random_matrix(&mut rng, 1, b * (b - 1) / 2, 0.5);
    let r = single_block(&params, Parameterization::Cayley);
    let q = skew(params.row(0), b);
    // R·(I + Q) must equal I − Q.
    for i in 0..b {
        for j in 0..b {
            let lhs: f64 = (0..b)
                .map(|k| r.at(i, k) as f64 * (eye(k, j) + q.at(k, j)))
                .sum();
            let rhs = eye(i, j) - q.at(i, j);
            assert!((lhs - rhs).abs() < 1e-6, "({i},{j}): {lhs} vs {rhs}");
        }
    }
}

#[test]
fn neumann_matches_its_closed_form() {
    let mut rng = StdRng::seed_from_u64(9);
    for b in [3usize, 5, 8] {
        let params = random_matrix(&mut rng, 1, b * (b - 1) / 2, 0.15);
        let q = skew(params.row(0), b);
        let exact = single_block(&params, Parameterization::Cayley);
        for terms in [3usize, 4, 5, 7, 9] {
            let p = (terms - 1).max(3);
            let mut q_p = q.clone();
            for _ in 1..p {
                q_p = q_p.mul(&q);
            }
            let r_n = single_block(&params, Parameterization::Neumann { terms });
            // R_N = R_exactᵀ · (I − Q^p)
            for i in 0..b {
                for j in 0..b {
                    let closed: f64 = (0..b)
                        .map(|k| {
                            let i_minus = eye(k, j) - q_p.at(k, j);
                            exact.at(k, i) as f64 * i_minus
                        })
                        .sum();
                    let err = (r_n.at(i, j) as f64 - closed).abs();
                    assert!(err < 1e-6, "b {b}, terms {terms}, ({i},{j}): {err:e}");
                }
            }
        }
        assert_identity(
            &single_block(&params, Parameterization::Neumann { terms: 1 }),
            0.0,
            "one term",
        );
        let two = single_block(&params, Parameterization::Neumann { terms: 2 });
        for i in 0..b {
            for j in 0..b {
                let expected = eye(i, j) + 2.0 * q.at(i, j);
                assert!((two.at(i, j) as f64 - expected).abs() < 1e-7);
            }
        }
        let three = single_block(&params, Parameterization::Neumann { terms: 3 });
        let four = single_block(&params, Parameterization::Neumann { terms: 4 });
        assert_eq!(three, four, "n = 3 and n = 4 are the same series");
    }
}

#[test]
fn neumann_inverse_is_the_true_inverse() {
    let mut rng = StdRng::seed_from_u64(10);
    let b = 8;
    let params = random_matrix(&mut rng, 2, b * (b - 1) / 2, 0.2);
    let oft = OftAdapter::from_params(
        "n",
        2 * b,
        params,
        Parameterization::Neumann { terms: 3 },
        None,
        false,
    )
    .unwrap();
    for (r, inv) in oft
        .rotation_blocks()
        .iter()
        .zip(oft.inverse_blocks().unwrap())
    {
        assert_identity(&r.matmul(&inv).unwrap(), 1e-5, "R·R⁻¹");
        let rt = r.matmul(&r.transpose()).unwrap();
        let off = (0..b)
            .map(|i| (rt.at(i, i) - 1.0).abs())
            .fold(0.0, f32::max);
        assert!(
            off > 1e-6,
            "a 3-term Neumann block should not be orthogonal"
        );
    }
}

#[test]
fn coft_projects_onto_the_eps_ball() {
    let mut rng = StdRng::seed_from_u64(11);
    let (b, rows, eps) = (8usize, 4usize, 1e-2f32);
    let len = b * (b - 1) / 2;
    let mut params = random_matrix(&mut rng, rows, len, 1.0);
    // Row 3 starts inside the ball and must stay untouched.
    params.row_mut(3).iter_mut().for_each(|v| *v *= 1e-5);
    let inside = params.row(3).to_vec();
    let oft = OftAdapter::from_params(
        "c",
        rows * b,
        params,
        Parameterization::Cayley,
        Some(eps),
        false,
    )
    .unwrap();
    let radius = eps as f64 / (rows as f64).sqrt();
    for (i, row) in oft.params().chunks(len).enumerate() {
        let norm = (2.0 * row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>()).sqrt();
        if i == 3 {
            assert_eq!(row, inside.as_slice());
        } else {
            assert!(
                (norm - radius).abs() / radius < 1e-6,
                "row {i}: {norm} vs {radius}"
            );
        }
    }
    // Under block_share the divisor is √1.
    let shared = random_matrix(&mut rng, 1, len, 1.0);
    let oft = OftAdapter::from_params(
        "s",
        4 * b,
        shared,
        Parameterization::Cayley,
        Some(eps),
        true,
    )
    .unwrap();
    let norm = (2.0
        * oft
            .params()
            .iter()
            .map(|v| (*v as f64).powi(2))
            .sum::<f64>())
    .sqrt();
    assert!((norm - eps as f64).abs() / (eps as f64) < 1e-6);
    assert_eq!(oft.rotation_blocks().len(), 1);
    assert_eq!(oft.n_blocks(), 4);
}

#[test]
fn golden_coft_norms_equal_eps_over_sqrt_rows() {
    let mut visited = 0;
    for case in golden_cases(&["oft_hqq"]) {
        if case["oft"]["coft"].as_bool() != Some(true) {
            continue;
        }
        let g = Golden::load(&case);
        let eps = case["oft"]["eps"].as_f64().unwrap();
        let t = g.tensors.get("oft_R_weight_after_coft").unwrap();
        let (rows, len) = (t.shape[0], t.shape[1]);
        let radius = eps / (rows as f64).sqrt();
        let oft =
            OftAdapter::from_peft_dir("default", &g.adapter_dir(""), None, g.matrix("x").cols)
                .unwrap();
        for row in oft.params().chunks(len) {
            let norm = (2.0 * row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>()).sqrt();
            assert!((norm - radius).abs() / radius < 1e-6, "{}", g.name);
        }
        visited += 1;
    }
    assert!(visited > 0);
}

#[test]
fn adjust_matches_peft_test_vectors() {
    for (n, p, expected) in [
        (96, 64, 48),
        (96, 5, 4),
        (96, 7, 6),
        (128, 24, 16),
        (4096, 100, 128),
        (4096, 48, 32),
        (11008, 100, 86),
        (10, 20, 10),
    ] {
        assert_eq!(adjust(n, p), expected, "adjust({n}, {p})");
    }
    assert_eq!(adjust(96, 32), 32);
    assert_eq!(adjust(0, 0), 0);
    assert_eq!(adjust(12, 0), 1);
}

#[test]
fn oft_config_resolves_blocks_like_peft() {
    let cfg = |r: usize, b: usize| {
        OftConfig::from_json(&json!({"peft_type": "OFT", "r": r, "oft_block_size": b})).unwrap()
    };
    assert_eq!(cfg(0, 32).blocks_for(128).unwrap(), (4, 32));
    assert_eq!(cfg(0, 64).blocks_for(96).unwrap(), (2, 48));
    assert_eq!(cfg(5, 0).blocks_for(96).unwrap(), (4, 24));
    assert_eq!(cfg(0, 200).blocks_for(96).unwrap(), (1, 96));
    let defaults = cfg(0, 32);
    assert_eq!(
        defaults.parameterization(),
        Parameterization::Neumann { terms: 5 }
    );
    assert_eq!(defaults.coft_eps(), None);
    assert_eq!(defaults.eps, 6e-5);
}

#[test]
fn block_size_one_is_a_zero_size_identity() {
    let params = Matrix::new(6, 0, vec![]).unwrap();
    let oft = OftAdapter::from_params(
        "unit",
        6,
        params,
        Parameterization::Cayley,
        Some(1e-3),
        false,
    )
    .unwrap();
    assert_eq!(oft.block_size(), 1);
    assert_identity(&oft.full_rotation(), 0.0, "b = 1");
    let x = Matrix::new(2, 6, (0..12).map(|v| v as f32).collect()).unwrap();
    assert_eq!(oft.rotate_cpu(&x).unwrap(), x);
}

#[test]
fn rsloras_scaling_and_patterns() {
    let cfg = LoraConfig::from_json(&json!({
        "peft_type": "LORA", "r": 16, "lora_alpha": 8, "use_rslora": true,
        "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"self_attn.q_proj": 32}
    }))
    .unwrap();
    assert_eq!(cfg.rank_and_scaling("model.v_proj").unwrap(), (16, 2.0));
    assert_eq!(
        cfg.rank_and_scaling("model.layers.0.self_attn.q_proj")
            .unwrap(),
        (4, 16.0)
    );
    assert_eq!(cfg.rank_and_scaling("q_proj").unwrap(), (4, 4.0));
    assert_eq!(cfg.rank_and_scaling("model.xq_proj").unwrap(), (16, 2.0));
    assert_eq!(lora_scaling(16.0, 8, false), 2.0);
    assert_eq!(lora_scaling(8.0, 4, true), 4.0);

    // Keys are regexes, matched as `(.*\.)?(KEY)$`; the first matching key in file order wins.
    let regex = json!({"peft_type": "LORA", "r": 8, "rank_pattern": {"layers\\.[0-3]\\.q": 4}});
    let cfg = LoraConfig::from_json(&regex).unwrap();
    assert_eq!(cfg.rank_and_scaling("model.layers.0.q").unwrap(), (4, 2.0));
    assert_eq!(cfg.rank_and_scaling("model.layers.4.q").unwrap(), (8, 1.0));
    for (text, rank) in [
        (
            r#"{"peft_type": "LORA", "r": 8, "rank_pattern": {"q_proj": 4, "attn.q_proj": 2}}"#,
            4,
        ),
        (
            r#"{"peft_type": "LORA", "r": 8, "rank_pattern": {"attn.q_proj": 2, "q_proj": 4}}"#,
            2,
        ),
    ] {
        let cfg = LoraConfig::from_json(&serde_json::from_str(text).unwrap()).unwrap();
        assert_eq!(
            cfg.rank_and_scaling("attn.q_proj").unwrap().0,
            rank,
            "{text}"
        );
    }
}

/// `y = b + (m/n) ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ)`, with `n` the row norms of `W + s·B·A`, all in f64.
fn dora_direct(
    x: &Matrix,
    w: &Matrix,
    bias: &[f32],
    a: &Matrix,
    b: &Matrix,
    s: f64,
    m: &[f32],
) -> Vec<f32> {
    let (out, inp, r) = (w.rows, w.cols, a.rows);
    let ba = |o: usize, i: usize| {
        (0..r)
            .map(|k| b.at(o, k) as f64 * a.at(k, i) as f64)
            .sum::<f64>()
    };
    let norms: Vec<f64> = (0..out)
        .map(|o| {
            (0..inp)
                .map(|i| (w.at(o, i) as f64 + s * ba(o, i)).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let mut y = Vec::with_capacity(x.rows * out);
    for row in 0..x.rows {
        for o in 0..out {
            let lin: f64 = (0..inp)
                .map(|i| x.at(row, i) as f64 * (w.at(o, i) as f64 + s * ba(o, i)))
                .sum();
            y.push((bias[o] as f64 + m[o] as f64 / norms[o] * lin) as f32);
        }
    }
    y
}

#[test]
fn dora_matches_the_direct_formula() {
    let mut rng = StdRng::seed_from_u64(12);
    let (out, inp, batch) = (48, 80, 5);
    for rank in [1usize, 8, 16, 64] {
        let w = random_matrix(&mut rng, out, inp, 0.1);
        let a = random_matrix(&mut rng, rank, inp, 0.2);
        let b = random_matrix(&mut rng, out, rank, 0.2);
        let x = random_matrix(&mut rng, batch, inp, 1.0);
        let bias: Vec<f32> = (0..out).map(|_| rng.random_range(-0.5..0.5)).collect();
        let m: Vec<f32> = (0..out).map(|_| rng.random_range(0.5..1.5)).collect();
        let s = lora_scaling(16.0, rank, rank % 2 == 0);
        let dora =
            LoraAdapter::from_matrices("dora", inp, out, a.clone(), b.clone(), s, Some(m.clone()))
                .unwrap();
        let mut y = base_forward(&x, &w, &bias);
        dora.apply_cpu(&x, &mut y, Some(&bias), &w).unwrap();
        let expected = dora_direct(&x, &w, &bias, &a, &b, s as f64, &m);
        let err = max_rel_error(&y.data, &expected);
        assert!(err < TOL, "rank {rank}: rel err {err:e}");

        // With m = n the rescale is the identity and DoRA reduces to LoRA.
        let norms = dora.dora_norms(&w).unwrap();
        let as_lora = LoraAdapter::from_matrices("lora", inp, out, a, b, s, None).unwrap();
        let unit = LoraAdapter::from_matrices(
            "unit",
            inp,
            out,
            as_lora.a().clone(),
            as_lora.b().clone(),
            s,
            Some(norms),
        )
        .unwrap();
        let (mut y_lora, mut y_unit) = (base_forward(&x, &w, &bias), base_forward(&x, &w, &bias));
        as_lora.apply_cpu(&x, &mut y_lora, Some(&bias), &w).unwrap();
        unit.apply_cpu(&x, &mut y_unit, Some(&bias), &w).unwrap();
        assert!(max_rel_error(&y_unit.data, &y_lora.data) < TOL);
    }
}

// ---------------------------------------------------------------------------------------------
// Bad input: every error names the adapter, nothing panics

/// A scratch adapter directory under the system temp dir, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(label: &str, config: &Value, tensors: &[HostTensor]) -> Self {
        let path = std::env::temp_dir().join(format!(
            "quantadapt-adapters-{}-{label}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("adapter_config.json"), config.to_string()).unwrap();
        let mut file = TensorFile::default();
        tensors.iter().cloned().for_each(|t| file.insert(t));
        file.save(path.join("adapter_model.safetensors")).unwrap();
        Self(path)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tensor(name: &str, shape: &[usize], fill: impl Fn(usize) -> f32) -> HostTensor {
    let n = shape.iter().product();
    HostTensor::from_f32(name, shape, &(0..n).map(fill).collect::<Vec<_>>())
}

fn small(i: usize) -> f32 {
    ((i * 37 % 11) as f32 - 5.0) * 0.01
}

fn assert_names_adapter<T: std::fmt::Debug>(
    result: quantadapt::Result<T>,
    adapter: &str,
    hint: &str,
) {
    let err = result.expect_err("expected an error");
    let text = err.to_string();
    assert!(
        matches!(&err, Error::Adapter { adapter: a, .. } if a == adapter),
        "error does not name adapter `{adapter}`: {text}"
    );
    assert!(text.contains(hint), "error lacks `{hint}`: {text}");
}

fn oft_config(r: usize, b: usize) -> Value {
    json!({"peft_type": "OFT", "r": r, "oft_block_size": b, "use_cayley_neumann": false})
}

fn load_oft(
    label: &str,
    config: &Value,
    tensors: &[HostTensor],
    in_f: usize,
) -> quantadapt::Result<OftAdapter> {
    let scratch = ScratchDir::new(label, config, tensors);
    // A config error surfaces when the folder is read, before the adapter has a name.
    let dir = PeftAdapterDir::open(&scratch.0).map_err(|e| Error::Adapter {
        adapter: label.to_string(),
        reason: e.to_string(),
    })?;
    OftAdapter::from_peft_dir(label, &dir, None, in_f)
}

const OFT_KEY: &str = "base_model.model.proj.oft_R.weight";

#[test]
fn oft_loads_from_a_scratch_dir() {
    let ok = load_oft(
        "ok",
        &oft_config(0, 8),
        &[tensor(OFT_KEY, &[4, 28], small)],
        32,
    )
    .unwrap();
    assert_eq!((ok.n_blocks(), ok.block_size()), (4, 8));
    // Keys without the `base_model.model.` prefix load too.
    let plain = load_oft(
        "plain",
        &oft_config(4, 0),
        &[tensor("proj.oft_R.weight", &[4, 28], small)],
        32,
    )
    .unwrap();
    assert_eq!(plain.params(), ok.params());
}

#[test]
fn oft_bad_configs_are_refused() {
    let t = [tensor(OFT_KEY, &[4, 28], small)];
    assert_names_adapter(
        load_oft("zero", &oft_config(0, 0), &t, 32),
        "zero",
        "exactly one",
    );
    assert_names_adapter(
        load_oft("both", &oft_config(4, 8), &t, 32),
        "both",
        "exactly one",
    );
    let old = json!({"peft_type": "OFT", "r": 4});
    assert_names_adapter(load_oft("old", &old, &t, 32), "old", "oft_block_size");
    let lora = json!({"peft_type": "LORA", "r": 4});
    assert_names_adapter(load_oft("lora", &lora, &t, 32), "lora", "not OFT");
    // Config says blocks of 16 for 32 inputs; the tensor holds blocks of 8.
    assert_names_adapter(
        load_oft("size", &oft_config(0, 16), &t, 32),
        "size",
        "size 8",
    );
    assert_names_adapter(
        load_oft(
            "bias",
            &json!({"peft_type": "OFT", "r": 0, "oft_block_size": 8, "bias": "all"}),
            &t,
            32,
        ),
        "bias",
        "bias",
    );
}

#[test]
fn oft_bad_tensors_are_refused() {
    let cfg = oft_config(0, 8);
    let triangle = [tensor(OFT_KEY, &[4, 27], small)];
    assert_names_adapter(load_oft("tri", &cfg, &triangle, 32), "tri", "b(b-1)/2");
    let rows = [tensor(OFT_KEY, &[3, 28], small)];
    assert_names_adapter(load_oft("rows", &cfg, &rows, 32), "rows", "rows");
    let nan = [tensor(OFT_KEY, &[4, 28], |i| {
        if i == 5 { f32::NAN } else { small(i) }
    })];
    assert_names_adapter(load_oft("nan", &cfg, &nan, 32), "nan", "non-finite");
    let inf = [tensor(OFT_KEY, &[4, 28], |i| {
        if i == 9 { f32::INFINITY } else { 0.0 }
    })];
    assert_names_adapter(load_oft("inf", &cfg, &inf, 32), "inf", "non-finite");
    let old_keys = [
        tensor("base_model.model.proj.oft_r", &[4, 8, 8], small),
        tensor("base_model.model.proj.oft_s", &[4, 1], small),
    ];
    assert_names_adapter(
        load_oft("oftr", &cfg, &old_keys, 32),
        "oftr",
        "before PEFT 0.16",
    );
    let unknown = [
        tensor(OFT_KEY, &[4, 28], small),
        tensor("base_model.model.proj.oft_R.scale", &[4], small),
    ];
    assert_names_adapter(
        load_oft("unk", &cfg, &unknown, 32),
        "unk",
        "unknown key `oft_R.scale`",
    );
    let base_bias = [
        tensor(OFT_KEY, &[4, 28], small),
        tensor("base_model.model.proj.base_layer.bias", &[16], small),
    ];
    assert_names_adapter(
        load_oft("bb", &cfg, &base_bias, 32),
        "bb",
        "base_layer.bias",
    );
    let missing = [tensor(
        "base_model.model.proj.lora_A.weight",
        &[4, 28],
        small,
    )];
    assert_names_adapter(
        load_oft("other", &cfg, &missing, 32),
        "other",
        "unknown key `lora_A.weight`",
    );
    let no_adapter = [tensor("base_model.model.head.weight", &[2, 2], small)];
    assert_names_adapter(
        load_oft("missing", &cfg, &no_adapter, 32),
        "missing",
        "oft_R.weight",
    );
}

#[test]
fn oft_from_params_refuses_bad_shapes_and_values() {
    let params =
        |rows, cols| Matrix::new(rows, cols, (0..rows * cols).map(small).collect()).unwrap();
    let cayley = Parameterization::Cayley;
    assert_names_adapter(
        OftAdapter::from_params("div", 100, params(3, 496), cayley, None, false),
        "div",
        "does not divide",
    );
    assert_names_adapter(
        OftAdapter::from_params("len", 32, params(4, 27), cayley, None, false),
        "len",
        "b(b-1)/2",
    );
    assert_names_adapter(
        OftAdapter::from_params("share", 32, params(4, 28), cayley, None, true),
        "share",
        "rows",
    );
    let mut nan = params(4, 28);
    nan.data[3] = f32::NAN;
    assert_names_adapter(
        OftAdapter::from_params("nan", 32, nan, cayley, None, false),
        "nan",
        "non-finite",
    );
    assert_names_adapter(
        OftAdapter::from_params("eps", 32, params(4, 28), cayley, Some(f32::NAN), false),
        "eps",
        "eps",
    );
    let oft = OftAdapter::from_params("x", 32, params(4, 28), cayley, None, false).unwrap();
    assert_names_adapter(oft.rotate_cpu(&Matrix::zeros(2, 31)), "x", "31");
    // Odd shapes and values anywhere in a grid: errors or adapters, never a panic.
    for rows in 0..4 {
        for cols in [0usize, 1, 2, 3, 6, 7] {
            for in_f in [0usize, 1, 2, 3, 4, 6, 8, 12] {
                for share in [false, true] {
                    for p in [
                        cayley,
                        Parameterization::Neumann { terms: 0 },
                        Parameterization::Neumann { terms: 6 },
                    ] {
                        let m = Matrix::new(
                            rows,
                            cols,
                            (0..rows * cols).map(|i| i as f32 * 1e3).collect(),
                        )
                        .unwrap();
                        let _ = OftAdapter::from_params("grid", in_f, m, p, Some(1e-3), share);
                    }
                }
            }
        }
    }
}

#[test]
fn peft_dir_refuses_pickles_and_points_to_named_adapters() {
    let path = std::env::temp_dir().join(format!("quantadapt-adapters-{}-bin", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).unwrap();
    std::fs::write(
        path.join("adapter_config.json"),
        oft_config(0, 8).to_string(),
    )
    .unwrap();
    std::fs::write(path.join("adapter_model.bin"), b"not a pickle").unwrap();
    let err = PeftAdapterDir::open(&path).unwrap_err();
    std::fs::remove_dir_all(&path).unwrap();
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("safe_serialization"), "{err}");

    let lora_case = &golden_cases(&["lora_hqq"])[0];
    let root = golden_root()
        .join(lora_case["name"].as_str().unwrap())
        .join("adapter");
    let err = PeftAdapterDir::open(&root).unwrap_err().to_string();
    assert!(err.contains("`a`") && err.contains("`b`"), "{err}");
}

#[test]
fn peft_dir_module_lookup() {
    let cfg = oft_config(0, 8);
    let tensors = [
        tensor("base_model.model.layers.0.q.oft_R.weight", &[4, 28], small),
        tensor("layers.1.q.oft_R.weight", &[4, 28], |i| small(i + 1)),
        tensor("base_model.model.head.weight", &[2, 2], small),
    ];
    let scratch = ScratchDir::new("lookup", &cfg, &tensors);
    let dir = PeftAdapterDir::open(&scratch.0).unwrap();
    assert_eq!(dir.modules(), ["layers.0.q", "layers.1.q"]);
    assert_eq!(dir.peft_type(), "OFT");
    assert!(dir.tensor_for(None, "oft_R.weight").is_err());
    let t = dir.tensor_for(Some("layers.1.q"), "oft_R.weight").unwrap();
    assert_eq!(t.name, "layers.1.q.oft_R.weight");
    assert_names_adapter(
        OftAdapter::from_peft_dir("two", &dir, None, 32),
        "two",
        "layers.0.q",
    );
    let one = OftAdapter::from_peft_dir("one", &dir, Some("layers.0.q"), 32).unwrap();
    assert_eq!(one.params()[0], small(0));
    assert_names_adapter(
        OftAdapter::from_peft_dir("none", &dir, Some("layers.2.q"), 32),
        "none",
        "layers.2.q",
    );
}

fn lora_config(extra: Value) -> Value {
    let mut cfg = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": false, "lora_bias": false,
                         "use_qalora": false, "loftq_config": {}, "eva_config": null});
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    cfg
}

const A_KEY: &str = "base_model.model.proj.lora_A.weight";
const B_KEY: &str = "base_model.model.proj.lora_B.weight";
const M_KEY: &str = "base_model.model.proj.lora_magnitude_vector";

fn load_lora(
    label: &str,
    config: &Value,
    tensors: &[HostTensor],
) -> quantadapt::Result<LoraAdapter> {
    let scratch = ScratchDir::new(label, config, tensors);
    // A config error surfaces when the folder is read, before the adapter has a name.
    let dir = PeftAdapterDir::open(&scratch.0).map_err(|e| Error::Adapter {
        adapter: label.to_string(),
        reason: e.to_string(),
    })?;
    LoraAdapter::from_peft_dir(label, &dir, None, 16, 12)
}

#[test]
fn lora_loads_from_a_scratch_dir() {
    let a = tensor(A_KEY, &[4, 16], small);
    let b = tensor(B_KEY, &[12, 4], small);
    let lora = load_lora("ok", &lora_config(json!({})), &[a.clone(), b.clone()]).unwrap();
    assert_eq!(
        (lora.rank(), lora.scaling(), lora.is_dora()),
        (4, 2.0, false)
    );
    // `fan_in_fan_out` is accepted and ignored for Linear layers.
    load_lora(
        "fifo",
        &lora_config(json!({"fan_in_fan_out": true})),
        &[a.clone(), b.clone()],
    )
    .unwrap();
    // The magnitude loads with and without `.weight`.
    for key in [M_KEY.to_string(), format!("{M_KEY}.weight")] {
        let m = tensor(&key, &[12], |_| 1.0);
        let dora = load_lora(
            "dora",
            &lora_config(json!({"use_dora": true})),
            &[a.clone(), b.clone(), m],
        )
        .unwrap();
        assert_eq!(dora.magnitude().unwrap(), &[1.0; 12]);
    }
    let pattern =
        lora_config(json!({"r": 8, "rank_pattern": {"proj": 4}, "alpha_pattern": {"proj": 2}}));
    let patterned = load_lora("pattern", &pattern, &[a, b]).unwrap();
    assert_eq!(patterned.scaling(), 0.5);
}

#[test]
fn lora_bad_inputs_are_refused() {
    let a = tensor(A_KEY, &[4, 16], small);
    let b = tensor(B_KEY, &[12, 4], small);
    let base = lora_config(json!({}));
    let bad_b = tensor(B_KEY, &[12, 5], small);
    assert_names_adapter(
        load_lora("bshape", &base, &[a.clone(), bad_b]),
        "bshape",
        "lora_B.weight",
    );
    let bad_a = tensor(A_KEY, &[4, 15], small);
    assert_names_adapter(
        load_lora("ashape", &base, &[bad_a, b.clone()]),
        "ashape",
        "lora_A.weight",
    );
    assert_names_adapter(
        load_lora(
            "rank",
            &lora_config(json!({"r": 8})),
            &[a.clone(), b.clone()],
        ),
        "rank",
        "r = 8",
    );
    assert_names_adapter(
        load_lora(
            "nodora",
            &lora_config(json!({"use_dora": true})),
            &[a.clone(), b.clone()],
        ),
        "nodora",
        "lora_magnitude_vector",
    );
    let m = tensor(M_KEY, &[12], |_| 1.0);
    assert_names_adapter(
        load_lora("stray", &base, &[a.clone(), b.clone(), m]),
        "stray",
        "use_dora is false",
    );
    let short_m = tensor(M_KEY, &[11], |_| 1.0);
    assert_names_adapter(
        load_lora(
            "mlen",
            &lora_config(json!({"use_dora": true})),
            &[a.clone(), b.clone(), short_m],
        ),
        "mlen",
        "lora_magnitude_vector",
    );
    assert_names_adapter(
        load_lora(
            "lbias",
            &lora_config(json!({"lora_bias": true})),
            &[a.clone(), b.clone()],
        ),
        "lbias",
        "lora_bias",
    );
    let b_bias = tensor("base_model.model.proj.lora_B.bias", &[12], small);
    assert_names_adapter(
        load_lora("bkey", &base, &[a.clone(), b.clone(), b_bias]),
        "bkey",
        "lora_bias",
    );
    assert_names_adapter(
        load_lora(
            "qalora",
            &lora_config(json!({"use_qalora": true})),
            &[a.clone(), b.clone()],
        ),
        "qalora",
        "use_qalora",
    );
    assert_names_adapter(
        load_lora(
            "loftq",
            &lora_config(json!({"loftq_config": {"loftq_bits": 4}})),
            &[a.clone(), b.clone()],
        ),
        "loftq",
        "loftq_config",
    );
    let nan_a = tensor(A_KEY, &[4, 16], |i| if i == 7 { f32::NAN } else { 0.1 });
    assert_names_adapter(
        load_lora("nan", &base, &[nan_a, b.clone()]),
        "nan",
        "non-finite",
    );
    let emb = tensor("base_model.model.proj.lora_embedding_A", &[4, 16], small);
    assert_names_adapter(
        load_lora("emb", &base, &[a.clone(), b.clone(), emb]),
        "emb",
        "embedding",
    );
    let oft = json!({"peft_type": "OFT", "r": 0, "oft_block_size": 8});
    assert_names_adapter(load_lora("oft", &oft, &[a, b]), "oft", "not LORA");
}

#[test]
fn lora_math_refuses_mismatched_operands() {
    let a = Matrix::new(2, 4, (0..8).map(small).collect()).unwrap();
    let b = Matrix::new(3, 2, (0..6).map(small).collect()).unwrap();
    assert_names_adapter(
        LoraAdapter::from_matrices("sw", 4, 3, b.clone(), a.clone(), 1.0, None),
        "sw",
        "lora_A.weight",
    );
    assert_names_adapter(
        LoraAdapter::from_matrices("inf", 4, 3, a.clone(), b.clone(), f32::INFINITY, None),
        "inf",
        "scaling",
    );
    let zero_rank = Matrix::new(0, 4, vec![]).unwrap();
    assert_names_adapter(
        LoraAdapter::from_matrices(
            "r0",
            4,
            3,
            zero_rank,
            Matrix::new(3, 0, vec![]).unwrap(),
            1.0,
            None,
        ),
        "r0",
        "rank",
    );
    let lora = LoraAdapter::from_matrices("ok", 4, 3, a.clone(), b.clone(), 1.0, None).unwrap();
    let w = Matrix::zeros(3, 4);
    assert_names_adapter(lora.shrink_cpu(&Matrix::zeros(1, 5)), "ok", "columns");
    assert_names_adapter(
        lora.apply_cpu(&Matrix::zeros(2, 4), &mut Matrix::zeros(2, 4), None, &w),
        "ok",
        "output",
    );
    let dora =
        LoraAdapter::from_matrices("dz", 4, 3, a, Matrix::zeros(3, 2), 1.0, Some(vec![1.0; 3]))
            .unwrap();
    assert_names_adapter(dora.dora_norms(&Matrix::zeros(4, 3)), "dz", "base weight");
    assert_names_adapter(
        dora.apply_cpu(&Matrix::zeros(1, 4), &mut Matrix::zeros(1, 3), None, &w),
        "dz",
        "norm 0",
    );
    assert_names_adapter(
        dora.apply_cpu(
            &Matrix::zeros(1, 4),
            &mut Matrix::zeros(1, 3),
            Some(&[0.0; 2]),
            &w,
        ),
        "dz",
        "bias",
    );
}
