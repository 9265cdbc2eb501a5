"""Checkpoint reading: containers, Hugging Face folders, and one clear line for every bad file."""
import argparse
import json
import shutil

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import save_file

from checkpoint import CheckpointError, read_checkpoint
from encoder import load_dinov2

HUB_FILE = FIXTURES / "dinov2_hub" / "dinov2_vit48d4h3_pretrain.pth"
HF_FOLDER = FIXTURES / "dinov2_hf" / "dinov2-vit48d4h3"


class NotATensor:
    pass


def refuses(path, pattern):
    with pytest.raises(CheckpointError, match=pattern) as err:
        load_dinov2(path, num_heads=3)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_path(tmp_path):
    refuses(tmp_path / "nope.pth", "no such file")


def test_empty_file(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    refuses(tmp_path / "empty.pth", "empty file")


def test_truncated_file(tmp_path):
    data = HUB_FILE.read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    refuses(tmp_path / "half.pth", "truncated or corrupt")


def test_text_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pth").write_text("these are my notes, not weights\n")
    refuses(tmp_path / "notes.pth", "not a PyTorch checkpoint")


def test_pickle_refused_by_weights_only(tmp_path):
    torch.save({"model": NotATensor()}, tmp_path / "evil.pth")
    refuses(tmp_path / "evil.pth", r"refuses to run code: it pickles .*NotATensor")


def test_truncated_safetensors(tmp_path):
    data = (HF_FOLDER / "model.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[:1000])
    refuses(tmp_path / "w.safetensors", "truncated or not a safetensors file")


def test_folder_without_config(tmp_path):
    refuses(tmp_path, "no config.json")


def test_folder_without_weights(tmp_path):
    shutil.copy(HF_FOLDER / "config.json", tmp_path)
    refuses(tmp_path, "no model.safetensors or pytorch_model.bin")


def test_training_checkpoint_is_unwrapped(tmp_path):
    """{"model": sd, "args": Namespace, "steps": n} as LlamaGen's trainer writes it."""
    sd = torch.load(HUB_FILE, weights_only=True)
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-4), "steps": 10}, tmp_path / "train.pt")
    loaded, config = read_checkpoint(tmp_path / "train.pt")
    assert config is None and loaded.keys() == sd.keys()


def test_sharded_and_bin_hf_folders_read_the_same(tmp_path):
    sd, config = read_checkpoint(HF_FOLDER)
    keys = sorted(sd)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(HF_FOLDER / "config.json", sharded)
    halves = {"model-00001-of-00002.safetensors": keys[:40], "model-00002-of-00002.safetensors": keys[40:]}
    for name, part in halves.items():
        save_file({k: sd[k] for k in part}, sharded / name)
    index = {"weight_map": {k: name for name, part in halves.items() for k in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(HF_FOLDER / "config.json", binary)
    torch.save(sd, binary / "pytorch_model.bin")
    for folder in (sharded, binary):
        other, other_config = read_checkpoint(folder)
        assert other_config == config and other.keys() == sd.keys()
        assert all(torch.equal(other[k], sd[k]) for k in sd)


def test_damaged_bytes_inside_a_valid_container(tmp_path):
    data = bytearray(HUB_FILE.read_bytes())
    start = data.index(b"data.pkl") + 40  # the pickle stream of the zip container
    data[start:start + 64] = bytes(64)
    (tmp_path / "damaged.pth").write_bytes(bytes(data))
    refuses(tmp_path / "damaged.pth", "corrupt")
