"""eval.py's ablation runner (every row trained, scored and printed; rows on disk reused) and PIE-Bench metrics."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES, save_tiny_frozen, seeded_weights
from PIL import Image
from safetensors.torch import load_file

from data import CONTROLS, canny
from encoder import load_dinov2

import eval as evaluation


def test_ablation_runner_trains_each_row_once_and_reuses_it_across_tables(tmp_path, monkeypatch, capsys):
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
    shared = evaluation.ablate("other", {"k = 2": ("--k", "2")}, steps=2, n=4, folder=tmp_path / "other", base=base)
    assert shared[0] | {"row": "SCAR 4x"} == first[0]  # a row another table trained is reused under its own label
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


# ---------------------------------------------------------------- PIE-Bench

PIE = FIXTURES / "pie_bench"  # a three-record folder in PIE-Bench's layout (tests/fixtures/pie_bench/make.py)


def test_rle_mask_decodes_runs_and_marks_the_border_as_the_protocol():
    mask = evaluation.rle_mask([8, 3, 26, 2], side=6)  # cells 8-10 and 26-27 of a 6 x 6 image
    inner = mask[1:-1, 1:-1]
    assert inner.sum() == 5 and mask[1, 2:5].all() and mask[4, 2:4].all()
    assert mask[0].all() and mask[-1].all() and mask[:, 0].all() and mask[:, -1].all()


def test_ssim_matches_torchmetrics_as_pie_bench_ran_it():
    ref = load_file(PIE / "ssim_reference.safetensors")
    assert torch.allclose(evaluation.ssim(ref["a"], ref["b"]), ref["ssim_torchmetrics_1_3_2"], atol=1e-5)
    assert torch.allclose(evaluation.ssim(ref["a"], ref["a"]), torch.ones(2))


def off_by(source, d=8 / 255):  # channel 0 moved by exactly d everywhere, away from the nearer end of [0, 1]
    out = source.clone()
    out[0] = torch.where(source[0] < 0.5, source[0] + d, source[0] - d)
    return out


def save_png(x, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)


def test_pie_bench_scores_the_unedited_part_as_the_protocol(tmp_path):
    """PSNR and MSE of known noise: both images times the unedited mask, then the whole-image mean, so the
    edit region and the border count as equal pixels. The record edited everywhere has nothing to score."""
    records = json.loads((PIE / "mapping_file.json").read_text())
    expected = {}
    for key, r in records.items():
        source = evaluation.read_rgb(PIE / "annotation_images" / r["image_path"])
        save_png(off_by(source), (tmp_path / r["image_path"]).with_suffix(".png"))  # sample.py's PNG is found too
        keep = (~evaluation.rle_mask(r["mask"])).float()
        if keep.sum():
            expected[r["editing_type_id"]] = (8 / 255) ** 2 * keep.sum().item() / (3 * 512 * 512)
    result = evaluation.pie_bench(PIE, tmp_path)
    assert (result["n"], result["with_unedited_part"], result["resized"]) == (3, 2, 0)
    assert set(result["by_type"]) == {"random", "change object", "change style"}
    assert all(v is None for v in result["by_type"]["change style"].values())  # edited everywhere: nothing to score
    for kind, name in (("0", "random"), ("1", "change object")):
        row = result["by_type"][name]
        assert row["mse"] == pytest.approx(expected[kind] * 1e4, rel=1e-4)
        assert row["psnr"] == pytest.approx(10 * math.log10(1 / expected[kind]), rel=1e-4)
        assert 0 < row["ssim"] < 100 and row["lpips"] is None and row["structure_distance"] is None
    assert result["total"]["mse"] == pytest.approx(sum(expected.values()) / 2 * 1e4, rel=1e-4)


def test_pie_bench_resizes_a_smaller_prediction_and_says_so(tmp_path):
    records = json.loads((PIE / "mapping_file.json").read_text())
    for r in records.values():
        source = evaluation.read_rgb(PIE / "annotation_images" / r["image_path"])
        save_png(F.interpolate(source[None], size=(256, 256), mode="area")[0], tmp_path / r["image_path"])
    result = evaluation.pie_bench(PIE, tmp_path)
    assert result["resized"] == 3 and result["total"]["psnr"] > 20


@pytest.mark.parametrize("case, message", [
    ("no mapping", "mapping_file.json: no such file"),
    ("missing predictions", "2 of 3 edited images are missing under"),
    ("no --pred", "--bench pie needs --data DIR and --pred PRED_DIR"),
    ("FID on PIE-Bench", "--inception, --dino and --pred-control are for --bench control"),
    ("not a CLIP folder", "config.json")])
def test_pie_bench_user_mistakes_are_one_line(tmp_path, capsys, case, message):
    records = json.loads((PIE / "mapping_file.json").read_text())
    first = next(iter(records.values()))["image_path"]
    save_png(evaluation.read_rgb(PIE / "annotation_images" / first), tmp_path / "pred" / first)
    argv = {"no mapping": ["--data", str(tmp_path), "--pred", str(tmp_path / "pred")],
            "missing predictions": ["--data", str(PIE), "--pred", str(tmp_path / "pred")],
            "no --pred": ["--data", str(PIE)],
            "FID on PIE-Bench": ["--data", str(PIE), "--pred", str(tmp_path / "pred"), "--inception", "x.pth"],
            "not a CLIP folder": ["--data", str(PIE), "--pred", str(tmp_path / "pred"), "--clip", str(PIE)]}[case]
    with pytest.raises(SystemExit) as e:
        evaluation.main(["--bench", "pie", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1


def test_structure_distance_matches_the_protocol_with_official_dino_weights():
    """A DINO (v1) hub file loads (no LayerScale, no mask token); its last block's keys and the structure distance
    of two images match the official ViT run through the protocol's steps (tests/fixtures/dino_v1/make.py)."""
    dino = evaluation.load_dinov2(FIXTURES / "dino_v1" / "dino_vit_tiny8.pth", num_heads=3)
    ref = load_file(FIXTURES / "dino_v1" / "reference.safetensors")
    source, edited = (ref[k].float() / 255 for k in ("source", "edited"))
    assert dino.cfg.v1 and dino.cfg.patch_size == 8 and dino.cfg.pos_grid == 28
    keys = evaluation.last_block_keys(dino, source)
    assert torch.allclose(keys, ref["source_keys"], atol=1e-4, rtol=1e-4)
    distance = evaluation.structure_distance(dino, source, edited)
    assert distance == pytest.approx(ref["structure_distance"].item(), rel=1e-4)
    assert evaluation.structure_distance(dino, source, source) == 0


