"""bench.py on a tiny setting: the rows it reports, not the times (this machine is too noisy for those)."""
import json

import pytest
from conftest import ROOT  # noqa: F401  (puts the repository root on sys.path)

import bench


def test_bench_reports_every_compression_and_cached_and_compiled_decoding(capsys):
    bench.main(["--grid", "4", "--vocab", "64", "--batch", "2", "--iters", "1", "--warmup", "0", "--precision", "bf16"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    prefix = [r for r in rows if r["bench"] == "prefix"]
    assert [(r["k"], r["prefix_tokens"]) for r in prefix] == [(1, 16), (2, 4), (4, 1)]
    assert all(r["step_s"] > 0 and r["peak_gib"] is None and r["memory_vs_k1"] is None for r in prefix)  # CPU: no peak
    (decode,) = [r for r in rows if r["bench"] == "decode"]
    assert decode["tokens"] == 16 and decode["same_tokens"] is True and decode["speedup"] > 0
    (compiled,) = [r for r in rows if r["bench"] == "compile"]  # unpadded words: no key mask but the cache's
    assert compiled["same_tokens"] is True and compiled["eager_tokens_per_s"] > 0 and compiled["compiled_tokens_per_s"] > 0


def test_bench_rejects_a_grid_that_k_4_cannot_divide(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--grid", "6"])
    assert e.value.code == 2 and "multiple of 4" in capsys.readouterr().err


def test_paper_bench_counts_memory_and_flops_that_fall_with_k(capsys):
    """--paper on a tiny geometry: the counted (not timed) columns are deterministic, so their order is asserted."""
    bench.main(["--paper", "--model", "toy", "--grid", "8", "--feature-dim", "32", "--text-len", "8", "--vocab", "256",
                "--batch", "1", "--iters", "1", "--warmup", "0", "--depths", "1", "2", "--full-depth", "6",
                "--memory-batch", "4"])
    captured = capsys.readouterr()
    rows = {r.get("layout", r["bench"]): r for r in map(json.loads, captured.out.splitlines())}
    assert list(rows) == ["k=1", "k=2", "k=4", "k=2 lean U_k", "k=4 lean U_k", "EditAR", "fsdp"]
    assert rows["k=4"]["memory_gib_per_layer"] < rows["k=2"]["memory_gib_per_layer"] < rows["k=1"]["memory_gib_per_layer"]
    assert rows["k=4"]["gflop_per_layer"] < rows["k=2"]["gflop_per_layer"] < rows["k=1"]["gflop_per_layer"]
    assert rows["k=2 lean U_k"]["gflop_fixed"] < rows["k=2"]["gflop_fixed"]  # U_k's 3 x 3 convolutions cost FLOPs
    assert rows["EditAR"]["memory_gib_per_layer"] == rows["k=1"]["memory_gib_per_layer"]  # the same prefix length
    assert rows["fsdp"]["fsdp_gib_per_rank"] < rows["fsdp"]["ddp_gib_per_rank"]
    assert "| k=2 lean U_k |" in captured.err  # the Markdown table
