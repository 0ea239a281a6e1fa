//! `cargo bench --bench cpu_forward -- [--threads T] [--runs R] DIR...`: times the fast CPU
//! forward (`QuantWeight::forward_fast`) and the f64 reference (`forward_cpu`) of the quantized
//! layer in each `DIR/model.safetensors`, on every input `x_m<M>` of `DIR/io.safetensors`, and
//! checks the fast output against `y_m<M>` when the file holds it. One JSON object per line:
//! `{"dir", "out", "in", "m", "threads", "fast_ms", "reference_ms", "max_rel_error"}` (medians
//! after a warm-up). `benches/cpu_vs_peft.py` writes the directories (HQQ's own layer and outputs)
//! and runs this next to HQQ on torch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use quantadapt::Error;
use quantadapt::formats::{QuantFormat, QuantWeight};
use quantadapt::io::TensorFile;
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
        return Err(Error::shape(name, "[rows, in]", &t.shape));
    };
    Matrix::new(rows, cols, t.to_f32()?)
}

fn run_dir(dir: &Path, threads: usize, runs: usize) -> quantadapt::Result<()> {
    let w = QuantWeight::load_file(&dir.join("model.safetensors"), None, None)?;
    let io = TensorFile::open(dir.join("io.safetensors"))?;
    let mut rows: Vec<usize> = io
        .tensors
        .keys()
        .filter_map(|k| k.strip_prefix("x_m")?.parse().ok())
        .collect();
    rows.sort_unstable();
    for m in rows {
        let x = tensor(&io, &format!("x_m{m}"))?;
        let fast = w.forward_fast(&x)?;
        let error = match io.contains(&format!("y_m{m}")) {
            true => max_rel_error(&fast.data, &tensor(&io, &format!("y_m{m}"))?.data),
            false => f64::NAN,
        };
        let fast_ms = median_ms(runs, || w.forward_fast(&x));
        // The f64 reference takes seconds at 4096 x 4096: three runs are enough to see it.
        let reference_ms = median_ms(runs.min(3), || w.forward_cpu(&x));
        println!(
            "{}",
            serde_json::json!({
                "dir": dir.display().to_string(),
                "out": w.out_features(),
                "in": w.in_features(),
                "m": m,
                "threads": threads,
                "fast_ms": fast_ms,
                "reference_ms": reference_ms,
                "max_rel_error": error,
            })
        );
    }
    Ok(())
}

fn main() -> quantadapt::Result<()> {
    let (mut threads, mut runs, mut dirs) = (2, 10, Vec::new());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> quantadapt::Result<usize> {
            let v = args.next().unwrap_or_default();
            v.parse()
                .map_err(|_| Error::config(format!("{name} takes a number, got `{v}`")))
        };
        match arg.as_str() {
            "--threads" => threads = value("--threads")?,
            "--runs" => runs = value("--runs")?,
            "--bench" => {}
            other => dirs.push(PathBuf::from(other)),
        }
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| Error::config(format!("thread pool: {e}")))?;
    for dir in &dirs {
        run_dir(dir, threads, runs)?;
    }
    Ok(())
}