def test_pie_bench_reports_structure_distance_for_every_record(tmp_path):
    """Over all records, also the one edited everywhere, which has no background to score."""
    dino = evaluation.load_dinov2(FIXTURES / "dino_v1" / "dino_vit_tiny8.pth", num_heads=3)
    for r in json.loads((PIE / "mapping_file.json").read_text()).values():
        save_png(evaluation.read_rgb(PIE / "annotation_images" / r["image_path"]), tmp_path / r["image_path"])
    result = evaluation.pie_bench(PIE, tmp_path, dino)
    assert result["by_type"]["change style"]["structure_distance"] is not None
    assert result["by_type"]["change style"]["psnr"] is None
    assert 0 <= result["total"]["structure_distance"] < 1  # the copies differ by JPEG's rounding only


def test_lpips_matches_torchmetrics_with_official_format_weights():
    """torchvision's squeezenet1_1 features and the lpips package's linear layers (random, tests/fixtures/lpips)."""
    lpips = evaluation.load_lpips(FIXTURES / "lpips" / "squeezenet1_1_features.pth", FIXTURES / "lpips" / "squeeze.pth")
    ref = load_file(FIXTURES / "lpips" / "reference.safetensors")
    with torch.no_grad():
        assert torch.allclose(lpips(ref["a"], ref["b"]), ref["lpips"], rtol=1e-4, atol=1e-7)
        assert torch.equal(lpips(ref["a"], ref["a"]), torch.zeros(2))


def test_pie_bench_lpips_compares_the_masked_images(tmp_path):
    """Outside the edit only: an output that differs from the source inside the mask alone scores 0."""
    lpips = evaluation.load_lpips(FIXTURES / "lpips" / "squeezenet1_1_features.pth", FIXTURES / "lpips" / "squeeze.pth")
    g = torch.Generator().manual_seed(0)
    source = torch.rand(3, 64, 64, generator=g)
    keep = torch.ones(64, 64)
    keep[10:30, 20:50] = 0
    inside = source.clone()
    inside[:, 10:30, 20:50] = 1 - inside[:, 10:30, 20:50]
    assert evaluation.unedited_metrics(source, inside, keep, lpips)["lpips"] == 0
    assert evaluation.unedited_metrics(source, off_by(source), keep, lpips)["lpips"] > 0


