"""sample.py and eval.py end to end on a small SCAR checkpoint made by train.py, and every bad input."""
import inspect
import json

import pytest
import torch
from PIL import Image

import eval as evaluation
import sample
import train
from checkpoint import read_checkpoint, read_meta, save_checkpoint
from conftest import save_tiny_frozen
from data import ToyEdits


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """One-step SCAR models (next-token and next-scale) on tiny frozen parts, as train.py writes them."""
    folder = save_tiny_frozen(tmp_path_factory.mktemp("run"))
    out = {}
    for arch, vq_file in (("next-token", "vq"), ("next-scale", "msvq")):
        train.main(["--task", "edit", "--arch", arch, "--toy", "--image-size", "32", "--batch-size", "2", "--steps", "1",
                    "--dino", str(folder / "dino.safetensors"), "--vq", str(folder / f"{vq_file}.safetensors"),
                    "--out", str(folder / arch)])
        out[arch] = folder / arch / "edit.safetensors"
    train.main(["--task", "control", "--toy", "--image-size", "32", "--batch-size", "2", "--steps", "1",
                "--dino", str(folder / "dino.safetensors"), "--vq", str(folder / "vq.safetensors"), "--out", str(folder / "control")])
    out["control"] = folder / "control" / "control.safetensors"
    return out


@pytest.fixture()
def drawing(tmp_path):
    """A user's picture: a red disc on white, non-square, RGBA."""
    img = Image.new("RGBA", (90, 50), (255, 255, 255, 255))
    for x in range(30, 50):
        for y in range(15, 35):
            if (x - 40) ** 2 + (y - 25) ** 2 < 100:
                img.putpixel((x, y), (220, 40, 40, 255))
    img.save(tmp_path / "disc.png")
    return tmp_path / "disc.png"


@pytest.mark.parametrize("arch", ["next-token", "next-scale"])
def test_sample_writes_an_image_of_the_input_size(ckpts, drawing, tmp_path, arch):
    out = tmp_path / f"{arch}.png"
    sample.main(["--image", str(drawing), "--prompt", "make the circle blue", "--ckpt", str(ckpts[arch]),
                 "--out", str(out), "--seed", "3"])
    assert Image.open(out).size == (90, 50)
    again = tmp_path / "again.png"
    sample.main(["--image", str(drawing), "--prompt", "make the circle blue", "--ckpt", str(ckpts[arch]),
                 "--out", str(again), "--seed", "3"])
    assert again.read_bytes() == out.read_bytes()  # same seed, same image


def test_default_output_name_and_grid(ckpts, drawing):
    sample.main(["--image", str(drawing), "--prompt", "remove the circle", "--ckpt", str(ckpts["next-token"]), "--n", "4"])
    grid = drawing.with_name("disc_edited.png")
    assert Image.open(grid).size == (180, 100)  # 2 x 2 samples


@pytest.mark.parametrize("control", ["map", "canny"])
def test_controllable_generation(ckpts, drawing, tmp_path, control):
    out = tmp_path / "gen.png"
    sample.main(["--image", str(drawing), "--control", control, "--prompt", "a red circle on a white background",
                 "--ckpt", str(ckpts["control"]), "--out", str(out)])
    assert Image.open(out).size == (90, 50)


@pytest.mark.parametrize("ckpt, extra, message", [
    ("control", [], "trained for 'control': pass --control"),
    ("next-token", ["--control", "canny"], "trained for 'edit': drop --control"),
])
def test_control_flag_must_match_the_model(ckpts, drawing, tmp_path, capsys, ckpt, extra, message):
    with pytest.raises(SystemExit):
        sample.main(["--image", str(drawing), "--prompt", "a red circle", "--ckpt", str(ckpts[ckpt]),
                     "--out", str(tmp_path / "o.png"), *extra])
    assert message in capsys.readouterr().err and not (tmp_path / "o.png").exists()


