"""The command lines as a user drives them, in subprocesses: every malformed input is one line on stderr,
exit status 2 and nothing written; pickles that carry code never run; killed runs resume exactly; a
diverging or stalled multi-process run ends with its cause."""
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, ROOT, save_tiny_frozen
from safetensors.torch import save_file

from checkpoint import read_checkpoint, read_meta, save_checkpoint

ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def python(*argv, timeout=300, cwd=ROOT):
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=cwd, env=ENV,
                          timeout=timeout)


def tiny_train(frozen, out, *extra, steps=2):
    return ["train.py", "--task", "edit", "--toy", "--image-size", "32", "--batch-size", "4", "--steps", steps,
            "--dino", frozen / "dino.safetensors", "--vq", frozen / "vq.safetensors", "--log-every", "1", "--out", out,
            *extra]


class Payload:
    """Pickled as a call of os.system: an unrestricted unpickler would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def png_header(path, width, height):
    """A valid 1 x 1 PNG whose header claims width x height: opening it reads the size, not the pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00"))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Files the cases point at: tiny frozen parts, a one-step SCAR run (edit and control), pickles with code,
    malformed checkpoints, manifests and images."""
    root = tmp_path_factory.mktemp("reliability")
    frozen = save_tiny_frozen(root)
    for task in ("edit", "control"):
        result = python(*tiny_train(frozen, root / task, "--task", task, steps=1))
        assert result.returncode == 0, result.stderr[-2000:]
    paths = {"frozen": frozen, "ckpt": root / "edit" / "edit.safetensors", "run": root / "edit",
             "control": root / "control" / "control.safetensors", "image": FIXTURES / "edit_folder" / "images" / "0_src.png",
             "marker": root / "PAYLOAD_RAN", "root": root}
    evil = {"model": {"w": torch.zeros(1)}, "hook": Payload(paths["marker"])}
    for name in ("evil.pt", "evil.pth"):
        torch.save(evil, root / name)
    (root / "evil_t5").mkdir()
    shutil.copy(FIXTURES / "t5_hf" / "config.json", root / "evil_t5" / "config.json")
    torch.save(evil, root / "evil_t5" / "pytorch_model.bin")
    weights = read_checkpoint(paths["ckpt"])[0]
    save_file(weights, root / "meta_list.safetensors", metadata={"meta": "[1, 2]"})
    save_file(weights, root / "meta_broken.safetensors", metadata={"meta": "{not json"})
    save_checkpoint(root / "meta_lacking.safetensors", weights, {"kind": "scar", "arch": "next-token"})
    poisoned = dict(weights, **{"proj.weight": weights["proj.weight"] * float("nan")})
    save_checkpoint(root / "nan.safetensors", poisoned, read_meta(paths["ckpt"]))
    png_header(root / "huge.png", 25000, 25000)
    (root / "notes.png").write_text("not an image")
    for name, lines in {"numeric_path": ['{"source": 3, "target": "images/0_tgt.png", "instruction": "make it red"}'],
                        "null_path": ['{"source": null, "target": "images/0_tgt.png", "instruction": "make it red"}'],
                        "no_words": ['{"source": "images/0_src.png", "target": "images/0_tgt.png", "instruction": "123 !!"}'] * 4,
                        "bad_label": ['{"image": "images/0_src.png", "label": "cat"}']}.items():
        shutil.copytree(FIXTURES / "edit_folder" / "images", root / name / "images")
        (root / name / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copytree(FIXTURES / "edit_folder", root / "latin1")
    (root / "latin1" / "manifest.jsonl").write_bytes(
        b'{"source": "images/0_src.png", "target": "images/0_tgt.png", "instruction": "caf\xe9 au lait"}\n')
    (root / "a_file").write_text("x")
    return paths


SAMPLE = ["sample.py", "--image", "{image}", "--prompt", "make the square green", "--ckpt", "{ckpt}"]
EVAL = ["eval.py", "--bench", "toy", "--ckpt", "{ckpt}", "--n", "2", "--batch", "2"]
T5 = ["data.py", "t5-features", "--data", "{work}/edits", "--t5", str(FIXTURES / "t5_hf")]


def train_case(*extra):
    return ["train.py", "--task", "edit", "--toy", "--image-size", "32", "--batch-size", "4", "--steps", "1",
            "--dino", "{frozen}/dino.safetensors", "--vq", "{frozen}/vq.safetensors", "--out", "{work}/run", *extra]


def data_case(folder, *extra):
    return [a for a in train_case(*extra) if a != "--toy"] + ["--data", folder, "--model", "toy", "--batch-size", "1"]


def loader(call):
    return ["-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import model, vq, encoder; {call}"]


# (case, argv with {placeholders}, what the one line must say)
CASES = [
    ("sample: --out into a missing folder", [*SAMPLE, "--out", "{work}/missing/out.png"], "does not exist"),
    ("sample: --out onto a directory", [*SAMPLE, "--out", "{work}"], "is a directory"),
    ("sample: --out into a read-only place", [*SAMPLE, "--out", "/sys/out.png"], "cannot write in /sys"),
    ("sample: --device cuda:99", [*SAMPLE, "--device", "cuda:99", "--out", "{work}/o.png"], "--device cuda:99"),
    ("sample: unknown device", [*SAMPLE, "--device", "gpu", "--out", "{work}/o.png"], "not a device"),
    ("sample: negative seed", [*SAMPLE, "--seed", "-1", "--out", "{work}/o.png"], "--seed must be between"),
    ("sample: overflowing seed", [*SAMPLE, "--seed", str(2 ** 64), "--out", "{work}/o.png"], "--seed must be between"),
    ("sample: --cfg nan", [*SAMPLE, "--cfg", "nan", "--out", "{work}/o.png"], "--cfg must be a finite number"),
    ("sample: --cfg inf", [*SAMPLE, "--cfg", "inf", "--out", "{work}/o.png"], "--cfg must be a finite number"),
    ("sample: negative --cfg", [*SAMPLE, "--cfg", "-2", "--out", "{work}/o.png"], "--cfg must be a finite number"),
    ("sample: --temperature nan", [*SAMPLE, "--temperature", "nan", "--out", "{work}/o.png"], "--temperature must be"),
    ("sample: negative --temperature", [*SAMPLE, "--temperature", "-1", "--out", "{work}/o.png"], "--temperature must be"),
    ("sample: --top-p 0", [*SAMPLE, "--top-p", "0", "--out", "{work}/o.png"], "--top-p must be in (0, 1]"),
    ("sample: --top-p 1.5", [*SAMPLE, "--top-p", "1.5", "--out", "{work}/o.png"], "--top-p must be in (0, 1]"),
    ("sample: negative --top-k", [*SAMPLE, "--top-k", "-3", "--out", "{work}/o.png"], "--top-k must be >= 0"),
    ("sample: --n 0", [*SAMPLE, "--n", "0", "--out", "{work}/o.png"], "--n must be at least 1"),
    ("sample: --plausibility 2", [*SAMPLE, "--plausibility", "2", "--out", "{work}/o.png"], "--plausibility must be"),
    ("sample: a prompt of no word", ["sample.py", "--image", "{image}", "--prompt", "\U0001F600 123 !!", "--ckpt", "{ckpt}",
                                     "--out", "{work}/o.png"], "has no word"),
    ("sample: empty prompt", ["sample.py", "--image", "{image}", "--prompt", "  ", "--ckpt", "{ckpt}", "--out",
                              "{work}/o.png"], "the prompt is empty"),
    ("sample: metadata a JSON list", [*SAMPLE[:-1], "{root}/meta_list.safetensors", "--out", "{work}/o.png"],
     "metadata is a JSON list, not an object"),
    ("sample: metadata not JSON", [*SAMPLE[:-1], "{root}/meta_broken.safetensors", "--out", "{work}/o.png"],
     "metadata is not valid JSON"),
    ("sample: metadata lacking fields", [*SAMPLE[:-1], "{root}/meta_lacking.safetensors", "--out", "{work}/o.png"],
     "config lacks or misstates"),
    ("sample: non-finite weights", [*SAMPLE[:-1], "{root}/nan.safetensors", "--out", "{work}/o.png"],
     "non-finite weights in proj.weight"),
    ("sample: a 25000 x 25000 image", ["sample.py", "--image", "{root}/huge.png", "--prompt", "make it red", "--ckpt",
                                       "{ckpt}", "--out", "{work}/o.png"], "limit of 100 megapixels"),
    ("sample: not an image", ["sample.py", "--image", "{root}/notes.png", "--prompt", "make it red", "--ckpt", "{ckpt}",
                              "--out", "{work}/o.png"], "not a readable image"),
    ("sample: missing image", ["sample.py", "--image", "{work}/none.png", "--prompt", "make it red", "--ckpt", "{ckpt}"],
     "no such file"),
    ("sample: missing checkpoint", [*SAMPLE[:-1], "{work}/none.safetensors", "--out", "{work}/o.png"], "no such file"),
    ("sample: a control checkpoint", [*SAMPLE[:-1], "{control}", "--out", "{work}/o.png"], "pass --control"),
    ("sample: --seed abc", [*SAMPLE, "--seed", "abc", "--out", "{work}/o.png"], "invalid int value"),
    ("sample: unknown flag", [*SAMPLE, "--sharpness", "2"], "unrecognized arguments"),
    ("train: --steps 0", train_case("--steps", "0"), "--steps must be at least 1"),
    ("train: --save-every 0", train_case("--save-every", "0"), "--save-every must be at least 1"),
    ("train: --log-every 0", train_case("--log-every", "0"), "--log-every must be at least 1"),
    ("train: --image-size 0", train_case("--image-size", "0"), "--image-size must be at least 1"),
    ("train: --image-size 30", train_case("--image-size", "30"), "must be a multiple of the tokenizer's"),
    ("train: --workers -1", train_case("--workers", "-1"), "--workers must be at least 0"),
    ("train: --batch-size 0", train_case("--batch-size", "0"), "--batch-size must be at least 1"),
    ("train: negative --lr", train_case("--lr=-1e-4"), "--lr must be a positive finite number"),
    ("train: --lr nan", train_case("--lr", "nan"), "--lr must be a positive finite number"),
    ("train: overflowing --lr", train_case("--lr", "1e999"), "--lr must be a positive finite number"),
    ("train: negative seed", train_case("--seed", "-5"), "--seed must be at least 0"),
    ("train: --dist-timeout 0", train_case("--dist-timeout", "0"), "--dist-timeout must be"),
    ("train: negative --pres-weight", train_case("--pres-weight=-1"), "--pres-weight must be a finite number >= 0"),
    ("train: --text-rope identity on next-scale", train_case("--arch", "next-scale", "--text-rope", "identity"),
     "--text-rope identity is for new next-token backbones"),
    ("train: --out an existing file", [*train_case()[:-2], "--out", "{root}/a_file"], "is a file, not a folder"),
    ("train: --out not writable", [*train_case()[:-2], "--out", "/sys/scar_run"], "cannot write there"),
    ("train: --data without a backbone", ["train.py", "--task", "edit", "--data", str(FIXTURES / "edit_folder"),
                                          "--dino", "{frozen}/dino.safetensors", "--vq", "{frozen}/vq.safetensors",
                                          "--out", "{work}/run"], "--data needs a backbone"),
    ("train: a manifest path that is a number", data_case("{root}/numeric_path"), "'source' must be a path"),
    ("train: a manifest path that is null", data_case("{root}/null_path"), "'source' must be a path"),
    ("train: a manifest not in UTF-8", data_case("{root}/latin1"), "not UTF-8 text"),
    ("train: texts of no word", data_case("{root}/no_words"), "hold no word"),
    ("train: a label that is not a class id", [*data_case("{root}/bad_label")[:2], "control",
                                               *data_case("{root}/bad_label")[3:]], "'label' must be a class id"),
    ("train: --allow-changes without --resume", train_case("--allow-changes"), "--allow-changes goes with --resume"),
    ("train: unknown --task", train_case("--task", "segment"), "invalid choice"),
    ("eval: --n 0", [*EVAL, "--n", "0"], "--n must be at least 1"),
    ("eval: --batch 0", [*EVAL, "--batch", "0"], "--batch must be at least 1"),
    ("eval: --json into a missing folder", [*EVAL, "--json", "{work}/missing/r.json"], "does not exist"),
    ("eval: a control checkpoint", ["eval.py", "--bench", "toy", "--ckpt", "{control}", "--n", "2"],
     "--bench toy scores editing models"),
    ("eval: a tokenizer file", ["eval.py", "--bench", "toy", "--ckpt", "{frozen}/vq.safetensors", "--n", "2"],
     "not a SCAR checkpoint"),
    ("eval: unknown device", [*EVAL, "--device", "gpu"], "not a device"),
    ("eval: --cfg nan", [*EVAL, "--cfg", "nan"], "--cfg must be a finite number"),
    ("eval: --bench drawn --varied", [*EVAL[:2], "drawn", *EVAL[3:], "--varied"], "are for --bench toy"),
    ("t5-features: --batch 0", [*T5, "--batch", "0"], "--batch must be at least 1"),
    ("t5-features: --batch -1", [*T5, "--batch", "-1"], "--batch must be at least 1"),
    ("t5-features: a manifest not in UTF-8", ["data.py", "t5-features", "--data", "{root}/latin1", "--t5",
                                              str(FIXTURES / "t5_hf")], "not UTF-8 text"),
    ("t5-features: a missing folder", ["data.py", "t5-features", "--data", "{work}/none", "--t5", str(FIXTURES / "t5_hf")],
     "no manifest.jsonl"),
    ("load_vq: metadata a JSON list", loader("vq.load_vq(sys.argv[1])") + ["{root}/meta_list.safetensors"],
     "CheckpointError"),
    ("load_msvq: metadata a JSON list", loader("vq.load_msvq(sys.argv[1])") + ["{root}/meta_list.safetensors"],
     "CheckpointError"),
    ("load_scar: metadata a JSON list", loader("model.load_scar(sys.argv[1])") + ["{root}/meta_list.safetensors"],
     "CheckpointError"),
]

# A pickle whose loading would call os.system: every loader and entry point refuses it, and it never runs.
PICKLES = [
    ("load_dinov2", loader("encoder.load_dinov2(sys.argv[1])") + ["{root}/evil.pth"]),
    ("load_vq", loader("vq.load_vq(sys.argv[1])") + ["{root}/evil.pt"]),
    ("load_msvq", loader("vq.load_msvq(sys.argv[1])") + ["{root}/evil.pth"]),
    ("load_llamagen", loader("model.load_llamagen(sys.argv[1])") + ["{root}/evil.pt"]),
    ("load_var", loader("model.load_var(sys.argv[1])") + ["{root}/evil.pth"]),
    ("load_t5", loader("encoder.load_t5(sys.argv[1])") + ["{root}/evil_t5"]),
    ("train --dino", [*train_case()[:train_case().index("--dino") + 1], "{root}/evil.pth",
                      *train_case()[train_case().index("--dino") + 2:]]),
    ("train --vq", [*train_case()[:train_case().index("--vq") + 1], "{root}/evil.pt",
                    *train_case()[train_case().index("--vq") + 2:]]),
    ("train --init", train_case("--init", "{root}/evil.pt")),
    ("data.py --t5", ["data.py", "t5-features", "--data", "{work}/edits", "--t5", "{root}/evil_t5"]),
]


def files(folder: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def run_case(env, work, argv):
    """The command, in a folder of its own holding a copy of the edit folder; and whether nothing was written
    there or among the shared files."""
    shutil.copytree(FIXTURES / "edit_folder", work / "edits")
    before, shared = files(work), files(env["root"])
    result = python(*[a.format(work=work, **env) for a in argv])
    return result, before == files(work) and shared == files(env["root"])


@pytest.fixture(scope="module")
def outcomes(env, tmp_path_factory):
    """Every case of CASES and PICKLES run once, two at a time (each is mostly a Python start-up)."""
    cases = [(name, argv) for name, argv, *_ in CASES] + [(f"pickle: {name}", argv) for name, argv in PICKLES]
    with ThreadPoolExecutor(2) as pool:
        runs = {name: (pool.submit(run_case, env, tmp_path_factory.mktemp("case"), argv), argv) for name, argv in cases}
        return {name: (*run.result(), argv) for name, (run, argv) in runs.items()}


@pytest.mark.parametrize("name, message", [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_input_is_one_line_and_writes_nothing(outcomes, name, message):
    result, untouched, argv = outcomes[name]
    if argv[0] == "-c":  # a loader called from Python: the exception, one line, names the file
        assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("checkpoint.CheckpointError: ")
        assert untouched
        return
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert untouched, "something was written (an empty run folder included)"


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.fixture()
def read_only_data(tmp_path):
    """A data folder the process cannot write to: read-only permissions, or for root (whom permissions do not
    stop) a read-only bind mount of it."""
    folder = tmp_path / "edits"
    shutil.copytree(FIXTURES / "edit_folder", folder)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    subprocess.run(["mount", "--bind", folder, folder], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", folder], check=True)
    yield folder
    subprocess.run(["umount", folder], check=True)


def test_t5_features_into_a_read_only_folder(read_only_data):
    before = files(read_only_data)
    result = python("data.py", "t5-features", "--data", read_only_data, "--t5", FIXTURES / "t5_hf")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "cannot write the features there" in lines[0], result.stderr
    assert files(read_only_data) == before


@pytest.mark.parametrize("name", [c[0] for c in PICKLES])
def test_a_pickle_that_carries_code_is_refused_and_never_runs(env, outcomes, name):
    result, untouched, argv = outcomes[f"pickle: {name}"]
    assert result.returncode in (1, 2) and "refuses to run code: it pickles posix.system" in result.stderr, result.stderr
    assert result.stderr.count("\n") <= 1 or argv[0] == "-c", result.stderr
    assert not env["marker"].exists() and untouched


# ---------------------------------------------------------------- killed, diverged and stalled runs

DRIVER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import checkpoint, model, train
how, n, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
calls = []

def hit():  # the n-th call on the chosen rank
    calls.append(1)
    return len(calls) == n and int(os.environ.get("RANK", 0)) == rank

if how == "save":  # killed once the temp file is whole, before it replaces the checkpoint
    save_file = checkpoint.save_file
    def wrapped(tensors, path, metadata=None):
        save_file(tensors, path, metadata=metadata)
        if hit():
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save_file = wrapped
elif how in ("kill", "stop"):  # killed or stopped in the n-th forward pass
    forward = model.SCAR.forward
    def wrapped(self, *a, **k):
        if hit():
            os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        return forward(self, *a, **k)
    model.SCAR.forward = wrapped
train.main(sys.argv[4:])
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    path = tmp_path_factory.mktemp("driver") / "driver.py"
    path.write_text(DRIVER.format(root=str(ROOT)))
    return path


def weights_and_state(out):
    """Model weights and AdamW state of a run's checkpoint."""
    return {k: v for k, v in read_checkpoint(out / "checkpoint.safetensors")[0].items() if k.startswith(("model.", "optim."))}