def test_clip_score_matches_torchmetrics_with_a_hugging_face_folder():
    """CLIP's BPE ids and torchmetrics' CLIPScore (tests/fixtures/clip_hf: a tiny random CLIP, its vocabulary
    cut down): lower-casing, punctuation, an apostrophe, digits and the processor's bicubic resize."""
    clip = evaluation.load_clip(FIXTURES / "clip_hf")
    ref = load_file(FIXTURES / "clip_hf" / "reference.safetensors")
    prompts = json.loads((FIXTURES / "clip_hf" / "prompts.json").read_text())
    for prompt, ids in zip(prompts, ref["input_ids"]):
        tokens = clip.tokenizer.encode(prompt)
        assert tokens == ids[:len(tokens)].tolist()
    for seed, prompt, expected in zip(ref["seeds"].numpy(), prompts, ref["clip_score"].tolist()):
        image = torch.from_numpy(np.array(Image.fromarray(seed).resize((512, 512), Image.BICUBIC))).permute(2, 0, 1)
        assert clip.score(image, prompt) == pytest.approx(expected, abs=1e-3)


def test_pie_bench_with_every_network(tmp_path):
    """All seven numbers come out; the edited-region CLIP score sees black outside the mask."""
    nets = dict(dino=evaluation.load_dinov2(FIXTURES / "dino_v1" / "dino_vit_tiny8.pth", num_heads=3),
                lpips=evaluation.load_lpips(FIXTURES / "lpips" / "squeezenet1_1_features.pth", FIXTURES / "lpips" / "squeeze.pth"),
                clip=evaluation.load_clip(FIXTURES / "clip_hf"))
    for r in json.loads((PIE / "mapping_file.json").read_text()).values():
        save_png(off_by(evaluation.read_rgb(PIE / "annotation_images" / r["image_path"])), tmp_path / r["image_path"])
    result = evaluation.pie_bench(PIE, tmp_path, **nets)
    assert all(v is not None for v in result["by_type"]["random"].values())
    style = result["by_type"]["change style"]  # edited everywhere: both CLIP scores see the whole image
    assert style["clip_whole"] == pytest.approx(style["clip_edited"], abs=1e-6) and style["psnr"] is None
    random = result["by_type"]["random"]
    assert random["clip_whole"] != pytest.approx(random["clip_edited"], abs=1e-3)


# ---------------------------------------------------------------- FID


def test_fid_inception_matches_pytorch_fid(tmp_path):
    """pytorch-fid's weights file layout (torchvision's names, its 1008-class fc too) with seeded weights: the
    same pool3 features as pytorch-fid's InceptionV3 (tests/fixtures/fid/make.py)."""
    shapes = {k: v.shape for k, v in evaluation.FIDInception().state_dict().items() if not k.endswith("num_batches_tracked")}
    shapes.update({"fc.weight": (1008, 2048), "fc.bias": (1008,)})
    torch.save(seeded_weights(shapes), tmp_path / "pt_inception.pth")
    model = evaluation.load_inception(tmp_path / "pt_inception.pth")
    ref = load_file(FIXTURES / "fid" / "reference.safetensors")
    with torch.no_grad():
        assert torch.allclose(model(ref["images"]), ref["features"], rtol=1e-4, atol=1e-5)


def test_frechet_distance_matches_pytorch_fid_and_the_closed_form():
    ref = load_file(FIXTURES / "fid" / "reference.safetensors")
    assert evaluation.frechet_distance(ref["a"], ref["b"]) == pytest.approx(ref["frechet"].item(), rel=1e-6)
    assert evaluation.frechet_distance(ref["a"], ref["a"]) == pytest.approx(0, abs=1e-9)
    # Two sets whose sample means and covariances are exactly mu and diag(s^2): FD = |mu|^2 + sum (s_a - s_b)^2.
    base = torch.tensor([[1.0, 1], [1, -1], [-1, 1], [-1, -1]], dtype=torch.float64) * (3 / 4) ** 0.5
    a, b = base * torch.tensor([1.0, 2.0]), base * torch.tensor([3.0, 0.5]) + torch.tensor([1.0, -2.0])
    assert evaluation.frechet_distance(a, b) == pytest.approx(5 + (1 - 3) ** 2 + (2 - 0.5) ** 2, rel=1e-9)


# ---------------------------------------------------------------- controllable generation


