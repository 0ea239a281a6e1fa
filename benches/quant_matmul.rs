//! `cargo bench --bench quant_matmul`: the library's performance suite (the one behind
//! `quantadapt bench`) at its small scale, printed as a table. On a real GPU prefer
//! `quantadapt bench --scale full`.

use quantadapt::bench::{self, Plan, Scale};
use quantadapt::gpu::GpuContext;

fn main() -> quantadapt::Result<()> {
    let ctx = GpuContext::new()?;
    println!("device: {}", ctx.describe());
    let command = "cargo bench --bench quant_matmul";
    let report = bench::run(&ctx, &Plan::new(Scale::Small), command, &mut |e| {
        eprintln!("  {} M={}: {:.1} us", e.name, e.m, e.us)
    })?;
    println!(
        "yardsticks: streaming read {:.2} GB/s, f32 FMA {:.2} GFLOP/s",
        report.read_gb_per_s, report.fma_gflop_per_s
    );
    print!("{}\n{}", report.table(), report.targets_table());
    Ok(())
}
