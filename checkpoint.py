"""Reading checkpoints safely, and writing the project's own, for every loader in the project.

Official weights come as pickled `.pt/.pth/.bin` files (read with `torch.load(weights_only=True)`,
so a file can never run code), as `.safetensors`, or as Hugging Face folders (config.json plus
weights, possibly sharded). `read_checkpoint` turns any of them into a flat state dict and raises
`CheckpointError`, whose message is one line naming the path, for anything it cannot read.
The project saves safetensors only, with its configuration as JSON in the file's metadata, and
writes them atomically: a crash leaves the previous file, never half of a new one.
"""
import argparse
import json
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

# Wrapper keys of training checkpoints, in the order LlamaGen's sample scripts try them.
WRAPPER_KEYS = ("model", "module", "state_dict")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used. The message is one line and names the path."""


def read_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """State dict of a checkpoint file or Hugging Face folder, and the folder's config (else None)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        return read_hf_folder(path)
    return read_state_dict(path), None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one file, unwrapped from a training checkpoint's "model" entry if needed."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({e})") from None
    return _unwrap(_torch_load(path), path)


def read_hf_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """config.json and the weights of a `save_pretrained` folder (single file or sharded)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    for name in HF_WEIGHTS:
        if (folder / name).is_file():
            return read_state_dict(folder / name), config
        index = folder / f"{name}.index.json"
        if index.is_file():
            return _read_shards(index), config
    raise CheckpointError(f"{folder}: no {' or '.join(HF_WEIGHTS)} (or a sharded index) in the folder")


def check_state_dict(sd: dict, expected: dict, path, what: str) -> None:
    """Raise a one-line CheckpointError unless `sd` has exactly the keys and shapes of `expected`."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(expected[k])})"
             for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    problems = [f"{label} {few(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if keys]
    if problems:
        raise CheckpointError(f"{path}: does not match the {what} layout: {'; '.join(problems)}")


def few(items: list[str], n: int = 4) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _torch_load(path: Path):
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":  # zip container, or the legacy pickle format
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip container nor a pickle)")
    # Official LlamaGen training checkpoints pickle their argparse.Namespace; it only holds
    # attributes, so it is safe to allow next to tensors.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL (\S+)", str(e))  # torch's wording changes between versions; the name does not
        if refused:
            raise CheckpointError(f"{path}: refuses to run code: it pickles {refused.group(1)}, which "
                                  "torch.load(weights_only=True) never calls (re-save the state dict alone)") from None
        raise CheckpointError(f"{path}: corrupt checkpoint ({_first_line(e)})") from None
    except EOFError:
        raise CheckpointError(f"{path}: truncated checkpoint (unexpected end of file)") from None
    except RuntimeError as e:
        if "zip archive" in str(e):
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint (unreadable zip archive)") from None
        raise CheckpointError(f"{path}: corrupt checkpoint ({_first_line(e)})") from None
    except Exception as e:  # damaged bytes can fail anywhere inside the unpickler
        raise CheckpointError(f"{path}: corrupt checkpoint ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        raise CheckpointError(f"{path}: holds no tensors (top-level keys: {few([str(k) for k in obj])})")
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")


def _read_shards(index: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({type(e).__name__})") from None
    sd = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{shard_path}: shard listed in {index.name} is missing")
        sd.update(read_state_dict(shard_path))
    return sd


def save_checkpoint(path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write tensors and a JSON-able `meta` dict as one safetensors file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={"meta": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_meta(path) -> dict:
    """The `meta` dict that `save_checkpoint` stored ({} for files written by others)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file" if not path.is_dir() else f"{path}: is a directory, not a checkpoint file")
    try:
        with safe_open(path, "pt") as f:
            meta = (f.metadata() or {}).get("meta")
    except SafetensorError as e:
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({e})") from None
    if not meta:
        return {}
    try:
        meta = json.loads(meta)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: its metadata is not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its metadata is a JSON {type(meta).__name__}, not an object")
    return meta
