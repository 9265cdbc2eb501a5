"""eval.py's ablation runner: every row trained, scored and printed; rows on disk reused."""
import json

import pytest
from conftest import save_tiny_frozen

import eval as evaluation


def test_ablation_runner_trains_each_row_once_and_reuses_it(tmp_path, monkeypatch, capsys):
    frozen = save_tiny_frozen(tmp_path / "frozen")
    base = ("--image-size", "32", "--batch-size", "4", "--dino", str(frozen / "dino.safetensors"),
            "--vq", str(frozen / "vq.safetensors"))
    rows = {"SCAR 4x": ("--k", "2"), "EditAR": ("--prefix", "vq", "--k", "1", "--distill")}
    folder = tmp_path / "table"
    first = evaluation.ablate("test", rows, steps=2, n=4, folder=folder, base=base)
    assert [r["row"] for r in first] == ["SCAR 4x", "EditAR"]
    assert [r["prefix_tokens"] for r in first] == [4, 64]  # DINOv2 4 x 4 compressed 2 x 2; the 8 x 8 source codes
    assert all(0 <= r["edit_success_pct"] <= 100 and r["step_time_s"] > 0 and r["parameters"] > 0 for r in first)
    assert json.loads((folder / "table.json").read_text())["rows"] == first
    monkeypatch.setattr(evaluation.train, "main", lambda argv: pytest.fail("a finished row must not train again"))
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("a scored row must not be scored again"))
    assert evaluation.ablate("test", rows, steps=2, n=4, folder=folder, base=base) == first
    table = evaluation.markdown(first)
    assert table.count("\n") == 3 and "| EditAR | 0 |" in table


def test_an_interrupted_row_resumes(tmp_path, monkeypatch):
    frozen = save_tiny_frozen(tmp_path / "frozen")
    base = ("--image-size", "32", "--batch-size", "4", "--dino", str(frozen / "dino.safetensors"),
            "--vq", str(frozen / "vq.safetensors"), "--save-every", "1")
    folder = tmp_path / "row"
    evaluation.train.main(["--task", "edit", "--steps", "1", "--out", str(folder), *base])
    (folder / "edit.safetensors").unlink()  # as if stopped after its first checkpoint
    calls = []
    real = evaluation.train.main
    monkeypatch.setattr(evaluation.train, "main", lambda argv: calls.append(argv) or real(argv))
    row = evaluation.ablation_row(folder, (), steps=2, seed=0, n=2, base=base)
    assert calls and "--resume" in calls[0] and row["prefix_tokens"] > 0
    assert [json.loads(line)["step"] for line in (folder / "log.jsonl").read_text().splitlines()][-1] == 2