def control_folder(tmp_path):
    """Two captioned images, one with its Canny map as a file, one whose map the bench computes."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes((FIXTURES / "control_folder" / name).read_bytes())
    edges = canny(evaluation.read_rgb(folder / "b.png") * 2 - 1)
    save_png(edges.expand(3, -1, -1), folder / "b_canny.png")
    (folder / "manifest.jsonl").write_text(json.dumps({"image": "a.png", "caption": "a cat on the grass"}) + "\n" +
                                           json.dumps({"image": "b.png", "control": "b_canny.png", "caption": "the dog"}) + "\n")
    return folder


def test_control_bench_scores_generated_images(tmp_path):
    """The real images as the generated ones: Canny F1 1, FID and FD-DINOv2 0; shifted by two pixels, less."""
    data, pred = control_folder(tmp_path), tmp_path / "pred"
    for name in ("a.png", "b.png"):
        save_png(evaluation.read_rgb(data / name), pred / name)
    inception = evaluation.FIDInception()
    inception.load_state_dict(seeded_weights({k: v.shape for k, v in inception.state_dict().items()
                                              if not k.endswith("num_batches_tracked")}), strict=False)
    nets = dict(inception=inception.eval(), dino=load_dinov2(save_tiny_frozen(tmp_path / "frozen") / "dino.safetensors"),
                clip=evaluation.load_clip(FIXTURES / "clip_hf"))
    same = evaluation.control_bench(data, pred, "canny", **nets)
    assert same["canny_f1"] == 1 and same["ssim"] == pytest.approx(1, abs=1e-4)
    assert abs(same["fid"]) < 1e-6 and abs(same["fd_dinov2"]) < 1e-6 and 0 <= same["clip_score"] <= 100
    for name in ("a.png", "b.png"):
        save_png(evaluation.read_rgb(data / name).roll(2, dims=2), pred / name)
    shifted = evaluation.control_bench(data, pred, "canny", **nets)
    assert shifted["canny_f1"] < 0.9 and shifted["fid"] > 0 and shifted["rmse"] is None


@pytest.mark.parametrize("kind, key, perfect, within", [("softedge", "ssim", 1.0, 0.01), ("depth", "rmse", 0.0, 0.5)])
def test_control_bench_reads_the_users_annotator_maps(tmp_path, kind, key, perfect, within):
    """Soft edges and depth need an annotator network: the maps of the generated images come from a folder."""
    data, pred, maps = control_folder(tmp_path), tmp_path / "pred", tmp_path / "maps"
    manifest = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    for r in manifest:
        save_png(evaluation.read_rgb(data / r["image"]), pred / r["image"])
        control = evaluation.read_rgb(data / r["control"]) if "control" in r else \
            CONTROLS[kind](evaluation.read_rgb(data / r["image"]) * 2 - 1).expand(3, -1, -1)
        save_png(control, maps / r["image"])
    result = evaluation.control_bench(data, pred, kind, pred_controls=maps)
    assert result[key] == pytest.approx(perfect, abs=within)  # the maps were stored in 8 bits
    assert result["canny_f1"] is None and result["fid"] is None
    assert evaluation.control_bench(data, pred, kind)[key] is None  # no annotator maps: not computed


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_alexnet_and_vgg16_match_torchmetrics(tmp_path, net):
    """The other two backbones the lpips package ships linear layers for, from torchvision-named state dicts
    (seeded weights: tests/fixtures/lpips/make.py seeded_reference)."""
    model = evaluation.LPIPS(net)
    shapes = {k: v.shape for k, v in model.features.state_dict().items()}
    shapes = {f"features.{k}": v for k, v in shapes.items()}
    shapes.update({f"lin{i}.model.1.weight": lin.weight.shape for i, lin in enumerate(model.lins)})
    weights = seeded_weights(shapes)
    torch.save({k: v for k, v in weights.items() if k.startswith("features.")}, tmp_path / "backbone.pth")
    torch.save({k: v for k, v in weights.items() if k.startswith("lin")}, tmp_path / "lin.pth")
    lpips = evaluation.load_lpips(tmp_path / "backbone.pth", tmp_path / "lin.pth")
    ref = load_file(FIXTURES / "lpips" / "reference.safetensors")
    with torch.no_grad():
        assert torch.allclose(lpips(ref["a"], ref["b"]), ref[f"lpips_{net}"], rtol=1e-4, atol=1e-8)


def test_edge_f1_of_known_maps():
    target = torch.zeros(4, 4)
    target[1, :] = 1  # four edge pixels
    pred = torch.zeros(4, 4)
    pred[1, :2] = 1
    pred[3, 0] = 1  # two hits, one false edge: precision 2/3, recall 2/4
    assert evaluation.edge_f1(pred, target) == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert evaluation.edge_f1(torch.zeros(4, 4), torch.zeros(4, 4)) == 1


def test_an_unreadable_prediction_is_one_line(tmp_path, capsys):
    for r in json.loads((PIE / "mapping_file.json").read_text()).values():
        (tmp_path / r["image_path"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / r["image_path"]).write_bytes(b"not an image")
    with pytest.raises(SystemExit) as e:
        evaluation.main(["--bench", "pie", "--data", str(PIE), "--pred", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cannot read the image" in err and err.count("\n") == 1