def assert_same_run(a, b):
    wa, wb = weights_and_state(a), weights_and_state(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0, msg=k)


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = python(*tiny_train(env["frozen"], out, "--save-every", "2", steps=6))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.mark.parametrize("how, n", [("kill", 4), ("save", 2), ("save", 4)],
                         ids=["in step 4", "inside the checkpoint write of step 4", "inside the export write"])
def test_sigkill_then_resume_equals_the_uninterrupted_run(env, driver, uninterrupted, tmp_path, how, n):
    out = tmp_path / "run"
    killed = python(driver, how, n, 0, *tiny_train(env["frozen"], out, "--save-every", "2", steps=6)[1:])
    assert killed.returncode == -signal.SIGKILL
    if how == "save":
        assert list(out.glob(".*.tmp*"))  # the whole temp file a kill leaves behind
    resumed = python(*tiny_train(env["frozen"], out, "--save-every", "2", "--resume", steps=6))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(uninterrupted, out)
    assert not list(out.glob(".*.tmp*")) and (out / "edit.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the lines of the lost steps are not repeated
    full = [json.loads(line)["loss"] for line in (uninterrupted / "log.jsonl").read_text().splitlines()]
    assert [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()] == pytest.approx(full)


def test_resume_with_other_settings_is_refused_unless_allowed(env, uninterrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    before = files(out)
    refused = python(*tiny_train(env["frozen"], out, "--resume", "--lr", "5e-4", "--seed", "3", "--dropout", "0.2", steps=8))
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    for change in ("--lr 0.001 (now 0.0005)", "--seed 0 (now 3)", "--dropout 0.0 (now 0.2)", "--allow-changes"):
        assert change in lines[0]
    assert files(out) == before
    allowed = python(*tiny_train(env["frozen"], out, "--resume", "--lr", "5e-4", "--allow-changes", steps=7))
    more = python(*tiny_train(env["frozen"], out, "--resume", "--lr", "5e-4", "--save-every", "1", steps=8))  # free flags
    assert allowed.returncode == 0 and more.returncode == 0, more.stderr[-2000:]
    assert read_meta(out / "checkpoint.safetensors")["step"] == 8


def torchrun(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *map(str, argv)], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=timeout)


def test_torchrun_resume_equals_an_uninterrupted_run(env, tmp_path):
    """2 + 2 steps on two processes give the weights and AdamW state of 4 steps (each rank's RNG resumed)."""
    full, split = tmp_path / "full", tmp_path / "split"
    dropout = ("--dropout", "0.1")  # random masks on every rank: the RNG states must resume too
    for out, steps, extra in ((full, 4, ()), (split, 2, ()), (split, 4, ("--resume",))):
        result = torchrun(*tiny_train(env["frozen"], out, *dropout, *extra, steps=steps))
        assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(full, split)
    assert read_meta(split / "checkpoint.safetensors")["world"] == 2
    one = python(*tiny_train(env["frozen"], split, *dropout, "--resume", steps=5))
    assert one.returncode == 2 and "written by 2 processes; resume it with 2, not 1" in one.stderr


def test_fsdp_trains_as_ddp_and_resumes_exactly(env, tmp_path):
    """--fsdp on two processes: DDP's losses and weights within float tolerance (a reduce-scatter sums in another
    order than an all-reduce), 2 + 2 steps equal 4 exactly, and the checkpoint is DDP's file (gathered on rank 0),
    so a DDP run resumes under FSDP; bf16 weights with float32 reduction run too."""
    ddp, full, split, mixed = (tmp_path / name for name in ("ddp", "full", "split", "mixed"))
    dropout = ("--dropout", "0.1")
    fsdp = ("--fsdp",)
    for out, steps, extra in ((ddp, 4, ()), (full, 4, fsdp), (split, 2, fsdp), (split, 4, (*fsdp, "--resume")),
                              (mixed, 2, (*fsdp, "--precision", "bf16"))):
        result = torchrun(*tiny_train(env["frozen"], out, *dropout, *extra, steps=steps))
        assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(full, split)
    losses = {run: [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()] for run in (ddp, full)}
    assert losses[full] == pytest.approx(losses[ddp], rel=1e-5) and len(losses[full]) == 4
    a, b = weights_and_state(ddp), weights_and_state(full)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a if k.startswith("model."))
    assert read_meta(mixed / "checkpoint.safetensors")["step"] == 2 and (mixed / "edit.safetensors").is_file()
    result = torchrun(*tiny_train(env["frozen"], ddp, *dropout, *fsdp, "--resume", steps=5))
    assert result.returncode == 0 and read_meta(ddp / "checkpoint.safetensors")["step"] == 5, result.stderr[-3000:]
    alone = python(*tiny_train(env["frozen"], tmp_path / "alone", *fsdp))
    assert alone.returncode == 2 and alone.stderr.strip() == "error: --fsdp shards the model across processes: start the " \
        "run with torchrun" and not (tmp_path / "alone").exists()


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_dead_or_stalled_rank_ends_the_job_with_its_cause(env, driver, tmp_path, how):
    """Rank 1 is killed, or stopped (SIGSTOP), in its second forward pass: the job ends with the cause named,
    by torchrun for a death, by rank 0 within --dist-timeout for a stall (torchrun gives a stopped process 30 s
    before its SIGKILL)."""
    start = time.perf_counter()
    result = torchrun(driver, how, 2, 1, *tiny_train(env["frozen"], tmp_path / "run", "--dist-timeout", "5", steps=4)[1:],
                      timeout=120)
    elapsed = time.perf_counter() - start
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: rank 0")]
    if how == "kill":  # torchrun sees the death, names it, and may stop rank 0 before its own error surfaces
        assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: -9", result.stderr), result.stderr[-3000:]
    else:  # a stopped process never exits: rank 0's timeout is what names it
        assert len(errors) == 1, result.stderr[-3000:]
    assert all("rank 1 (last at the finiteness check of step 1)" in e for e in errors), result.stderr[-3000:]
    assert elapsed < (30 if how == "kill" else 60), elapsed
