"""Markdown table of `quantadapt bench --json` reports of the same scale, before and after a change.

    python3 benches/before_after.py BEFORE.json AFTER.json [BEFORE2.json AFTER2.json ...] [--group base]

Runs come in pairs (a before and an after run back to back). For every item present in all of
them (name, shape, M): its % of the read roofline in each run, each measured against the
yardsticks of its own run, and per pair the after / before ratio of those percentages (a ratio
of ratios, so a shared CPU adapter's drift between runs cancels as far as it hits the yardsticks
alike). `--group` keeps one group of items (base, layer, mixed). Bytes per weight come from the
first after report.
"""
import json
import sys


def entries(path):
    report = json.load(open(path))
    return report, {
        (e["name"], e["out_features"], e["in_features"], e["m"]): e
        for e in report["entries"]
        if e["group"] != "yardstick"
    }


def roofline(e):
    return e.get("pct_read_roofline")


def main(args):
    group = None
    if "--group" in args:
        at = args.index("--group")
        group = args[at + 1]
        args = args[:at] + args[at + 2 :]
    runs = [entries(p) for p in args]
    pairs = [(runs[i], runs[i + 1]) for i in range(0, len(runs) - 1, 2)]
    for n, ((before, _), (after, _)) in enumerate(pairs, 1):
        print(f"- pair {n}: before `{before['command']}`; after `{after['command']}` ({after['date']}); "
              f"read yardstick {before['read_gb_per_s']:.2f} / {after['read_gb_per_s']:.2f} GB/s")
    print(f"- device: {runs[0][0]['device']}")
    print()
    head = ["item", "shape", "M", "B/weight"]
    for n in range(1, len(pairs) + 1):
        head += [f"% roofline before ({n})", f"after ({n})", f"after / before ({n})"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    keys = [k for k in runs[1][1] if all(k in r[1] for r in runs)]
    for key in keys:
        first_after = runs[1][1][key]
        if group and first_after["group"] != group:
            continue
        if any(roofline(r[1][key]) is None for r in runs):
            continue
        name, out, inp, m = key
        bpw = first_after.get("bytes_per_weight")
        cells = [name, f"{out}x{inp}", str(m), "-" if bpw is None else f"{bpw:.3f}"]
        for (_, old), (_, new) in pairs:
            o, a = roofline(old[key]), roofline(new[key])
            cells += [f"{o:.2f}", f"{a:.2f}", f"{a / o:.2f}x"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
