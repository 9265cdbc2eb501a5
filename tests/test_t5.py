"""T5 text encoder: parity with transformers / LlamaGen's caption path, tokenizer ids, loading and errors."""
import json
import shutil
import sys

import pytest
import torch
from conftest import FIXTURES, save_tiny_frozen
from safetensors.torch import load_file

import data
import sample
import train
from checkpoint import CheckpointError
from encoder import clean_caption, load_t5, t5_from_state_dict

T5 = FIXTURES / "t5_hf"
REF = load_file(T5 / "reference.safetensors")
ENTRIES = json.loads((T5 / "strings.json").read_text())["entries"]
TOL = dict(rtol=0, atol=2e-5)  # the fixture README's tolerance


@pytest.fixture(scope="module")
def t5():
    return load_t5(T5)


@pytest.mark.parametrize("folder", [T5, T5 / "bin"], ids=["safetensors", "bin"])
def test_hidden_states_match_transformers(folder):
    out = load_t5(folder)(REF["input_ids"], REF["attention_mask"])
    torch.testing.assert_close(out, REF["last_hidden_state"], **TOL)  # every slot, pad positions included


def test_token_ids_equal_the_reference_tokenizer(t5):
    ids, mask = t5.tokenize([e["text"] for e in ENTRIES])
    assert torch.equal(ids, REF["raw_input_ids"]) and torch.equal(mask, REF["raw_attention_mask"])
    ids, mask = t5.tokenize([e["llamagen_text"] for e in ENTRIES])
    assert torch.equal(ids, REF["input_ids"]) and torch.equal(mask.sum(1), REF["valid_lengths"])
    by_name = {e["name"]: row for row, e in enumerate(ENTRIES)}
    assert ids[by_name["empty"]].tolist() == [1] + [0] * 119
    long = ids[by_name["long_truncated"]]
    assert long[-1] == 1 and (long != 0).all()  # cut to 119 pieces, EOS kept


def test_caption_cleaning_matches_llamagen_on_every_fixture_string():
    for e in ENTRIES:
        assert clean_caption(clean_caption(e["text"])) == e["llamagen_text"], e["name"]


def test_caption_features_are_rotated_to_the_end_and_zeroed(t5):
    embs, mask = t5.caption_features([e["text"] for e in ENTRIES])
    assert torch.equal(mask, REF["caption_masks"])
    torch.testing.assert_close(embs, REF["caption_embs"], **TOL)
    assert (embs[mask == 0] == 0).all()
    L = int(REF["valid_lengths"][2])
    torch.testing.assert_close(embs[2, -L:], REF["last_hidden_state"][2, :L], **TOL)  # order kept


def test_full_size_flan_t5_xl_layout_is_accepted():
    layout = json.loads((T5 / "full_size_keys.json").read_text())
    sd = {k: torch.empty(shape, device="meta") for k, shape in layout["keys"]}
    with torch.device("meta"):
        model = t5_from_state_dict(sd, {**layout["config"], "model_type": "t5"})
    assert model.cfg.d_model == 2048 and len(model.block) == 24
    assert sum(p.numel() for p in model.parameters()) == layout["parameter_counts"]["T5EncoderModel_unique"]
    del sd["encoder.embed_tokens.weight"]  # files written by newer transformers keep only shared.weight
    t5_from_state_dict(sd, {**layout["config"], "model_type": "t5"})


def test_errors_are_one_line(tmp_path, monkeypatch):
    folder = tmp_path / "t5"
    shutil.copytree(T5 / "bin", folder)
    with pytest.raises(CheckpointError, match="spiece.model"):
        load_t5(folder).tokenize(["a cat"])
    shutil.copy(T5 / "spiece.model", folder)
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if the package were not installed
    with pytest.raises(CheckpointError, match="pip install sentencepiece"):
        load_t5(folder).tokenize(["a cat"])
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(CheckpointError, match="'bert' model, not T5"):
        load_t5(folder)
    dino = FIXTURES / "dinov2_hf" / "dinov2-vit48d4h3"
    with pytest.raises(CheckpointError, match="'dinov2' model, not T5"):
        load_t5(dino)


# ---------------------------------------------------------------- T5 through data.py, train.py and sample.py

def edit_args(frozen, data, out, *extra):
    return ["--task", "edit", "--data", str(data), "--model", "toy", "--image-size", "32", "--batch-size", "2", "--steps", "1",
            "--dino", str(frozen / "dino.safetensors"), "--vq", str(frozen / "vq.safetensors"), "--log-every", "1",
            "--text", "t5", "--out", str(out), *extra]


def test_precomputed_features_equal_encoding_on_the_fly(tmp_path):
    frozen = save_tiny_frozen(tmp_path)
    folder = tmp_path / "edits"
    shutil.copytree(FIXTURES / "edit_folder", folder)
    train.main(edit_args(frozen, folder, tmp_path / "fly", "--t5", str(T5)))
    data.main(["t5-features", "--data", str(folder), "--t5", str(T5)])
    records = data.read_manifest(folder, ())
    assert sorted(p.name for p in (folder / "t5").glob("*.npy")) == sorted(f"{n}.npy" for n, _ in records)
    train.main(edit_args(frozen, folder, tmp_path / "pre"))  # no --t5: DATA/t5/ is read
    fly, pre = ((tmp_path / run / "log.jsonl").read_text() for run in ("fly", "pre"))
    assert json.loads(fly)["ce"] == pytest.approx(json.loads(pre)["ce"], abs=1e-5)
    emb, mask = data.read_text_features(folder / "t5" / f"{records[0][0]}.npy")
    want, want_mask = load_t5(T5).caption_features([records[0][1]["instruction"]])
    assert torch.equal(mask, want_mask[0].bool()) and torch.allclose(emb, want[0], atol=1e-6)


def test_sample_with_a_t5_model(tmp_path, capsys):
    frozen = save_tiny_frozen(tmp_path)
    train.main(edit_args(frozen, FIXTURES / "edit_folder", tmp_path / "run", "--t5", str(T5)))
    ckpt = tmp_path / "run" / "edit.safetensors"
    image = FIXTURES / "edit_folder" / "images" / "0_src.png"
    for extra in ([], ["--text", "t5", "--t5", str(T5)]):  # the folder recorded at training, or another one
        sample.main(["--image", str(image), "--prompt", "make the square green", "--ckpt", str(ckpt),
                     "--out", str(tmp_path / "out.png"), *extra])
        assert (tmp_path / "out.png").is_file()
        (tmp_path / "out.png").unlink()
    with pytest.raises(SystemExit):
        sample.main(["--image", str(image), "--prompt", "x", "--ckpt", str(ckpt), "--text", "words",
                     "--out", str(tmp_path / "out.png")])
    assert "reads text as t5, not words" in capsys.readouterr().err and not (tmp_path / "out.png").exists()
