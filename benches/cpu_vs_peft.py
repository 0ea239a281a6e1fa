#!/usr/bin/env python3
"""HQQ on torch's CPU backend against quantadapt's fast CPU forward, side by side in one run.

    python benches/cpu_vs_peft.py [--threads 2] [--runs 10] [--sizes 2048,4096] [--rows 1,16]
                                  [--markdown FILE]

For each size N, quantizes an nn.Linear(N, N) with HQQ (4-bit, group 64, axis 1; compute dtype
float32, as torch's CPU matmul has no fast float16 path) and times HQQLinear's own forward, the
call PEFT makes for the base layer, at each M with torch.set_num_threads(threads). It then writes
that layer as transformers saves it, with x and HQQ's y, and runs `cargo bench --bench cpu_forward`
on the same files with rayon at the same thread count, which checks quantadapt's output against
HQQ's and times the fast forward and the f64 reference. Times are medians of `runs` calls after a
warm-up. Without torch or hqq the script says so and times quantadapt alone (its fast path against
its f64 reference) on layers of its own making.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NBITS, GROUP = 4, 64


def median_ms(fn, runs):
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def torch_side(args, workdir):
    """Times HQQ on torch; writes `<workdir>/n<N>/{model,io}.safetensors`. Returns {(n, m): ms}."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    times = {}
    for n in args.sizes:
        linear = torch.nn.Linear(n, n)
        config = BaseQuantizeConfig(nbits=NBITS, group_size=GROUP, axis=1)
        layer = HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu")
        io = {}
        for m in args.rows:
            x = torch.randn(m, n)
            with torch.inference_mode():
                times[(n, m)] = median_ms(lambda: layer(x), args.runs)
                io[f"x_m{m}"], io[f"y_m{m}"] = x, layer(x).float()
        d = os.path.join(workdir, f"n{n}")
        os.makedirs(d)
        state = {f"layer.{k}": v.detach().contiguous()
                 for k, v in layer.state_dict().items() if torch.is_tensor(v)}
        save_file(state, os.path.join(d, "model.safetensors"))
        save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(d, "io.safetensors"))
    return times


def quantadapt_side(args, workdir, synthetic):
    """Runs the Rust bench; returns its JSON records."""
    cmd = ["cargo", "bench", "--bench", "cpu_forward", "--",
           "--threads", str(args.threads), "--runs", str(args.runs)]
    if synthetic:
        cmd += ["--synthetic", ",".join(map(str, args.sizes)),
                "--rows", ",".join(map(str, args.rows))]
    else:
        cmd += [os.path.join(workdir, f"n{n}") for n in args.sizes]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--sizes", default="2048,4096")
    p.add_argument("--rows", default="1,16")
    p.add_argument("--markdown", help="also write the table to this file")
    args = p.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.rows = [int(s) for s in args.rows.split(",")]

    with tempfile.TemporaryDirectory() as workdir:
        try:
            torch_times = torch_side(args, workdir)
            versions = _versions()
        except ImportError as e:
            print(f"torch or hqq is not installed ({e}): timing quantadapt alone", file=sys.stderr)
            torch_times, versions = None, ""
        records = quantadapt_side(args, workdir, synthetic=torch_times is None)

    lines = [f"HQQ {NBITS}-bit, group {GROUP}, axis 1, f32; {args.threads} threads on both sides; "
             f"median of {args.runs} runs after a warm-up{versions}", ""]
    head = "| shape (out x in) | M |"
    if torch_times is not None:
        head += " HQQ on torch (ms) |"
    head += (" quantadapt fast (ms) | + OFT b32 (ms) | + LoRA r16 (ms) |"
             " quantadapt f64 reference (ms) |")
    if torch_times is not None:
        head += " speed-up over HQQ | max rel. error vs HQQ |"
    lines += [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in records:
        n, m = r["out"], r["m"]
        row = f"| {n}x{r['in']} | {m} |"
        if torch_times is not None:
            row += f" {torch_times[(n, m)]:.2f} |"
        row += (f" {r['fast_ms']:.2f} | {r['oft_layer_ms']:.2f} | {r['lora_layer_ms']:.2f} |"
                f" {r['reference_ms']:.1f} |")
        if torch_times is not None:
            row += f" {torch_times[(n, m)] / r['fast_ms']:.1f}x | {r['max_rel_error']:.1e} |"
        lines.append(row)
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


def _versions():
    import hqq
    import torch
    hqq_version = getattr(hqq, "__version__", None)
    if hqq_version is None:
        from importlib.metadata import version
        hqq_version = version("hqq")
    return f"; torch {torch.__version__}, hqq {hqq_version}"


if __name__ == "__main__":
    main()
