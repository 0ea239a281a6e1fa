//! `cargo bench --bench cpu_forward -- [--threads T] [--runs R] DIR...`: times the fast CPU
//! forward (`QuantWeight::forward_fast`) and the f64 reference (`forward_cpu`) of the quantized
//! layer in each `DIR/model.safetensors`, on every input `x_m<M>` of `DIR/io.safetensors`, and
//! checks the fast output against `y_m<M>` when the file holds it. `--synthetic N,... --rows
//! M,...` times layers of its own making instead (HQQ 4-bit, GPTQ 4-bit, EETQ int8). Whole CPU
//! layers (`QuantLinear::forward`) with an OFT (b = 32) or a LoRA (r = 16) adapter are timed too.
//! One JSON object per line: `{"layer", "out", "in", "m", "threads", "fast_ms", "oft_layer_ms",
//! "lora_layer_ms", "reference_ms", "max_rel_error"}` (medians after a warm-up). `benches/cpu_vs_peft.py` writes the directories
//! (HQQ's own layer and outputs) and runs this next to HQQ on torch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use quantadapt::Error;
use quantadapt::adapters::Adapter;
use quantadapt::adapters::lora::LoraAdapter;
use quantadapt::adapters::oft::{OftAdapter, Parameterization};
use quantadapt::formats::eetq::EetqWeight;
use quantadapt::formats::gptq::{GptqConfig, GptqWeight, GptqZeros};
use quantadapt::formats::hqq::{HqqConfig, HqqWeight};
use quantadapt::formats::{QuantFormat, QuantWeight};
use quantadapt::io::TensorFile;
use quantadapt::layer::{Backend, QuantLinear};
use quantadapt::tensor::{Matrix, max_rel_error};

/// Median wall time of `runs` calls after one warm-up, in ms.
fn median_ms(runs: usize, mut f: impl FnMut() -> quantadapt::Result<Matrix>) -> f64 {
    f().expect("warm-up forward");
    let mut times: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f().expect("forward"));
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn tensor(file: &TensorFile, name: &str) -> quantadapt::Result<Matrix> {
    let t = file.get(name)?;
    let [rows, cols] = t.shape[..] else {
        return Err(Error::Config(format!(
            "{name} is {:?}, not [rows, in]",
            t.shape
        )));
    };
    Matrix::new(rows, cols, t.to_f32()?)
}

/// An input and, when known, the output the layer should give.
struct Case {
    m: usize,
    x: Matrix,
    y: Option<Matrix>,
}

fn load_dir(dir: &Path) -> quantadapt::Result<(QuantWeight, Vec<Case>)> {
    let w = QuantWeight::load_file(&dir.join("model.safetensors"), None, None)?;
    let io = TensorFile::open(dir.join("io.safetensors"))?;
    let mut rows: Vec<usize> = io
        .tensors
        .keys()
        .filter_map(|k| k.strip_prefix("x_m")?.parse().ok())
        .collect();
    rows.sort_unstable();
    let cases = rows
        .into_iter()
        .map(|m| {
            let y = match io.contains(&format!("y_m{m}")) {
                true => Some(tensor(&io, &format!("y_m{m}"))?),
                false => None,
            };
            let x = tensor(&io, &format!("x_m{m}"))?;
            Ok(Case { m, x, y })
        })
        .collect::<quantadapt::Result<_>>()?;
    Ok((w, cases))
}

/// Layers of `n x n` in each format: HQQ 4-bit (group 64, axis 1, f32), GPTQ 4-bit (group
/// 128, v1 zeros) and EETQ int8, each with random inputs of `rows` rows.
fn synthetic(
    n: usize,
    rows: &[usize],
) -> quantadapt::Result<Vec<(String, QuantWeight, Vec<Case>)>> {
    let dense = Matrix::random(n, n, 0.05);
    let mut hqq = HqqConfig::new(4, 64, 1);
    hqq.optimize = false;
    let gptq = GptqConfig {
        bits: 4,
        group_size: Some(128),
        sym: false,
        desc_act: false,
        zeros: GptqZeros::V1,
    };
    let layers = [
        (
            "hqq 4-bit g64",
            QuantWeight::Hqq(HqqWeight::quantize(&dense, None, &hqq)?),
        ),
        (
            "gptq 4-bit g128",
            QuantWeight::Gptq(GptqWeight::quantize_rtn(&dense, gptq, None)?),
        ),
        (
            "eetq int8",
            QuantWeight::Eetq(EetqWeight::quantize(&dense)?),
        ),
    ];
    Ok(layers
        .into_iter()
        .map(|(name, w)| {
            let cases = rows
                .iter()
                .map(|m| Case {
                    m: *m,
                    x: Matrix::random(*m, n, 1.0),
                    y: None,
                })
                .collect();
            (format!("synthetic {name} {n}x{n}"), w, cases)
        })
        .collect())
}

