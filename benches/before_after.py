"""Markdown table of two `quantadapt bench --json` reports of the same scale side by side.

    python3 benches/before_after.py BEFORE.json AFTER.json

For every item present in both (name, shape, M): % of the read roofline and % of the FMA ceiling
before and after, each measured against the yardsticks of its own run, and the after/before
ratio of those percentages (a ratio of ratios, so the noise of a shared CPU adapter between the
two runs cancels as far as it hits the yardsticks alike). Bytes per weight come from the after
report where it has them.
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


def pct(e, field):
    v = e.get(field)
    return "-" if v is None else f"{v:.2f}"


def main(before_path, after_path):
    before, old = entries(before_path)
    after, new = entries(after_path)
    print(f"- before: {before['date']}, `{before['command']}`")
    print(f"- after: {after['date']}, `{after['command']}`")
    print(f"- device: {after['device']}")
    print()
    print("| item | shape | M | B/weight | % read roofline before | after | % FMA ceiling before | after | roofline after / before |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, e in new.items():
        if key not in old:
            continue
        o = old[key]
        name, out, inp, m = key
        gain = "-"
        if o.get("pct_read_roofline") and e.get("pct_read_roofline"):
            gain = f"{e['pct_read_roofline'] / o['pct_read_roofline']:.2f}x"
        bpw = e.get("bytes_per_weight")
        bpw = "-" if bpw is None else f"{bpw:.3f}"
        print(
            f"| {name} | {out}x{inp} | {m} | {bpw} | {pct(o, 'pct_read_roofline')} | {pct(e, 'pct_read_roofline')} "
            f"| {pct(o, 'pct_fma_ceiling')} | {pct(e, 'pct_fma_ceiling')} | {gain} |"
        )


if __name__ == "__main__":
    main(*sys.argv[1:3])
