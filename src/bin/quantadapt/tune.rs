//! `quantadapt tune`: fills the tuning cache for this adapter, and the loading of that cache
//! by every command that uses a GPU.

use std::path::PathBuf;

use quantadapt::bench::{BASE_FORMATS, BaseFormat};
use quantadapt::checkpoint::Checkpoint;
use quantadapt::formats::{QuantFormat, QuantWeight};
use quantadapt::gpu::{ActDtype, GpuContext};
use quantadapt::kernels::gemv::{GemvVariant, Reduction};
use quantadapt::kernels::quant::GpuQuantWeight;
use quantadapt::tensor::Matrix;
use quantadapt::tune::{TuneCache, tune_gemv};
use quantadapt::{Error, Result};

/// What `quantadapt tune` was asked for.
pub struct TuneArgs {
    pub cache: Option<PathBuf>,
    pub model: Option<PathBuf>,
    pub shapes: Vec<(usize, usize)>,
    pub rows: Vec<usize>,
    pub formats: Vec<BaseFormat>,
    pub acts: Vec<ActDtype>,
}

/// Shapes tuned when none are given: 8B-class layers on a real GPU, the bench's small scale
/// (every dimension / 16) on a software adapter.
fn default_shapes(ctx: &GpuContext) -> Vec<(usize, usize)> {
    if ctx.is_software() {
        vec![(256, 256), (896, 256), (256, 896)]
    } else {
        vec![(4096, 4096), (14336, 4096), (4096, 14336)]
    }
}

/// Rows of x tuned when none are given: decode, a few beams, the GEMV's largest batch.
const DEFAULT_ROWS: [usize; 3] = [1, 4, 16];
/// Copies of each weight rotate until they hold this many bytes, so a timed run does not read
/// a weight the previous run left in the last-level cache.
const ROTATE_BYTES: usize = 256 << 20;
const MAX_COPIES: usize = 16;

/// The cache file a command uses: the one given, else [`TuneCache::default_path`].
fn cache_path(given: Option<PathBuf>) -> Result<PathBuf> {
    given.or_else(TuneCache::default_path).ok_or_else(|| {
        Error::Config(format!(
            "no tuning cache path: pass --cache, or set {} or HOME",
            quantadapt::tune::CACHE_ENV
        ))
    })
}

/// A GPU context with the tuning cache at `TuneCache::default_path` loaded, if there is one:
/// what every command that runs kernels starts from. A cache that cannot be read is reported
/// and ignored (the kernels' defaults are always correct).
pub fn gpu_context() -> Result<GpuContext> {
    let ctx = GpuContext::new()?;
    if let Some(path) = TuneCache::default_path() {
        match TuneCache::load_or_empty(&path) {
            Ok(cache) => {
                if cache.entries_for(&ctx) > 0 {
                    eprintln!(
                        "tuning: {} ({} entries for this adapter)",
                        path.display(),
                        cache.entries_for(&ctx)
                    );
                }
                ctx.set_tuning(cache);
            }
            Err(e) => eprintln!("note: ignoring the tuning cache: {e}"),
        }
    }
    Ok(ctx)
}

fn describe(v: GemvVariant) -> String {
    let reduction = match v.reduction {
        Reduction::Workgroup => "workgroup",
        Reduction::Subgroup => "subgroup",
    };
    format!(
        "wg {} rows {} split-k {} {reduction}",
        v.workgroup_size, v.rows_per_workgroup, v.split_k
    )
}

pub fn tune(args: TuneArgs) -> Result<()> {
    let path = cache_path(args.cache)?;
    let mut cache = TuneCache::load_or_empty(&path)?;
    let ctx = GpuContext::new()?;
    println!("device: {}", ctx.describe());
    println!("cache: {}", path.display());
    let shapes = if args.shapes.is_empty() {
        default_shapes(&ctx)
    } else {
        args.shapes
    };
    let rows = if args.rows.is_empty() {
        DEFAULT_ROWS.to_vec()
    } else {
        args.rows
    };
    let formats = if args.formats.is_empty() {
        BASE_FORMATS.to_vec()
    } else {
        args.formats
    };
    let acts: Vec<ActDtype> = if args.acts.is_empty() {
        vec![ActDtype::F32]
    } else {
        args.acts
    };
    if acts.contains(&ActDtype::F16) && !ctx.has_f16() {
        return Err(Error::Unsupported(format!(
            "f16 activations need SHADER_F16, which {} lacks",
            ctx.info.name
        )));
    }
    let weights = match &args.model {
        Some(dir) => model_weights(dir)?,
        None => synthetic_weights(&shapes, &formats)?,
    };
    for (name, reference) in weights {
        let copies = if ctx.is_software() {
            1
        } else {
            ROTATE_BYTES
                .div_ceil(reference.packed_bytes().max(1))
                .clamp(1, MAX_COPIES)
        };
        let uploads = (0..copies)
            .map(|_| GpuQuantWeight::upload(&ctx, &reference))
            .collect::<Result<Vec<_>>>()?;
        let (out, inp) = (reference.out_features(), reference.in_features());
        for &act in &acts {
            for &m in &rows {
                let report = tune_gemv(&ctx, &uploads, &reference, m, act, &mut cache)?;
                let default_us = report.micros(report.default);
                let winner_us = report.micros(report.winner).unwrap_or(f64::NAN);
                let failed = report
                    .candidates
                    .iter()
                    .filter(|c| c.micros.is_none())
                    .count();
                let versus = match default_us {
                    Some(us) => format!("{:.2}x over the default", us / winner_us),
                    None => "the default failed its check".to_string(),
                };
                println!(
                    "{name} {out}x{inp} M={m} {}: {} at {winner_us:.1} us ({versus}; {} candidates, {failed} failed the check)",
                    act.wgsl(),
                    describe(report.winner),
                    report.candidates.len(),
                );
                for c in report.candidates.iter().filter(|c| c.micros.is_none()) {
                    println!(
                        "  refused {}: error {:.2e} against the CPU",
                        describe(c.variant),
                        c.max_rel_error
                    );
                }
            }
        }
        cache.save(&path)?;
    }
    println!(
        "wrote {} ({} entries for this adapter)",
        path.display(),
        cache.entries_for(&ctx)
    );
    Ok(())
}

/// Random weights of every format at every shape, named as the bench names them.
fn synthetic_weights(
    shapes: &[(usize, usize)],
    formats: &[BaseFormat],
) -> Result<Vec<(String, QuantWeight)>> {
    let mut weights = Vec::new();
    for &(out, inp) in shapes {
        let dense = Matrix::random(out, inp, 0.05);
        for &format in formats {
            weights.push((format.name().to_string(), format.quantize(&dense)?));
        }
    }
    Ok(weights)
}

/// One module of each distinct kind (format, bits, group, shape) of a checkpoint: the kernels
/// a forward of that model plans.
fn model_weights(dir: &std::path::Path) -> Result<Vec<(String, QuantWeight)>> {
    let checkpoint = Checkpoint::open(dir)?;
    let mut seen = std::collections::HashSet::new();
    let mut weights = Vec::new();
    for module in checkpoint.modules() {
        let kind = (
            module.format,
            module.bits,
            module.group_size,
            module.out_features,
            module.in_features,
        );
        if seen.insert(kind) {
            weights.push((module.name.clone(), checkpoint.load_module(&module.name)?));
        }
    }
    if weights.is_empty() {
        return Err(Error::Config(format!(
            "{} holds no quantized module to tune",
            dir.display()
        )));
    }
    Ok(weights)
}