fn run_layer(
    label: &str,
    w: &QuantWeight,
    cases: &[Case],
    threads: usize,
    runs: usize,
) -> quantadapt::Result<()> {
    let cpu_layer = |adapter: Adapter| -> quantadapt::Result<QuantLinear> {
        let name = adapter.name().to_string();
        let mut layer = QuantLinear::new(w.clone(), Backend::Cpu)?;
        layer.add_adapter(adapter)?;
        layer.set_active(&[&name])?;
        Ok(layer)
    };
    let (out, inp) = (w.out_features(), w.in_features());
    let oft_params = Matrix::random(inp / 32, 32 * 31 / 2, 0.01);
    let oft = cpu_layer(Adapter::Oft(OftAdapter::from_params(
        "oft",
        inp,
        oft_params,
        Parameterization::Cayley,
        None,
        false,
    )?))?;
    let (a, b) = (Matrix::random(16, inp, 0.05), Matrix::random(out, 16, 0.05));
    let lora = LoraAdapter::from_matrices("lora", inp, out, a, b, 2.0, None)?;
    let lora = cpu_layer(Adapter::Lora(lora))?;
    for Case { m, x, y } in cases {
        let fast = w.forward_fast(x)?;
        let error = y
            .as_ref()
            .map_or(f64::NAN, |y| max_rel_error(&fast.data, &y.data));
        let fast_ms = median_ms(runs, || w.forward_fast(x));
        let oft_ms = median_ms(runs, || oft.forward(x));
        let lora_ms = median_ms(runs, || lora.forward(x));
        // The f64 reference takes seconds at 4096 x 4096: three runs are enough to see it.
        let reference_ms = median_ms(runs.min(3), || w.forward_cpu(x));
        println!(
            "{}",
            serde_json::json!({
                "layer": label,
                "out": w.out_features(),
                "in": w.in_features(),
                "m": m,
                "threads": threads,
                "fast_ms": fast_ms,
                "oft_layer_ms": oft_ms,
                "lora_layer_ms": lora_ms,
                "reference_ms": reference_ms,
                "max_rel_error": error,
            })
        );
    }
    Ok(())
}

/// `"2048,4096"` to numbers.
fn numbers(name: &str, text: &str) -> quantadapt::Result<Vec<usize>> {
    text.split(',')
        .map(|v| {
            v.trim()
                .parse()
                .map_err(|_| Error::Config(format!("{name} takes numbers, got `{text}`")))
        })
        .collect()
}

fn main() -> quantadapt::Result<()> {
    let (mut threads, mut runs, mut dirs) = (2, 10, Vec::new());
    let (mut sizes, mut rows) = (Vec::new(), vec![1, 16]);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> quantadapt::Result<usize> {
            let v = args.next().unwrap_or_default();
            v.parse()
                .map_err(|_| Error::Config(format!("{name} takes a number, got `{v}`")))
        };
        match arg.as_str() {
            "--threads" => threads = value("--threads")?,
            "--runs" => runs = value("--runs")?,
            "--synthetic" => sizes = numbers(&arg, &args.next().unwrap_or_default())?,
            "--rows" => rows = numbers(&arg, &args.next().unwrap_or_default())?,
            "--bench" => {}
            other => dirs.push(PathBuf::from(other)),
        }
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| Error::Config(format!("thread pool: {e}")))?;
    for dir in &dirs {
        let (w, cases) = load_dir(dir)?;
        run_layer(&dir.display().to_string(), &w, &cases, threads, runs)?;
    }
    for n in sizes {
        for (label, w, cases) in synthetic(n, &rows)? {
            run_layer(&label, &w, &cases, threads, runs)?;
        }
    }
    Ok(())
}
