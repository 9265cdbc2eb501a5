"""bench.py on a tiny setting: the rows it reports, not the times (this machine is too noisy for those)."""
import json

import pytest
from conftest import ROOT  # noqa: F401  (puts the repository root on sys.path)

import bench


def test_bench_reports_every_compression_and_cached_decoding(capsys):
    bench.main(["--grid", "4", "--vocab", "64", "--batch", "2", "--iters", "1", "--warmup", "0", "--precision", "bf16"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    prefix = [r for r in rows if r["bench"] == "prefix"]
    assert [(r["k"], r["prefix_tokens"]) for r in prefix] == [(1, 16), (2, 4), (4, 1)]
    assert all(r["step_s"] > 0 and r["peak_gib"] is None and r["memory_vs_k1"] is None for r in prefix)  # CPU: no peak
    (decode,) = [r for r in rows if r["bench"] == "decode"]
    assert decode["tokens"] == 16 and decode["same_tokens"] is True and decode["speedup"] > 0


def test_bench_rejects_a_grid_that_k_4_cannot_divide(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--grid", "6"])
    assert e.value.code == 2 and "multiple of 4" in capsys.readouterr().err
