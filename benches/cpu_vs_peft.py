#!/usr/bin/env python3
"""HQQ on torch's CPU backend against quantadapt's fast CPU forward, side by side in one run.

    python benches/cpu_vs_peft.py [--threads 2] [--runs 10] [--sizes 2048,4096] [--rows 1,16]
                                  [--markdown FILE]

For each size N, quantizes an nn.Linear(N, N) with HQQ (4-bit, group 64, axis 1; compute dtype
float32, as torch's CPU matmul has no fast float16 path) and times HQQLinear's own forward, the
call PEFT makes for the base layer, at each M with torch.set_num_threads(threads). It then writes
that layer as transformers saves it, with x and HQQ's y, and runs `cargo bench --bench cpu_forward`
on the same files with rayon at the same thread count, which checks quantadapt's output against
HQQ's and times the fast forward (alone and in CPU layers with an OFT or a LoRA adapter) and the
f64 reference. Times are medians of `runs` calls after a warm-up. Without torch or hqq the script says so and times quantadapt alone (its fast path against
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


def torch_side(args, n, workdir):
    """Times HQQ on torch for an N x N layer; writes `<workdir>/n<N>/{model,io}.safetensors`.
    Returns {m: ms}."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    torch.manual_seed(n)
    linear = torch.nn.Linear(n, n)
    config = BaseQuantizeConfig(nbits=NBITS, group_size=GROUP, axis=1)
    layer = HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu")
    times, io = {}, {}
    for m in args.rows:
        x = torch.randn(m, n)
        with torch.inference_mode():
            times[m] = median_ms(lambda: layer(x), args.runs)
            io[f"x_m{m}"], io[f"y_m{m}"] = x, layer(x).float()
    d = os.path.join(workdir, f"n{n}")
    os.makedirs(d)
    state = {f"layer.{k}": v.detach().contiguous()
             for k, v in layer.state_dict().items() if torch.is_tensor(v)}
    save_file(state, os.path.join(d, "model.safetensors"))
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(d, "io.safetensors"))
    return d, times


def quantadapt_side(args, targets):
    """Runs the Rust bench on `targets` (directories, or `--synthetic ...`); returns its records."""
    cmd = ["cargo", "bench", "--bench", "cpu_forward", "--",
           "--threads", str(args.threads), "--runs", str(args.runs)] + targets
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

    # Each size is timed on torch and then at once on quantadapt, so that both see the same
    # load on a shared machine.
    rows, versions = [], ""
    with tempfile.TemporaryDirectory() as workdir:
        try:
            for n in args.sizes:
                d, torch_times = torch_side(args, n, workdir)
                for r in quantadapt_side(args, [d]):
                    rows.append((f"HQQ {NBITS}-bit g{GROUP}", r, torch_times[r["m"]]))
            versions = _versions()
        except ImportError as e:
            print(f"torch or hqq is not installed ({e}): timing quantadapt alone", file=sys.stderr)
            targets = ["--synthetic", ",".join(map(str, args.sizes)),
                       "--rows", ",".join(map(str, args.rows))]
            rows = [(r["layer"].removeprefix("synthetic "), r, None)
                    for r in quantadapt_side(args, targets)]
    with_torch = bool(rows) and rows[0][2] is not None

    load = os.getloadavg()[0]
    lines = [f"{args.threads} threads on both sides; median of {args.runs} runs after a warm-up; "
             f"load average {load:.1f} at the end{versions}", ""]
    head = "| layer | shape (out x in) | M |"
    if with_torch:
        head += " HQQ on torch (ms) |"
    head += (" quantadapt fast (ms) | + OFT b32 (ms) | + LoRA r16 (ms) |"
             " quantadapt f64 reference (ms) |")
    if with_torch:
        head += " speed-up over HQQ | max rel. error vs HQQ |"
    lines += [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, r, torch_ms in rows:
        row = f"| {name} | {r['out']}x{r['in']} | {r['m']} |"
        if with_torch:
            row += f" {torch_ms:.2f} |"
        row += (f" {r['fast_ms']:.2f} | {r['oft_layer_ms']:.2f} | {r['lora_layer_ms']:.2f} |"
                f" {r['reference_ms']:.1f} |")
        if with_torch:
            row += f" {torch_ms / r['fast_ms']:.1f}x | {r['max_rel_error']:.1e} |"
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
