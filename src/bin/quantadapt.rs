//! The `quantadapt` command: demo, info, verify-golden.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use quantadapt::formats::QuantFormat;
use quantadapt::formats::hqq::{HqqConfig, HqqWeight};
use quantadapt::golden::{self, Backend};
use quantadapt::gpu::timing::{median, time_pass};
use quantadapt::gpu::{ActDtype, GpuContext, GpuTensor};
use quantadapt::kernels::MatmulPath;
use quantadapt::kernels::quant::GpuQuantWeight;
use quantadapt::tensor::{Matrix, max_rel_error};
use quantadapt::{Error, Result};
use rand::Rng;

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
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn random_matrix(rows: usize, cols: usize, scale: f32) -> Matrix {
    let mut rng = rand::rng();
    let data = (0..rows * cols)
        .map(|_| rng.random_range(-scale..scale))
        .collect();
    Matrix { rows, cols, data }
}

fn demo() -> Result<ExitCode> {
    let (out, inp) = (2048, 2048);
    let config = HqqConfig::new(4, 64, 1);
    println!("quantadapt demo: HQQ 4-bit, group 64, axis 1, layer {out}x{inp}");
    let started = Instant::now();
    let layer = HqqWeight::quantize(
        &random_matrix(out, inp, 0.05),
        Some(random_matrix(1, out, 0.1).data),
        &config,
    )?;
    println!(
        "  quantized on the CPU (half-quadratic solver) in {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    println!(
        "  packed layer: {} bytes (dense f16: {} bytes)",
        layer.packed_bytes(),
        out * inp * 2
    );
    let ctx = match GpuContext::new() {
        Ok(ctx) => ctx,
        Err(e) => {
            println!("  note: {e}; running the CPU reference only");
            let x = random_matrix(1, inp, 1.0);
            let t = Instant::now();
            layer.forward_cpu(&x)?;
            println!(
                "  CPU forward M=1: {:.3} ms",
                t.elapsed().as_secs_f64() * 1e3
            );
            return Ok(ExitCode::SUCCESS);
        }
    };
    println!("  device: {}", ctx.describe());
    let gpu_layer = GpuQuantWeight::from_hqq(&ctx, &layer)?;
    let mut worst = 0f64;
    for (m, path) in [
        (1, MatmulPath::Gemv),
        (8, MatmulPath::Gemv),
        (64, MatmulPath::Tiled),
    ] {
        let x = random_matrix(m, inp, 1.0);
        let t = Instant::now();
        let reference = layer.forward_cpu(&x)?;
        let cpu_ms = t.elapsed().as_secs_f64() * 1e3;
        let xg = GpuTensor::upload(&ctx, &x, ActDtype::F32)?;
        let y = gpu_layer.forward_with(&ctx, &xg, path)?.download(&ctx)?;
        let err = max_rel_error(&y.data, &reference.data);
        worst = worst.max(err);
        let timing = if ctx.has_timestamps() {
            let yg = GpuTensor::poisoned(&ctx, m, out, ActDtype::F32)?;
            let dispatch = gpu_layer.prepare(&ctx, &xg, &yg, path)?;
            let times = time_pass(&ctx, 7, |pass| dispatch.record(pass))?;
            format!(
                "GPU {:.3} ms (median of 7, timestamp queries)",
                median(&times) / 1e3
            )
        } else {
            "GPU time: no TIMESTAMP_QUERY on this device".to_string()
        };
        println!(
            "  M={m:<3} {path:?}: max rel error vs CPU {err:.2e}; {timing}; CPU reference {cpu_ms:.3} ms"
        );
    }
    if worst >= golden::GPU_TOLERANCE {
        return Err(Error::Gpu(format!(
            "GPU result off by {worst:.2e} against the CPU"
        )));
    }
    println!(
        "  ok: GPU matches the CPU reference within {:.0e}",
        golden::GPU_TOLERANCE
    );
    Ok(ExitCode::SUCCESS)
}

fn info() -> Result<ExitCode> {
    println!("quantadapt {}", env!("CARGO_PKG_VERSION"));
    println!("formats: HQQ (8/6/5/4/3/2/1-bit, axis 0 and 1)");
    println!("backends: cpu (reference, always), gpu (wgpu: Vulkan, Metal, DX12, GL)");
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    println!("adapters found: {}", adapters.len());
    for a in &adapters {
        let i = a.get_info();
        println!("  - {} ({:?}, {:?})", i.name, i.backend, i.device_type);
    }
    match GpuContext::new() {
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
        }
        Err(e) => println!("selected: none ({e}); the CPU reference runs everything"),
    }
    Ok(ExitCode::SUCCESS)
}

fn verify_golden(dir: &std::path::Path, backend: BackendArg) -> Result<ExitCode> {
    let backends: &[Backend] = match backend {
        BackendArg::Cpu => &[Backend::Cpu],
        BackendArg::Gpu => &[Backend::Gpu],
        BackendArg::Both => &[Backend::Cpu, Backend::Gpu],
    };
    let gpu = match backends.contains(&Backend::Gpu) {
        true => match GpuContext::new() {
            Ok(ctx) => Some(ctx),
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
        if let Err(reason) = &o.result {
            failed += 1;
            println!("FAIL {} [{}]: {reason}", o.case, o.backend);
        }
    }
    println!("{} passed, {} failed", outcomes.len() - failed, failed);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
