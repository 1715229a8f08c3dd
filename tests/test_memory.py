"""A model takes the memory of its file: a random-weight GGUF of Qwen2.5-7B's shapes in Q4_K_M (4.4 GiB, written
by the test tensor by tensor) loads in a fresh process with peak RSS within 10% of its file plus its KV cache, its
weights served at 1.05x the file (Q4_K and Q6_K kept as stored). Slow: it writes and reads 4.4 GiB."""

from __future__ import annotations

import pytest

from turbofan.bench.memory import SHAPES, measure, model_dir

pytestmark = pytest.mark.slow


def test_a_7b_q4_k_m_loads_within_ten_percent_of_its_file_plus_kv(tmp_path):
    import shutil

    free = shutil.disk_usage(tmp_path).free
    if free < 8 << 30:  # the file is 4.4 GiB; a nearly full disk is the machine's state, not the code's
        pytest.skip(f"needs 8 GiB of free disk for a 4.4 GiB GGUF, {free / (1 << 30):.1f} GiB free")
    directory = model_dir(tmp_path, SHAPES["qwen2.5-7b"])
    r = measure(directory, 512 << 20)
    weights = sum(r["weights"].values())
    assert set(r["weights"]) <= {"q4k", "q6k", "float32"}  # the file's own blocks; never a float32 matrix
    assert r["weights"].get("float32", 0) < 1 << 20  # norms and biases only
    assert weights <= 1.05 * r["file"], weights / r["file"]  # measured 1.03
    base = r["file"] + r["kv_cache"]
    assert r["after_load"] <= 1.10 * base, r["after_load"] / base  # measured 1.08 (docs/benchmarks.md)
    assert r["after_step"] <= 1.15 * base, r["after_step"] / base  # measured 1.10