def test_kv_cache_and_the_compiled_decoder_give_the_same_tokens_on_a_saved_model(ckpts):
    """Cached, recomputed and compiled decoding (padded text slots: the compiled step masks them and the empty
    cache slots in one mask) sample the same tokens."""
    model, meta = sample.load_scar(ckpts["next-token"])
    torch.nn.init.normal_(model.backbone.output.weight, std=0.5)  # one training step leaves the head near zero
    F_s = torch.randn(2, 4, 4, 64)
    ids, mask = sample.encode_words(["make the circle red", "remove the square"], model.backbone.cfg.words,
                                    model.backbone.cfg.text_len)
    assert not mask.all()
    runs = [sample.generate_tokens(model, (F_s, ids), 64, mask, cfg=3.0, top_k=8, generator=torch.Generator().manual_seed(1),
                                   **flags) for flags in ({}, {"use_cache": False}, {"compile": True})]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    assert all(layer.attention.cache is None for layer in model.backbone.layers)


def test_compile_is_refused_for_a_next_scale_model(ckpts, drawing, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        sample.main(["--image", str(drawing), "--prompt", "make the circle blue", "--ckpt", str(ckpts["next-scale"]),
                     "--out", str(tmp_path / "out.png"), "--compile"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "next-scale" in err and err.count("\n") == 1 and not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("directory", "is a directory"),
    ("unreadable", "not a readable image"),
    ("empty", "the prompt is empty"),
    ("blank", "the prompt is empty"),
    ("long", "this model reads at most 16"),
    ("unknown-word", "unknown word 'crimson'"),
    ("no-ckpt", "no such file"),
    ("foreign-ckpt", "not a SCAR checkpoint"),
    ("byte-ckpt", "cond must be 'class', 'caption' or 'words', got 'bytes'"),
    ("plausibility", "--plausibility must be between 0 and 1"),
])
def test_bad_inputs_exit_2_and_write_nothing(ckpts, drawing, tmp_path, capsys, case, message):
    image, prompt, ckpt = str(drawing), "make the circle blue", str(ckpts["next-token"])
    extra = ["--plausibility", "1.5"] if case == "plausibility" else []
    if case == "missing":
        image = str(tmp_path / "nope.png")
    if case == "directory":
        image = str(tmp_path)
    if case == "unreadable":
        (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
        image = str(tmp_path / "bad.png")
    if case == "empty":
        prompt = ""
    if case == "blank":
        prompt = "   \t"
    if case == "long":
        prompt = "make the circle blue " * 5
    if case == "unknown-word":
        prompt = "make the circle crimson"
    if case == "no-ckpt":
        ckpt = str(tmp_path / "none.safetensors")
    if case == "foreign-ckpt":
        ckpt = str(ckpts["next-token"].parent.parent / "vq.safetensors")
    if case == "byte-ckpt":  # written before the toy models read words
        tensors, meta = read_checkpoint(ckpts["next-token"])[0], read_meta(ckpts["next-token"])
        meta["backbone"]["cond"] = "bytes"
        ckpt = str(tmp_path / "old.safetensors")
        save_checkpoint(ckpt, tensors, meta)
    out = tmp_path / "out.png"
    with pytest.raises(SystemExit) as exit_:
        sample.main(["--image", image, "--prompt", prompt, "--ckpt", ckpt, "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))


def test_eval_reports_every_metric(ckpts, tmp_path, capsys):
    evaluation.main(["--bench", "toy", "--ckpt", str(ckpts["next-token"]), "--n", "4", "--batch", "2",
                     "--json", str(tmp_path / "r.json")])
    result = json.loads((tmp_path / "r.json").read_text())
    assert 0 <= result["edit_success_pct"] <= 100 and 0 < result["background_psnr_db"] <= 60
    assert 0 < result["target_psnr_db"] <= 60 and result["images_per_s"] > 0 and result["n"] == 4
    assert "edit success" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        evaluation.main(["--bench", "toy", "--ckpt", str(ckpts["next-token"]), "--plausibility", "-1"])
    assert "--plausibility must be between 0 and 1" in capsys.readouterr().err


def test_eval_on_drawings_and_the_strict_measure(ckpts, monkeypatch, capsys):
    """--bench drawn scores DrawnEdits; exact counts the outputs within 25 dB of the target: the targets
    themselves, fed back as outputs, are all exact, the sources of non-background edits are not."""
    evaluation.main(["--bench", "drawn", "--ckpt", str(ckpts["next-token"]), "--n", "4", "--batch", "2"])
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["bench"] == "drawn" and result["n"] == 4 and 0 <= result["exact_pct"] <= 100
    items = [evaluation.DrawnEdits(6, size=32)[i] for i in range(6)]
    monkeypatch.setattr(evaluation, "edit_batch", lambda *a, **k: torch.stack([it["target"] for it in items]))
    monkeypatch.setattr(evaluation, "edit_data", lambda *a, **k: items)
    perfect = evaluation.evaluate(ckpts["next-token"], n=6, batch=6)
    assert perfect["exact_pct"] == 100.0 and perfect["edit_success_pct"] == 100.0


def test_eval_varied_phrasings_reach_the_model(ckpts, capsys):
    meta = {"image_size": 32}
    data = [evaluation.edit_data("toy", meta, 8, 0, varied=v) for v in (False, True)]
    plain, varied = ([d[i]["text"] for i in range(len(d))] for d in data)
    assert plain != varied and [t.lower() for t in plain] == [t.lower().removeprefix("please ").rstrip(".!") for t in varied]
    evaluation.main(["--bench", "toy", "--ckpt", str(ckpts["next-token"]), "--n", "2", "--batch", "2", "--varied"])
    out = capsys.readouterr().out
    assert "varied phrasings" in out and json.loads(out.splitlines()[-1])["varied"] is True


def test_eval_sampling_flags_reach_the_sampler(ckpts):
    def metrics(**sampling):
        r = evaluation.evaluate(ckpts["next-token"], n=4, batch=4, **sampling)
        return r["edit_success_pct"], r["background_psnr_db"], r["target_psnr_db"]
    greedy = metrics(cfg=1.0, top_k=1)  # no guidance: the conditional argmax
    assert metrics(cfg=3.0, plausibility=1.0) == greedy  # only the conditional argmax is plausible enough
    assert metrics() != greedy
    assert evaluation.evaluate(ckpts["next-token"], n=2, batch=2, split="train", seed=7)["split"] == "train"


def test_guidance_restricted_to_plausible_codes():
    cond = torch.tensor([[5.0, 0.0, 2.9, 2.0]])
    uncond = torch.tensor([[7.0, -5.0, 0.0, 0.0]])
    logits = torch.cat([cond, uncond])
    plain = sample.guide(logits, 3.0)  # [1, 10, 8.7, 6]: the code the conditional model finds least likely wins
    assert torch.equal(plain, sample.guide(logits, 3.0, plausibility=0.0)) and plain.argmax().item() == 1
    kept = sample.guide(logits, 3.0, plausibility=0.1)  # p >= 0.1 p_max <=> logit >= 5 - ln 10 = 2.70
    assert torch.isfinite(kept).tolist() == [[True, False, True, False]] and kept.argmax().item() == 2
    torch.testing.assert_close(kept[0, [0, 2]], plain[0, [0, 2]])


def test_eval_and_sample_default_to_the_same_sampling():
    cli = vars(sample.parse_args(["--image", "x.png", "--prompt", "p"]))
    api = {name: p.default for name, p in inspect.signature(evaluation.evaluate).parameters.items()}
    for name in ("cfg", "plausibility", "top_k", "seed"):
        assert cli[name] == api[name], name


def test_token_kinds_find_the_first_token_of_each_shape():
    codes = torch.zeros(1, 4, 6, dtype=torch.long)  # background 0; a 2 x 2 shape at (1, 1), one touching it at (1, 3)
    codes[0, 1:3, 1:3] = torch.tensor([[5, 6], [7, 8]])
    codes[0, 1:3, 3:5] = torch.tensor([[9, 10], [11, 12]])
    kinds = evaluation.token_kinds(codes)
    first = torch.zeros(1, 4, 6, dtype=torch.bool)
    first[0, 1, 1] = True  # the second shape's corner has shape to its left: the raster order reached it already
    assert torch.equal(kinds["shape, first token"], first)
    assert torch.equal(kinds["background"], codes == 0)
    assert kinds["shape, rest"].sum() == 7


def test_teacher_forced_accuracy_counts_the_tokens_away_from_the_edit(ckpts, tmp_path, capsys):
    evaluation.main(["--bench", "toy", "--ckpt", str(ckpts["next-token"]), "--n", "4", "--batch", "2",
                     "--teacher-forced", "--json", str(tmp_path / "tf.json")])
    result = json.loads((tmp_path / "tf.json").read_text())
    assert set(result["teacher_forced_accuracy_pct"]) == {"background", "shape, first token", "shape, rest"}
    assert all(0 <= v <= 100 for v in result["teacher_forced_accuracy_pct"].values())
    assert 0 < sum(result["tokens"].values()) < 4 * 64  # 4 edits of 8 x 8 codes, less the edited tokens
    assert set(result["align_edit_progress_pct"]) == {ToyEdits(4, "heldout", size=32)[i]["kind"] for i in range(4)}
    out = capsys.readouterr().out
    assert "shape, first token" in out and "L_align" in out
    with pytest.raises(SystemExit):
        evaluation.main(["--bench", "toy", "--ckpt", str(ckpts["next-scale"]), "--n", "2", "--teacher-forced"])
    assert "--teacher-forced reads next-token models" in capsys.readouterr().err


def test_edit_progress_measures_how_far_H_s_goes_towards_the_target():
    P_s, P_t = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    cells = torch.tensor([[True, True, False, False], [False, True, False, True]])
    for H_s, share in ((P_s, 0.0), (P_t, 1.0), ((P_s + P_t) / 2, 0.5), (2 * P_t - P_s, 2.0)):
        along, length = evaluation.edit_progress(H_s, P_s, P_t, cells)
        assert torch.allclose(along / length, torch.full((2,), share), atol=1e-5)
    moved = P_s.clone()
    moved[:, 2] = P_t[:, 2]  # the edit made only where no cell is counted
    assert torch.allclose(evaluation.edit_progress(moved, P_s, P_t, cells)[0][0], torch.tensor(0.0))


def test_psnr_and_success_metrics():
    a = torch.zeros(1, 3, 4, 4)
    region = torch.ones(1, 1, 4, 4)
    assert evaluation.psnr(a, a, region).item() == 60.0
    assert abs(evaluation.psnr(a, a + 0.2, region).item() - 20.0) < 1e-4  # error 0.1 on [0, 1] pixels
    target, source = torch.ones(1, 3, 4, 4), -torch.ones(1, 3, 4, 4)
    assert evaluation.edit_success(target * 0.9, source, target, region).item()
    assert not evaluation.edit_success(source * 0.9, source, target, region).item()


def test_edge_sharpness_is_one_for_the_original_and_less_for_a_blur():
    img = -torch.ones(1, 3, 32, 32)
    img[:, 0, 8:24, 8:24] = 1.0  # a red square: hard edges
    blurred = torch.nn.functional.avg_pool2d(img, 3, stride=1, padding=1, count_include_pad=False)
    assert abs(evaluation.edge_sharpness(img, img).item() - 1) < 1e-6
    assert evaluation.edge_sharpness(blurred, img).item() < 0.7
    assert evaluation.edge_sharpness(torch.zeros_like(img), img).item() == 0


def test_eval_scores_a_tokenizer(ckpts, tmp_path, monkeypatch, capsys):
    """--bench vq reads a tokenizer export or the one a SCAR checkpoint names; a lossless round trip scores
    the PSNR cap and a sharpness of 1."""
    frozen = ckpts["next-token"].parent.parent
    for ckpt in (frozen / "vq.safetensors", frozen / "msvq.safetensors", ckpts["next-scale"]):
        evaluation.main(["--bench", "vq", "--ckpt", str(ckpt), "--n", "2", "--batch", "2"])
        result = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert set(result) >= {"toy", "drawn"} and all(0 < result[k]["psnr_db"] < 60 for k in ("toy", "drawn"))

    class Lossless:
        downsample = 8
        encode = decode = staticmethod(lambda x: x)
    monkeypatch.setattr(evaluation, "load_tokenizer", lambda *a: Lossless())
    result = evaluation.reconstruction(ckpts["next-token"], n=3, batch=3)
    assert result["toy"] == result["drawn"] == {"psnr_db": 60.0, "edge_sharpness": 1.0}
