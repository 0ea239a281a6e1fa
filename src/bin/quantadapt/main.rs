//! The `quantadapt` command: demo, info, verify-golden, inspect, run, merge, bench, tune.

mod tune;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use quantadapt::adapters::Adapter;
use quantadapt::adapters::lora::LoraAdapter;
use quantadapt::adapters::oft::{OftAdapter, Parameterization};
use quantadapt::adapters::peft_dir::PeftAdapterDir;
use quantadapt::bench::{BaseFormat, Plan, Scale, write_svg};
use quantadapt::checkpoint::{Checkpoint, Format, ModuleInfo};
use quantadapt::formats::QuantFormat;
use quantadapt::formats::QuantWeight;
use quantadapt::formats::hqq::{HqqConfig, HqqWeight};
use quantadapt::golden::{self, GoldenBackend};
use quantadapt::gpu::timing::{median, time_pass};
use quantadapt::gpu::{ActDtype, GpuTensor};
use quantadapt::io::{HostTensor, TensorFile};
use quantadapt::kernels::Dispatch;
use quantadapt::kernels::MatmulPath;
use quantadapt::kernels::lora::GpuLora;
use quantadapt::kernels::oft::GpuOft;
use quantadapt::kernels::quant::GpuQuantWeight;
use quantadapt::layer::{Backend as LayerBackend, QuantLinear};
use quantadapt::merge::{MergeEvent, merge_model};
use quantadapt::model::{Activations, Model};
use quantadapt::tensor::{Matrix, max_rel_error};
use quantadapt::{Error, Result};

#[derive(Parser)]
#[command(
    name = "quantadapt",
    version,
    about = "Quantized layers with PEFT adapters on any GPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Build a synthetic 4-bit HQQ layer, run it on the best adapter and check it against the CPU.
    Demo,
    /// Adapters found, the features and limits quantadapt uses.
    Info,
    /// Run every case of DIR/manifest.json; prints `N passed, M failed` last.
    VerifyGolden {
        dir: PathBuf,
        #[arg(long, value_enum, default_value_t = BackendArg::Both)]
        backend: BackendArg,
    },
    /// List a checkpoint's quantized modules (format, bits, group, shape, bytes) and what each
    /// adapter's config says.
    Inspect {
        /// A model folder, a .safetensors file or a model.safetensors.index.json.
        path: PathBuf,
        /// PEFT adapter folders to describe.
        #[arg(long)]
        adapter: Vec<PathBuf>,
    },
    /// Run a real layer on real inputs: safetensors in, safetensors out.
    Run {
        /// The checkpoint: a model folder, a .safetensors file or a model.safetensors.index.json.
        #[arg(long)]
        base: PathBuf,
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        /// The layer's module path (`model.layers.0.self_attn.q_proj`, with or without a
        /// trailing dot or `base_model.model.`), when the checkpoint holds several.
        #[arg(long, conflicts_with = "all_modules")]
        module: Option<String>,
        /// Run every module of the model (folder, index or file given as --base): the input
        /// holds one `<module>.x` per module, the output gets one `<module>.y` per module.
        #[arg(long, requires = "output")]
        all_modules: bool,
        /// PEFT adapter directories, applied in the order given.
        #[arg(long)]
        adapter: Vec<PathBuf>,
        /// A safetensors file with the input `x` ([..., in]: any leading dims).
        #[arg(long)]
        input: PathBuf,
        /// Where to write `y` ([..., out], x's leading dims); printed when absent.
        #[arg(long)]
        output: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = RunBackend::Gpu)]
        backend: RunBackend,
    },
    /// Bake adapters into an HQQ model folder, writing a model folder transformers + HQQ load
    /// as they load the base.
    Merge {
        /// The HQQ model folder (config.json, model.safetensors or an index with shards).
        #[arg(long)]
        base: PathBuf,
        /// PEFT adapter folders, merged in the order given (OFT adapters first).
        #[arg(long, required = true)]
        adapter: Vec<PathBuf>,
        /// The folder to write; it must not exist.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = RunBackend::Gpu)]
        backend: RunBackend,
    },
    /// Time every kernel and whole layers on the best adapter, as ratios to a streaming-read
    /// and an FMA yardstick and to dense f16 measured in the same run.
    Bench {
        /// Write the report as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write the roofline plot as SVG.
        #[arg(long)]
        svg: Option<PathBuf>,
        /// Write the ratios and targets as Markdown (for BENCHMARKS.md).
        #[arg(long)]
        markdown: Option<PathBuf>,
        /// full: the issue's shapes (a real GPU); small: dimensions / 16 (a software adapter);
        /// tiny: one small shape (checks); auto: full unless the adapter is software.
        #[arg(long, value_enum, default_value_t = ScaleArg::Auto)]
        scale: ScaleArg,
        /// Replace the scale's matmul shapes, as OUTxIN, comma-separated (e.g. 1024x2048).
        #[arg(long, value_delimiter = ',', value_parser = parse_shape)]
        shapes: Vec<(usize, usize)>,
        /// Replace the scale's rows of x for the matmuls, comma-separated (e.g. 1,8).
        #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..))]
        rows: Vec<u32>,
    },
    /// Time every GEMV variant on this adapter, each checked against the CPU first, and keep
    /// the fastest per kernel in the tuning cache that every command loads at start.
    Tune {
        /// The cache file (default: $QUANTADAPT_TUNE_CACHE, else quantadapt/tune.json in
        /// $XDG_CACHE_HOME or ~/.cache).
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Tune the kernels of this model's quantized modules (a folder, index or file: one
        /// module of each format and shape) instead of synthetic weights.
        #[arg(long, conflicts_with_all = ["shapes", "formats"])]
        model: Option<PathBuf>,
        /// Weight shapes as OUTxIN, comma-separated (default: 8B-class layers; the bench's
        /// small shapes on a software adapter).
        #[arg(long, value_delimiter = ',', value_parser = parse_shape)]
        shapes: Vec<(usize, usize)>,
        /// Rows of x, comma-separated, 1 to 16 (default: 1,4,16).
        #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=16))]
        rows: Vec<u32>,
        /// Formats, comma-separated (default: all).
        #[arg(long, value_delimiter = ',', value_enum)]
        formats: Vec<TuneFormat>,
        /// Activation dtypes, comma-separated (default: f32).
        #[arg(long, value_delimiter = ',', value_enum)]
        act: Vec<ActArg>,
    },
}

