"""What a model costs in memory to load and serve, measured: a random-weight GGUF of a real model's shapes and
quantization mix (Qwen2.5-7B in Q4_K_M by default, the size most local users run), loaded in a fresh process.

    python -m turbofan.bench.memory [--shapes qwen2.5-7b|qwen2.5-1.5b] [--dir /tmp/turbofan-memory] [--kv 0.5GiB]

Prints the file's size, the weights as served (by format), the KV cache, and the process's peak RSS (VmHWM) after
the load and after one forward step, with the ratio to file + KV. The GGUF is written once, tensor by tensor (its
blocks random but their scales sane), and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GIB = 1 << 30


@dataclass(frozen=True)
class Shapes:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    context: int = 32768


SHAPES = {
    "qwen2.5-7b": Shapes("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064, tied=False),
    "qwen2.5-1.5b": Shapes("qwen2.5-1.5b", 1536, 8960, 28, 12, 2, 151936, tied=False),
}

# ggml block sizes (weights, bytes) and where the fp16 scales sit in a block
_BLOCKS = {"Q4_K": (256, 144), "Q6_K": (256, 210)}
_F16_FIELDS = {"Q4_K": ((0, 0.004), (2, 0.002)), "Q6_K": ((208, 0.0005),)}


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's Q4_K_M rule: attn_v and ffn_down of these layers are stored in Q6_K."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_plan(s: Shapes) -> list[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, torch shape, ggml type) of every tensor of a Q4_K_M file of these shapes."""
    head_dim = s.hidden // s.heads
    kv = s.kv_heads * head_dim
    out = [("token_embd.weight", (s.vocab, s.hidden), "Q4_K")]
    for i in range(s.layers):
        b = f"blk.{i}."
        v_type = "Q6_K" if _more_bits(i, s.layers) else "Q4_K"
        out += [
            (b + "attn_norm.weight", (s.hidden,), "F32"),
            (b + "attn_q.weight", (s.hidden, s.hidden), "Q4_K"),
            (b + "attn_q.bias", (s.hidden,), "F32"),
            (b + "attn_k.weight", (kv, s.hidden), "Q4_K"),
            (b + "attn_k.bias", (kv,), "F32"),
            (b + "attn_v.weight", (kv, s.hidden), v_type),
            (b + "attn_v.bias", (kv,), "F32"),
            (b + "attn_output.weight", (s.hidden, s.hidden), "Q4_K"),
            (b + "ffn_norm.weight", (s.hidden,), "F32"),
            (b + "ffn_gate.weight", (s.intermediate, s.hidden), "Q4_K"),
            (b + "ffn_up.weight", (s.intermediate, s.hidden), "Q4_K"),
            (b + "ffn_down.weight", (s.hidden, s.intermediate), v_type),
        ]
    out.append(("output_norm.weight", (s.hidden,), "F32"))
    if not s.tied:
        out.append(("output.weight", (s.vocab, s.hidden), "Q6_K"))
    return out


def _data(shape: tuple[int, ...], kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "F32":
        return (1.0 + 0.01 * rng.standard_normal(shape)).astype(np.float32)
    weights, nbytes = _BLOCKS[kind]
    rows, k = shape
    raw = rng.integers(0, 256, size=(rows, k // weights, nbytes), dtype=np.uint8)
    for offset, value in _F16_FIELDS[kind]:  # random bytes there would be NaNs and infinities
        raw[..., offset : offset + 2] = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)
    return raw.reshape(rows, -1)


def write_random_gguf(path: Path, s: Shapes, seed: int = 0) -> Path:
    """A Qwen2-architecture GGUF of shapes `s`, its quantized blocks random, written one tensor at a time (the
    writer never holds the model). No vocabulary: memory tests load weights, not a tokenizer."""
    import gguf

    rng = np.random.default_rng(seed)
    plan = tensor_plan(s)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name(f"random {s.name}")
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_block_count(s.layers)
    w.add_feed_forward_length(s.intermediate)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1000000.0)
    w.add_vocab_size(s.vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    for name, shape, kind in plan:
        if kind == "F32":
            w.add_tensor_info(name, shape[::-1], np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            weights, nbytes = _BLOCKS[kind]
            byte_shape = (*shape[:-1], shape[-1] // weights * nbytes)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                              raw_dtype=gguf.GGMLQuantizationType[kind])  # fmt: skip
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _name, shape, kind in plan:
        w.write_tensor_data(_data(shape, kind, rng))
    w.close()
    return path


def model_dir(root: Path, s: Shapes) -> Path:
    """A loadable directory for the random model (the GGUF and the config.json turbofan's import writes)."""
    from turbofan.store.gguf_import import import_gguf

    directory = root / s.name
    gguf_path = directory / f"{s.name}-random-q4_k_m.gguf"
    if not (directory / "config.json").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        write_random_gguf(gguf_path, s)
        import_gguf(gguf_path, directory, progress=False, tokenizer=False)
    return directory


_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
from turbofan.model.runner import ModelRunner
from turbofan.model.batch import ForwardBatch
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
runner = ModelRunner(sys.argv[1], kv_cache_bytes=int(sys.argv[2]))
loaded = time.perf_counter() - t0
after_load = hwm()
ids = list(range(1, 65))
batch = ForwardBatch.build([ids], [0], [list(range(4))], [list(range(64))], runner.block_size)
runner.execute(batch)
print(json.dumps({"after_load": after_load, "after_step": hwm(), "load_seconds": loaded,
                  "weights": runner.model.weight_bytes(), "kv_cache": runner.kv_cache_bytes,
                  "served": runner.quantization}))
"""


def measure(directory: Path, kv_bytes: int) -> dict:
    """Peak RSS of a fresh process that loads the model (default quantization) and runs one 64-token step."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(directory), str(kv_bytes)], capture_output=True,
                          text=True, check=True, env={**os.environ, "TURBOFAN_LOG_LEVEL": "WARNING"})  # fmt: skip
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["file"] = sum(p.stat().st_size for p in directory.glob("*.gguf"))
    return result


def main(argv: list[str] | None = None) -> None:
    from turbofan import kernels
    from turbofan.config import parse_memory

    p = argparse.ArgumentParser(prog="python -m turbofan.bench.memory", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="qwen2.5-7b", choices=sorted(SHAPES))
    p.add_argument("--dir", default="/tmp/turbofan-memory", help="where the random GGUF is written (once)")
    p.add_argument("--kv", default="0.5GiB", help="KV cache budget")
    args = p.parse_args(argv)
    print(kernels.cpu_summary(), flush=True)
    directory = model_dir(Path(args.dir), SHAPES[args.shapes])
    r = measure(directory, parse_memory(args.kv))
    weights = sum(r["weights"].values())
    base = r["file"] + r["kv_cache"]
    print(f"{args.shapes} random Q4_K_M: file {r['file'] / GIB:.2f} GiB, served as {r['served']}")
    print("weights as served: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in sorted(r["weights"].items()))
          + f" = {weights / GIB:.2f} GiB ({weights / r['file']:.2f}x the file)")  # fmt: skip
    print(f"KV cache {r['kv_cache'] / GIB:.2f} GiB; load {r['load_seconds']:.1f} s")
    for key in ("after_load", "after_step"):
        print(f"peak RSS {key.replace('_', ' ')}: {r[key] / GIB:.2f} GiB = {r[key] / base:.2f}x (file + KV)")


if __name__ == "__main__":
    main()
