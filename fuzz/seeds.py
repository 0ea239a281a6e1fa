#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/) from the real files in
tests/data/golden, framed as the targets read them (see `parts` in fuzz/src/lib.rs)."""

import glob
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "..", "tests", "data", "golden")


def read(*path):
    with open(os.path.join(GOLDEN, *path), "rb") as f:
        return f.read()


def frame(*parts):
    """Every part but the last behind its u32 little-endian length; the last one is the rest."""
    out = b""
    for part in parts[:-1]:
        out += struct.pack("<I", len(part)) + part
    return out + parts[-1]


def gptq_config(case):
    """`quantize_config.json`, or the `quantization_config` block of `config.json`."""
    folder = os.path.join(GOLDEN, case, "checkpoint")
    if os.path.exists(os.path.join(folder, "quantize_config.json")):
        return read(case, "checkpoint", "quantize_config.json")
    return json.dumps(json.loads(read(case, "checkpoint", "config.json"))["quantization_config"]).encode()


def input_file(rows, cols):
    """A safetensors file holding `x` [rows, cols] f32."""
    data = b"".join(struct.pack("<f", ((i * 7) % 11) / 11.0 - 0.5) for i in range(rows * cols))
    header = {"x": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, len(data)]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def seeds():
    for bits in (2, 4, 8):
        yield "hqq_checkpoint", f"b{bits}", read(f"hqq_f16_o96_i128_b{bits}", "checkpoint", "model.safetensors")
    for case in ("gptq2", "gptq3", "gptq4_actorder", "gptq4_gall", "gptq4_v2_asym", "gptq8_asym"):
        ckpt = f"oft_{case}_o96_i128"
        yield "gptq_checkpoint", case, frame(
            gptq_config(ckpt),
            read(ckpt, "checkpoint", "model.safetensors"),
        )
    yield "eetq_checkpoint", "cutlass", frame(
        b"\x00",
        read("oft_eetq_o96_i128", "checkpoint", "config.json"),
        read("oft_eetq_o96_i128", "checkpoint", "model.safetensors"),
    )
    shape = struct.pack("<HH", 128 - 1, 96 - 1)
    adapters = [("oft", ("oft_hqq_o96_i128_b4_v1", "adapter"))]
    adapters += [(f"lora_{v}", (f"lora_hqq_o96_i128_b4_v{v}", "adapter", "a")) for v in (1, 2, 3)]
    for name, path in adapters:
        yield "peft_adapter", name, frame(
            shape,
            read(*path, "adapter_config.json"),
            read(*path, "adapter_model.safetensors"),
        )
    yield "run_input", "x_2x96", bytes([96 - 1]) + input_file(2, 96)
    yield "run_input", "x_1x128", bytes([128 - 1]) + input_file(1, 128)


def main():
    for target, name, data in seeds():
        folder = os.path.join(HERE, "corpus", target)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"seed_{name}"), "wb") as f:
            f.write(data)
    for folder in sorted(glob.glob(os.path.join(HERE, "corpus", "*"))):
        print(f"{os.path.basename(folder)}: {len(os.listdir(folder))} inputs", file=sys.stderr)


if __name__ == "__main__":
    main()
