"""Controllable generation: control models from scratch (class ids, words, T5) on both backbones, SCAR-Uni's
mix of control kinds, the control prefix under the KV cache, and eval.py's toy-control bench."""
import json
import shutil
from collections import Counter

import pytest
import torch
from conftest import FIXTURES, save_tiny_frozen
from PIL import Image

import eval as evaluation
import sample
import train
from checkpoint import read_meta
from data import BACKGROUNDS, ControlDataset, DataError, ToyControl, control_map

T5 = FIXTURES / "t5_hf"


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    return save_tiny_frozen(tmp_path_factory.mktemp("frozen"))


def control_args(frozen, out, *extra, arch="next-token", steps=2, task="control"):
    vq = "vq" if arch == "next-token" else "msvq"
    return ["--task", task, "--arch", arch, "--toy", "--image-size", "32", "--batch-size", "4", "--steps", str(steps),
            "--dino", str(frozen / "dino.safetensors"), "--vq", str(frozen / f"{vq}.safetensors"), "--log-every", "1",
            "--out", str(out), *extra]


@pytest.mark.parametrize("arch", ["next-token", "next-scale"])
@pytest.mark.parametrize("text", ["class", "words", "t5"])
def test_a_control_model_of_each_condition_kind_trains_from_scratch_and_generates(frozen, tmp_path, arch, text):
    extra = ["--text", text, *(["--t5", str(T5)] if text == "t5" else [])]
    train.main(control_args(frozen, tmp_path / "run", *extra, arch=arch))
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    ckpt = tmp_path / "run" / "control.safetensors"
    meta = read_meta(ckpt)
    cond = {"class": "class", "words": "words", "t5": "caption"}[text]
    assert meta["backbone"]["cond"] == cond and meta["control"] == ["canny"]
    if text == "class":
        assert meta["backbone"]["num_classes"] == len(BACKGROUNDS)
    scene = ToyControl(1, "heldout", size=32)[0]
    Image.fromarray(((scene["target"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(tmp_path / "in.png")
    prompt = str(scene["label"]) if text == "class" else scene["text"]
    sample.main(["--image", str(tmp_path / "in.png"), "--control", "canny", "--prompt", prompt, "--ckpt", str(ckpt),
                 "--out", str(tmp_path / "out.png")])
    assert Image.open(tmp_path / "out.png").size == (32, 32)


def test_text_class_is_refused_for_edits(frozen, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(control_args(frozen, tmp_path / "run", "--text", "class", task="edit"))
    assert "--text class is for --task control" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_class_prompt_out_of_range_is_one_line(frozen, tmp_path, capsys):
    train.main(control_args(frozen, tmp_path / "run", "--text", "class", steps=1))
    scene = ToyControl(1, size=32)[0]
    Image.fromarray(((scene["source"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(tmp_path / "map.png")
    with pytest.raises(SystemExit):
        sample.main(["--image", str(tmp_path / "map.png"), "--control", "map", "--prompt", "4",
                     "--ckpt", str(tmp_path / "run" / "control.safetensors"), "--out", str(tmp_path / "out.png")])
    assert "the prompt must be a class id, 0 to 3" in capsys.readouterr().err and not (tmp_path / "out.png").exists()


# ---------------------------------------------------------------- SCAR-Uni: several control kinds in one model

def test_toy_control_draws_each_kind_uniformly_and_gives_the_backgrounds_class():
    data = ToyControl(300, control="canny,softedge,depth")
    items = [data[i] for i in range(300)]
    counts = Counter(it["control"] for it in items)
    assert set(counts) == {"canny", "softedge", "depth"} and min(counts.values()) > 70
    for it in items[:20]:
        assert torch.equal(it["source"], control_map(it["target"], it["control"]))
        assert it["text"].endswith(f"on a {list(BACKGROUNDS)[it['label']]} background")
    assert [data[i]["control"] for i in range(20)] == [it["control"] for it in items[:20]]  # seeded per item
    assert {it["control"] for it in (ToyControl(30, control="depth")[i] for i in range(30))} == {"depth"}


@pytest.mark.parametrize("bad", ["canny,canny", "canny,edges", ""])
def test_bad_control_lists_are_one_line_errors(frozen, tmp_path, capsys, bad):
    with pytest.raises(SystemExit):
        train.main(control_args(frozen, tmp_path / "run", "--control", bad))
    assert "--control: control kinds must be distinct" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_folder_gives_each_record_the_map_of_its_drawn_kind(tmp_path):
    folder = tmp_path / "control"
    shutil.copytree(FIXTURES / "control_folder", folder)
    records = [{"image": "a.png", "caption": "a red circle", "canny": "b_control.png"},
               {"image": "b.png", "caption": "a blue square"}] * 8
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = ControlDataset(folder, size=32, control="canny,depth")
    items = [data[i] for i in range(16)]
    assert {it["control"] for it in items} == {"canny", "depth"}
    given = data.image(1, "b_control.png")
    for i, it in enumerate(items):
        if it["control"] == "depth" or i % 2:  # computed from the image
            assert torch.equal(it["source"], control_map(it["target"], it["control"]))
        else:  # the record's own Canny file
            assert torch.equal(it["source"], given)
    data.epoch = 1  # train.py's next epoch: each record's kind is drawn again
    assert [data[i]["control"] for i in range(16)] != [it["control"] for it in items]
    (folder / "manifest.jsonl").write_text(json.dumps({"image": "b.png", "control": "b_control.png", "caption": "x"}) + "\n")
    with pytest.raises(DataError, match="go under the kinds' names"):
        ControlDataset(folder, size=32, control="canny,depth")


def test_scar_uni_trains_on_a_mix_and_refuses_a_kind_it_never_saw(frozen, tmp_path, capsys):
    train.main(control_args(frozen, tmp_path / "uni", "--control", "canny,softedge"))
    ckpt = tmp_path / "uni" / "control.safetensors"
    assert read_meta(ckpt)["control"] == ["canny", "softedge"]
    scene = ToyControl(1, size=32)[0]
    Image.fromarray(((scene["target"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(tmp_path / "in.png")
    for kind in ("canny", "softedge"):
        sample.main(["--image", str(tmp_path / "in.png"), "--control", kind, "--prompt", scene["text"], "--ckpt", str(ckpt),
                     "--out", str(tmp_path / f"{kind}.png")])
        assert Image.open(tmp_path / f"{kind}.png").size == (32, 32)
    with pytest.raises(SystemExit):
        sample.main(["--image", str(tmp_path / "in.png"), "--control", "depth", "--prompt", scene["text"],
                     "--ckpt", str(ckpt), "--out", str(tmp_path / "depth.png")])
    assert "trained on canny, softedge maps, not depth" in capsys.readouterr().err
    assert not (tmp_path / "depth.png").exists()


# ---------------------------------------------------------------- decoding and scoring

def test_the_kv_cache_equals_recomputation_with_a_class_control_prefix(frozen, tmp_path):
    train.main(control_args(frozen, tmp_path / "run", "--text", "class", "--k", "2", steps=1))
    model, meta = sample.load_scar(tmp_path / "run" / "control.safetensors")
    torch.nn.init.normal_(model.backbone.output.weight, std=0.5)  # one training step leaves the head near zero
    F_s, labels = torch.randn(3, 4, 4, 64), torch.tensor([0, 2, 3])
    runs = [sample.generate_tokens(model, (F_s, labels), 16, cfg=3.0, top_k=8, generator=torch.Generator().manual_seed(1),
                                   use_cache=c) for c in (True, False)]
    assert torch.equal(runs[0], runs[1]) and len(runs[0].unique()) > 1


def test_toy_control_bench_scores_every_trained_kind_and_refuses_edit_models(frozen, tmp_path, capsys):
    train.main(control_args(frozen, tmp_path / "uni", "--control", "canny,softedge,depth", steps=1))
    ckpt = tmp_path / "uni" / "control.safetensors"
    result = evaluation.toy_control(ckpt, n=4, batch=2)
    assert list(result["by_kind"]) == ["canny", "softedge", "depth"]
    assert 0 <= result["by_kind"]["canny"]["canny_f1"] <= 1 and -1 <= result["by_kind"]["softedge"]["ssim"] <= 1
    assert result["by_kind"]["depth"]["rmse"] >= 0 and all(r["fd_toy_dinov2"] >= 0 for r in result["by_kind"].values())
    evaluation.main(["--bench", "toy-control", "--ckpt", str(ckpt), "--n", "2", "--control", "depth"])
    assert list(json.loads(capsys.readouterr().out.splitlines()[-1])["by_kind"]) == ["depth"]
    train.main(control_args(frozen, tmp_path / "canny", steps=1))
    with pytest.raises(sample.SampleError, match="trained on canny maps, not depth"):
        evaluation.toy_control(tmp_path / "canny" / "control.safetensors", n=2, kinds=["depth"])
    train.main(control_args(frozen, tmp_path / "edit", steps=1, task="edit"))
    capsys.readouterr()
    for bench, model, message in (("toy-control", tmp_path / "edit" / "edit.safetensors", "--bench toy-control scores control"),
                                  ("toy", ckpt, "--bench toy scores editing models"),
                                  ("drawn", ckpt, "--bench toy scores editing models")):
        with pytest.raises(SystemExit):
            evaluation.main(["--bench", bench, "--ckpt", str(model), "--n", "2"])
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_the_control_bench_and_sample_default_to_the_shipped_control_model():
    assert evaluation.parse_args(["--bench", "toy-control"]).ckpt == sample.DEFAULT_CONTROL_CKPT
    assert evaluation.parse_args(["--bench", "toy"]).ckpt == sample.DEFAULT_CKPT
    assert sample.parse_args(["--image", "x.png", "--prompt", "a red circle", "--control", "canny"]).ckpt == \
        sample.DEFAULT_CONTROL_CKPT


def test_condition_consistency_is_perfect_on_the_scene_itself():
    scene = ToyControl(1, "heldout", size=64)[0]["target"]
    image = (scene + 1) / 2
    for kind in ("canny", "softedge", "depth"):
        control = (control_map(scene, kind)[0] + 1) / 2
        made = None if kind == "canny" else (control_map(scene, kind)[0] + 1) / 2
        row = evaluation.condition_consistency(kind, image, control, made)
        assert row.get("canny_f1", 1.0) == 1.0 and row.get("ssim", 1.0) == pytest.approx(1.0, abs=1e-4)
        assert row.get("rmse", 0.0) == pytest.approx(0.0, abs=1e-3)