/// The formats `quantadapt tune` makes synthetic weights of.
#[derive(Clone, Copy, ValueEnum)]
enum TuneFormat {
    Hqq4,
    Hqq8,
    Gptq4,
    Eetq,
}

impl From<TuneFormat> for BaseFormat {
    fn from(f: TuneFormat) -> Self {
        match f {
            TuneFormat::Hqq4 => BaseFormat::Hqq4,
            TuneFormat::Hqq8 => BaseFormat::Hqq8,
            TuneFormat::Gptq4 => BaseFormat::Gptq4,
            TuneFormat::Eetq => BaseFormat::EetqInt8,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ActArg {
    F32,
    F16,
}

/// `OUTxIN`, both at least 1.
fn parse_shape(text: &str) -> std::result::Result<(usize, usize), String> {
    let parse = |dim: &str| dim.trim().parse::<usize>().ok().filter(|d| *d > 0);
    match text.split_once('x') {
        Some((out, inp)) => match (parse(out), parse(inp)) {
            (Some(out), Some(inp)) => Ok((out, inp)),
            _ => Err(format!(
                "{text:?}: both dimensions must be positive integers"
            )),
        },
        None => Err(format!("{text:?} is not OUTxIN")),
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ScaleArg {
    Auto,
    Full,
    Small,
    Tiny,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Hqq,
    Gptq,
    Eetq,
}

#[derive(Clone, Copy, ValueEnum)]
enum RunBackend {
    Gpu,
    Cpu,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    Gpu,
    Cpu,
    Both,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Demo) {
        Command::Demo => demo(),
        Command::Info => info(),
        Command::VerifyGolden { dir, backend } => verify_golden(&dir, backend),
        Command::Inspect { path, adapter } => inspect(&path, &adapter),
        Command::Run {
            base,
            all_modules: true,
            adapter,
            input,
            output,
            backend,
            ..
        } => run_all_modules(&base, &adapter, &input, output.as_deref(), backend),
        Command::Merge {
            base,
            adapter,
            out,
            backend,
        } => merge(&base, &adapter, &out, backend),
        Command::Run {
            base,
            format,
            module,
            adapter,
            input,
            output,
            backend,
            ..
        } => run(RunArgs {
            base,
            format,
            module,
            adapters: adapter,
            input,
            output,
            backend,
        }),
        Command::Bench {
            json,
            svg,
            markdown,
            scale,
            shapes,
            rows,
        } => bench(BenchArgs {
            json,
            svg,
            markdown,
            scale,
            shapes,
            rows: rows.into_iter().map(|m| m as usize).collect(),
        }),
        Command::Tune {
            cache,
            model,
            shapes,
            rows,
            formats,
            act,
        } => tune::tune(tune::TuneArgs {
            cache,
            model,
            shapes,
            rows: rows.into_iter().map(|m| m as usize).collect(),
            formats: formats.into_iter().map(BaseFormat::from).collect(),
            acts: act
                .into_iter()
                .map(|a| match a {
                    ActArg::F32 => ActDtype::F32,
                    ActArg::F16 => ActDtype::F16,
                })
                .collect(),
        })
        .map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The synthetic layer of the demo: a 4-bit HQQ base, an OFT adapter (b = 32, exact Cayley) on
/// its input and a LoRA adapter (r = 16) on its output.
struct DemoLayer {
    base: HqqWeight,
    oft: OftAdapter,
    lora: LoraAdapter,
}

impl DemoLayer {
    fn new(out: usize, inp: usize) -> Result<Self> {
        let base = HqqWeight::quantize(
            &Matrix::random(out, inp, 0.05),
            Some(Matrix::random(1, out, 0.1).data),
            &HqqConfig::new(4, 64, 1),
        )?;
        let b = 32;
        let oft_params = Matrix::random(inp / b, b * (b - 1) / 2, 0.01);
        let oft = OftAdapter::from_params(
            "oft",
            inp,
            oft_params,
            Parameterization::Cayley,
            None,
            false,
        )?;
        let r = 16;
        let lora = LoraAdapter::from_matrices(
            "lora",
            inp,
            out,
            Matrix::random(r, inp, 0.05),
            Matrix::random(out, r, 0.05),
            2.0,
            None,
        )?;
        Ok(Self { base, oft, lora })
    }

    /// The CPU reference: the same layer as a [`QuantLinear`] on the CPU backend.
    fn cpu_reference(&self) -> Result<QuantLinear> {
        let mut layer = QuantLinear::new(QuantWeight::Hqq(self.base.clone()), LayerBackend::Cpu)?;
        layer.add_adapter(Adapter::Oft(self.oft.clone()))?;
        layer.add_adapter(Adapter::Lora(self.lora.clone()))?;
        layer.set_active(&["oft", "lora"])?;
        Ok(layer)
    }
}

fn demo() -> Result<ExitCode> {
    let (out, inp) = (2048, 2048);
    println!(
        "quantadapt demo: HQQ 4-bit (group 64, axis 1) {out}x{inp} + OFT (b=32, Cayley) + LoRA (r=16)"
    );
    let started = Instant::now();
    let layer = DemoLayer::new(out, inp)?;
    println!(
        "  quantized on the CPU (half-quadratic solver) in {:.0} ms; packed base {} bytes (dense f16 {} bytes)",
        started.elapsed().as_secs_f64() * 1e3,
        layer.base.packed_bytes(),
        out * inp * 2
    );
    let cpu_layer = layer.cpu_reference()?;
    let ctx = match tune::gpu_context() {
        Ok(ctx) => ctx,
        Err(e) => {
            println!("  note: {e}; running the CPU reference only");
            let t = Instant::now();
            cpu_layer.forward(&Matrix::random(1, inp, 1.0))?;
            println!(
                "  CPU forward M=1: {:.3} ms",
                t.elapsed().as_secs_f64() * 1e3
            );
            return Ok(ExitCode::SUCCESS);
        }
    };
    println!("  device: {}", ctx.describe());
    let base = GpuQuantWeight::from_hqq(&ctx, &layer.base)?;
    let oft = GpuOft::build(
        &ctx,
        layer.oft.params(),
        layer.oft.block_size(),
        layer.oft.param_rows(),
        inp,
        layer.oft.parameterization(),
    )?;
    let lora = GpuLora::upload(
        &ctx,
        layer.lora.a(),
        layer.lora.b(),
        layer.lora.scaling(),
        None,
    )?;
    let mut worst = 0f64;
    for m in [1, 8, 64] {
        let x = Matrix::random(m, inp, 1.0);
        let t = Instant::now();
        let reference = cpu_layer.forward(&x)?;
        let cpu_ms = t.elapsed().as_secs_f64() * 1e3;
        let path = MatmulPath::for_rows(m);
        let xg = GpuTensor::upload(&ctx, &x, ActDtype::F32)?;
        let rotated = GpuTensor::output(&ctx, m, inp, ActDtype::F32)?;
        let y = GpuTensor::output(&ctx, m, out, ActDtype::F32)?;
        let rotate = oft.prepare(&ctx, &xg, &rotated)?;
        let matmul = base.prepare(&ctx, &rotated, &y, path)?;
        let [shrink, expand] = lora.prepare(&ctx, &xg, &y, Some(base.bias_buffer()))?;
        let steps = [&rotate, &matmul, &shrink, &expand];
        Dispatch::submit_all(&ctx, &steps)?;
        let err = max_rel_error(&y.download(&ctx)?.data, &reference.data);
        worst = worst.max(err);
        let timing = if ctx.has_timestamps() {
            let layer_us = median(&time_pass(&ctx, 5, |pass| {
                steps.iter().for_each(|d| d.record(pass))
            })?);
            let base_us = median(&time_pass(&ctx, 5, |pass| matmul.record(pass))?);
            format!(
                "GPU layer {:.3} ms, base alone {:.3} ms",
                layer_us / 1e3,
                base_us / 1e3
            )
        } else {
            "no TIMESTAMP_QUERY on this device".to_string()
        };
        println!(
            "  M={m:<3} ({path:?}): max rel error vs CPU {err:.2e}; {timing}; CPU reference {cpu_ms:.1} ms"
        );
    }
    if worst >= golden::GPU_TOLERANCE {
        return Err(Error::Gpu(format!(
            "GPU result off by {worst:.2e} against the CPU"
        )));
    }
    println!(
        "  ok: GPU matches the CPU reference within {:.0e} (timings: median of 5, timestamp queries)",
        golden::GPU_TOLERANCE
    );
    Ok(ExitCode::SUCCESS)
}

fn info() -> Result<ExitCode> {
    println!("quantadapt {}", env!("CARGO_PKG_VERSION"));
    println!(
        "formats: HQQ (8/6/5/4/3/2/1-bit, axis 0 and 1), GPTQ (2/3/4/8-bit, v1/v2 zeros, act-order), EETQ (int8 per channel)"
    );
    println!(
        "adapters: OFT (exact Cayley, Cayley-Neumann, COFT, block sharing), LoRA, rsLoRA, DoRA"
    );
    println!("backends: cpu (reference, always), gpu (wgpu: Vulkan, Metal, DX12, GL)");
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    println!("adapters found: {}", adapters.len());
    for a in &adapters {
        let i = a.get_info();
        println!("  - {} ({:?}, {:?})", i.name, i.backend, i.device_type);
    }
    match tune::gpu_context() {
        Ok(ctx) => {
            let l = ctx.limits();
            println!("selected: {}", ctx.describe());
            println!(
                "limits: storage binding {} B, buffer {} B, workgroup storage {} B, invocations {}, subgroup {}..{}",
                l.max_storage_buffer_binding_size,
                l.max_buffer_size,
                l.max_compute_workgroup_storage_size,
                l.max_compute_invocations_per_workgroup,
                ctx.info.subgroup_min_size,
                ctx.info.subgroup_max_size,
            );
            match quantadapt::tune::TuneCache::default_path() {
                Some(path) if path.exists() => println!(
                    "tuning: {} ({} entries for this adapter)",
                    path.display(),
                    ctx.tuning().entries_for(&ctx)
                ),
                Some(path) => println!(
                    "tuning: none ({} does not exist; `quantadapt tune` writes it)",
                    path.display()
                ),
                None => println!("tuning: none (no cache folder)"),
            }
        }
        Err(e) => println!("selected: none ({e}); the CPU reference runs everything"),
    }
    Ok(ExitCode::SUCCESS)
}

fn verify_golden(dir: &std::path::Path, backend: BackendArg) -> Result<ExitCode> {
    let backends: &[GoldenBackend] = match backend {
        BackendArg::Cpu => &[GoldenBackend::Cpu],
        BackendArg::Gpu => &[GoldenBackend::Gpu],
        BackendArg::Both => &[GoldenBackend::Cpu, GoldenBackend::Gpu],
    };
    let gpu = match backends.contains(&GoldenBackend::Gpu) {
        true => match tune::gpu_context() {
            Ok(ctx) => {
                // A verification run: outputs start as NaN so unwritten elements fail.
                ctx.set_debug_poison(true);
                Some(ctx)
            }
            Err(e) => {
                println!("note: {e}; every GPU case fails");
                None
            }
        },
        false => None,
    };
    let outcomes = golden::run(dir, backends, gpu.as_ref())?;
    let mut failed = 0;
    for o in &outcomes {
        match &o.result {
            Ok(()) => println!("pass {} [{}]", o.case, o.backend),
            Err(reason) => {
                failed += 1;
                println!("FAIL {} [{}]: {reason}", o.case, o.backend);
            }
        }
    }
    println!("{} passed, {} failed", outcomes.len() - failed, failed);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

struct RunArgs {
    base: PathBuf,
    format: Option<FormatArg>,
    module: Option<String>,
    adapters: Vec<PathBuf>,
    input: PathBuf,
    output: Option<PathBuf>,
    backend: RunBackend,
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let format = args.format.map(|f| match f {
        FormatArg::Hqq => Format::Hqq,
        FormatArg::Gptq => Format::Gptq,
        FormatArg::Eetq => Format::Eetq,
    });
    let checkpoint = Checkpoint::open(&args.base)?;
    let module = select_module(&checkpoint, format, args.module.as_deref())?;
    let base = checkpoint.load_module(&module.name)?;
    let (inp, out) = (base.in_features(), base.out_features());
    let backend = layer_backend(args.backend);
    let mut layer = QuantLinear::new(base, backend)?;
    let mut names = Vec::new();
    for (i, dir) in args.adapters.iter().enumerate() {
        let name = format!("adapter{i}");
        let module_name = args.module.as_ref().map(|_| module.name.as_str());
        layer.add_adapter(Adapter::from_peft_dir(&name, dir, module_name, inp, out)?)?;
        names.push(name);
    }
    layer.set_active(&names.iter().map(String::as_str).collect::<Vec<_>>())?;
    let (x, leading) = TensorFile::open(&args.input)?.input_rows(inp)?;
    let y = layer.forward(&x)?;
    match args.output {
        Some(path) => {
            let mut file = TensorFile {
                label: path.display().to_string(),
                ..Default::default()
            };
            let y = HostTensor::from_rows("y", &y, &leading)?;
            println!("wrote y {:?} to {}", y.shape, path.display());
            file.insert(y);
            file.save(&path)?;
        }
        None => {
            for r in 0..y.rows {
                let shown: Vec<String> =
                    y.row(r).iter().take(8).map(|v| format!("{v:.6}")).collect();
                println!(
                    "y[{r}] = [{}{}]",
                    shown.join(", "),
                    if y.cols > 8 { ", ..." } else { "" }
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The CPU, or the GPU when asked for and present (else the CPU, with a note).
fn layer_backend(backend: RunBackend) -> LayerBackend {
    match backend {
        RunBackend::Cpu => LayerBackend::Cpu,
        RunBackend::Gpu => match tune::gpu_context() {
            Ok(ctx) => LayerBackend::Gpu(Box::new(ctx)),
            Err(e) => {
                eprintln!("note: {e}; running on the CPU");
                LayerBackend::Cpu
            }
        },
    }
}

/// Every module with an `x` in the input, with every adapter active (in the order given).
fn run_all_modules(
    base: &Path,
    adapters: &[PathBuf],
    input: &Path,
    output: Option<&Path>,
    backend: RunBackend,
) -> Result<ExitCode> {
    let output = output.ok_or_else(|| Error::Config("--all-modules needs --output".into()))?;
    check_output_folder(output)?;
    let mut model = Model::open(base, layer_backend(backend))?;
    let mut names = Vec::new();
    for (i, dir) in adapters.iter().enumerate() {
        let name = format!("adapter{i}");
        model.add_adapter_dir(&name, dir)?;
        names.push(name);
    }
    model.set_active(&names.iter().map(String::as_str).collect::<Vec<_>>())?;
    let inputs = TensorFile::open(input)?;
    for key in inputs.tensors.keys() {
        let known = key
            .strip_suffix(".x")
            .is_some_and(|m| model.module_names().iter().any(|n| n == m));
        if !known {
            return Err(Error::Config(format!(
                "{}: `{key}` is not `<module>.x` for a quantized module of the model",
                input.display()
            )));
        }
    }
    let mut file = TensorFile {
        label: output.display().to_string(),
        ..Default::default()
    };
    for module in model.module_names() {
        let Ok(x) = inputs.get(&format!("{module}.x")) else {
            continue;
        };
        let y = model.forward(module, &Activations::from_host(x)?)?;
        file.insert(y.to_host(&format!("{module}.y")));
    }
    if file.tensors.is_empty() {
        return Err(Error::Config(format!(
            "{}: no `<module>.x` tensor in the input",
            input.display()
        )));
    }
    file.save(output)?;
    println!(
        "wrote {} outputs (<module>.y) of {} modules to {}",
        file.tensors.len(),
        model.module_names().len(),
        output.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn merge(base: &Path, adapters: &[PathBuf], out: &Path, backend: RunBackend) -> Result<ExitCode> {
    let backend = layer_backend(backend);
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{msg:40} [{bar:30}] {pos}/{len} modules, {elapsed} elapsed, ETA {eta}",
        )
        .map_err(|e| Error::Config(format!("progress template: {e}")))?
        .progress_chars("=> "),
    );
    let plain = bar.is_hidden();
    let summary = merge_model(base, adapters, out, &backend, &mut |event| match event {
        MergeEvent::Start { touched, modules } => {
            bar.set_length(touched as u64);
            bar.set_message("merging");
            if plain {
                eprintln!("merging {touched} of {modules} modules");
            }
        }
        MergeEvent::Merged { module } => {
            bar.inc(1);
            bar.set_message(module.clone());
            if plain {
                eprintln!(
                    "merged {module} ({}/{})",
                    bar.position(),
                    bar.length().unwrap_or(0)
                );
            }
        }
        MergeEvent::Written { file, bytes } => {
            if plain {
                eprintln!("wrote {file} ({bytes} bytes)");
            }
        }
    });
    bar.finish_and_clear();
    let summary = summary?;
    println!(
        "merged {} of {} modules into {} in {:.1} s: {} safetensors file(s), {} bytes written",
        summary.merged,
        summary.modules,
        summary.out.display(),
        summary.seconds,
        summary.files,
        summary.bytes
    );
    Ok(ExitCode::SUCCESS)
}

/// The module `--module` names (any spelling), or else the checkpoint's only module (of
/// `format`, when given).
fn select_module<'a>(
    checkpoint: &'a Checkpoint,
    format: Option<Format>,
    module: Option<&str>,
) -> Result<&'a ModuleInfo> {
    if let Some(name) = module {
        let found = checkpoint.module(name)?;
        return match format {
            Some(f) if f != found.format => Err(Error::Config(format!(
                "module `{}` is {}, not {f}",
                found.name, found.format
            ))),
            _ => Ok(found),
        };
    }
    let candidates: Vec<&ModuleInfo> = checkpoint
        .modules()
        .iter()
        .filter(|m| format.is_none_or(|f| f == m.format))
        .collect();
    match candidates[..] {
        [one] => Ok(one),
        [] => Err(Error::Config(format!(
            "{}: no {} module",
            checkpoint.path().display(),
            format.map_or("quantized".to_string(), |f| f.to_string())
        ))),
        _ => {
            let names: Vec<&str> = candidates.iter().take(5).map(|m| m.name.as_str()).collect();
            Err(Error::Config(format!(
                "{}: {} quantized modules ({}{}); name one with --module",
                checkpoint.path().display(),
                candidates.len(),
                names.join(", "),
                if candidates.len() > names.len() {
                    ", ..."
                } else {
                    ""
                }
            )))
        }
    }
}

fn inspect(path: &std::path::Path, adapters: &[PathBuf]) -> Result<ExitCode> {
    let checkpoint = Checkpoint::open(path)?;
    print!("{}", checkpoint.describe());
    for dir in adapters {
        println!();
        print!("{}", describe_adapter_config(dir)?);
        print!("{}", describe_adapter_targets(&checkpoint, dir)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// The modules of `checkpoint` the adapter touches, as PEFT resolves its config, with the
/// settings each gets (rank, alpha and scaling; OFT's block size after PEFT's adjustment).
fn describe_adapter_targets(checkpoint: &Checkpoint, dir: &Path) -> Result<String> {
    let peft = PeftAdapterDir::open(dir)?;
    let modules = checkpoint
        .modules()
        .iter()
        .map(|m| (m.name.as_str(), m.in_features));
    let targets = peft.resolve_targets(modules)?;
    let mut lines = vec![format!(
        "  touches {} of {} modules:",
        targets.len(),
        checkpoint.modules().len()
    )];
    for (module, settings) in &targets {
        lines.push(format!("    {module}: {settings}"));
    }
    Ok(lines.join("\n") + "\n")
}

/// What an adapter folder's `adapter_config.json` says, as written: its type, rank and alpha,
/// its targets, and the other settings that change which modules it touches or how.
fn describe_adapter_config(dir: &std::path::Path) -> Result<String> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: not valid JSON: {e}", path.display())))?;
    let mut lines = vec![format!("adapter: {}", dir.display())];
    const KEYS: [&str; 19] = [
        "peft_type",
        "r",
        "lora_alpha",
        "oft_block_size",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "use_dora",
        "use_cayley_neumann",
        "num_cayley_neumann_terms",
        "coft",
        "eps",
        "block_share",
        "bias",
        "modules_to_save",
    ];
    for key in KEYS {
        match config.get(key) {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Object(map)) if map.is_empty() => {}
            Some(value) => lines.push(format!("  {key}: {value}")),
        }
    }
    Ok(lines.join("\n") + "\n")
}

struct BenchArgs {
    json: Option<PathBuf>,
    svg: Option<PathBuf>,
    markdown: Option<PathBuf>,
    scale: ScaleArg,
    /// Replace the plan's shapes and matmul rows where not empty.
    shapes: Vec<(usize, usize)>,
    rows: Vec<usize>,
}

/// Fails before a long run if an output could not be written: its folder does not exist.
fn check_output_folder(path: &std::path::Path) -> Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => Err(Error::Io {
            path: path.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no folder {}", dir.display()),
            ),
        }),
        _ => Ok(()),
    }
}

fn bench(args: BenchArgs) -> Result<ExitCode> {
    for path in [&args.json, &args.svg, &args.markdown]
        .into_iter()
        .flatten()
    {
        check_output_folder(path)?;
    }
    let ctx = tune::gpu_context()?;
    let scale = match args.scale {
        ScaleArg::Auto => Scale::auto(&ctx),
        ScaleArg::Full => Scale::Full,
        ScaleArg::Small => Scale::Small,
        ScaleArg::Tiny => Scale::Tiny,
    };
    let how = match (args.scale, ctx.is_software()) {
        (ScaleArg::Auto, true) => "auto: software adapter",
        (ScaleArg::Auto, false) => "auto: real GPU",
        _ => "chosen",
    };
    println!("device: {}", ctx.describe());
    println!("scale: {} ({how})", scale.name());
    let command = std::env::args()
        .skip(1)
        .fold("quantadapt".to_string(), |line, arg| line + " " + &arg);
    let mut plan = Plan::new(scale);
    if !args.shapes.is_empty() {
        plan.shapes = args.shapes;
    }
    if !args.rows.is_empty() {
        plan.rows = args.rows;
    }
    let report = quantadapt::bench::run(&ctx, &plan, &command, &mut |e| {
        eprintln!(
            "  {} {}x{} M={}: {:.1} us",
            e.name, e.out_features, e.in_features, e.m, e.us
        )
    })?;
    println!("date: {}", report.date);
    println!("command: {}", report.command);
    println!(
        "yardsticks: streaming read {:.2} GB/s, f32 FMA {:.2} GFLOP/s",
        report.read_gb_per_s, report.fma_gflop_per_s
    );
    if report.software_adapter {
        println!("note: a software adapter runs kernels on the CPU; its times are CPU times");
    }
    println!();
    print!("{}", report.table());
    println!();
    print!("{}", report.targets_table());
    if let Some(path) = &args.json {
        report.write_json(path)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.svg {
        write_svg(&report, path)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.markdown {
        report.write_markdown(path)?;
        println!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
