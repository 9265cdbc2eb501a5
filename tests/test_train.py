"""train.py: exact resume, torchrun with two CPU processes (gloo), bf16, torch.compile, NaN handling."""
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, ROOT, save_tiny_frozen

import model as model_module
import sample
import train
from checkpoint import read_checkpoint, read_meta
from data import toy_vocabulary


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    return save_tiny_frozen(tmp_path_factory.mktemp("frozen"))


def args(frozen, out, *extra, arch="next-token", steps=4):
    vq = "vq" if arch == "next-token" else "msvq"
    return ["--task", "edit", "--arch", arch, "--model", "toy", "--toy", "--image-size", "32", "--batch-size", "4",
            "--steps", str(steps), "--out", str(out), "--dino", str(frozen / "dino.safetensors"),
            "--vq", str(frozen / f"{vq}.safetensors"), "--log-every", "1", "--lr", "1e-3", *extra]


def weights(out):
    return {k: v for k, v in read_checkpoint(Path(out) / "checkpoint.safetensors")[0].items() if k.startswith("model.")}


@pytest.mark.parametrize("arch", ["next-token", "next-scale"])
def test_resume_equals_uninterrupted(frozen, tmp_path, arch):
    dropout = ["--dropout", "0.1"]  # next-token: dropout's masks must resume too
    train.main(args(frozen, tmp_path / "full", *dropout, arch=arch, steps=4))
    train.main(args(frozen, tmp_path / "split", *dropout, arch=arch, steps=2))
    meta = read_meta(tmp_path / "split" / "checkpoint.safetensors")
    assert meta["step"] == 2 and meta["backbone"].get("dropout") == (0.1 if arch == "next-token" else None)
    train.main(args(frozen, tmp_path / "split", "--resume", *dropout, arch=arch, steps=4))
    full, split = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert full.keys() == split.keys()
    for k in full:
        torch.testing.assert_close(split[k], full[k], atol=1e-6, rtol=0, msg=k)
    logs = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    assert {"ce", "pres", "align", "loss", "step_time", "tokens_per_s"} <= logs[0].keys()
    resumed = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in logs], abs=1e-5)  # same data order


def test_a_run_killed_before_its_first_checkpoint_starts_its_log_again(frozen, tmp_path):
    train.main(args(frozen, tmp_path, steps=2))
    for made in ("checkpoint.safetensors", "edit.safetensors"):  # what a kill before the first save leaves: the log
        (tmp_path / made).unlink()
    train.main(args(frozen, tmp_path, steps=3))
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("arch", ["next-token", "next-scale"])
def test_editar_baseline_trains_and_edits(frozen, tmp_path, arch):
    """--prefix vq --distill: the source enters as its codes (next-scale: its f_hat), compressed 4x; L_distill is
    logged, L_align is not computed, and the export edits through sample.py's path."""
    train.main(args(frozen, tmp_path, "--prefix", "vq", "--distill", "--k", "2", arch=arch, steps=3))
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 3 and all(r["align"] == 0 and r["distill"] > 0 and r["pres"] > 0 for r in logs)
    ckpt = tmp_path / "edit.safetensors"
    scar, meta = model_module.load_scar(ckpt)
    assert meta["scar"]["prefix"] == "vq" and meta["scar"]["distill"] == 0.5
    assert "proj.weight" not in scar.state_dict() and "distill_head.weight" in scar.state_dict()
    dino, vq, _ = sample.frozen_parts(meta, ckpt, "cpu")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = sample.edit_batch(scar, meta, dino, vq, x, ["make the circle red"] * 2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_weight_decay_reaches_the_matrices_only():
    layer = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, rest = train.make_optimizer(layer, 1e-3, 0.3).param_groups
    assert decay["weight_decay"] == 0.3 and rest["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [(4, 3)] and len(rest["params"]) == 3


def test_weight_decay_flag_reaches_the_optimizer_state(frozen, tmp_path):
    train.main(args(frozen, tmp_path, "--weight-decay", "0.5", steps=1))
    groups = read_meta(tmp_path / "checkpoint.safetensors")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]


def test_toy_editing_trains_on_varied_phrasings(frozen, tmp_path):
    data = train.dataset(train.parse_args(args(frozen, tmp_path)))
    texts = [data[i]["text"] for i in range(40)]
    assert any(t[0].isupper() for t in texts) and any(t.endswith((".", "!")) for t in texts)


@pytest.mark.parametrize("toy", [True, False])
def test_the_model_stores_the_vocabulary_it_reads(frozen, tmp_path, toy):
    """--toy: every word the toy world writes; --data: the words of the folder's instructions."""
    folder = FIXTURES / "edit_folder"
    source = [] if toy else ["--data", str(folder)]
    run = [a for a in args(frozen, tmp_path, steps=1) if a != "--toy"] + (["--toy"] if toy else source)
    train.main(run + ["--batch-size", "2"])  # the folder holds 3 edits
    manifest = [json.loads(line)["instruction"] for line in (folder / "manifest.jsonl").read_text().splitlines()]
    expected = toy_vocabulary() if toy else model_module.vocabulary(manifest)
    model, meta = model_module.load_scar(tmp_path / "edit.safetensors")
    assert tuple(meta["backbone"]["words"]) == expected == model.backbone.cfg.words
    assert model.backbone.cls_embedding.embedding.num_embeddings == len(expected) + 1  # and the null id


def test_data_smaller_than_a_batch_is_a_clear_error(frozen, tmp_path, capsys):
    run = [a for a in args(frozen, tmp_path, steps=1) if a != "--toy"] + ["--data", str(FIXTURES / "edit_folder")]
    with pytest.raises(SystemExit) as exit_:
        train.main(run)  # 3 edits, batches of 4
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "3 samples give no micro-batch of 4" in err and "Traceback" not in err


def test_gradient_accumulation_advances_the_data_by_micro_batches(frozen, tmp_path):
    train.main(args(frozen, tmp_path, "--micro-batch-size", "2", steps=2))
    assert read_meta(tmp_path / "checkpoint.safetensors")["data"] == [0, 8]  # 2 steps x 2 micro-batches x 2


DRIVER = """
import sys, torch
sys.path.insert(0, {root!r})
import train
write = train.export
def export(path, model, task, run, *rest):  # every rank dumps its parameters after the last step
    torch.save({{k: v.detach().clone() for k, v in model.state_dict().items()}}, path.parent / f"rank{{run.rank}}.pt")
    write(path, model, task, run, *rest)
train.export = export
train.main(sys.argv[1:])
"""


def test_torchrun_two_cpu_processes(frozen, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT)))
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
           *args(frozen, out, "--save-every", "2", steps=3)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.safetensors", "edit.safetensors", "log.jsonl",
                                                      "rank0.pt", "rank1.pt"]
    assert read_meta(out / "checkpoint.safetensors")["step"] == 3
    assert read_meta(out / "checkpoint.safetensors")["data"] == [0, 6]  # per rank: 3 steps x micro-batch 2


def test_torchrun_two_nodes_with_c10d_rendezvous(frozen, tmp_path):
    """Multi-node as on a cluster (README: Training), here two launchers of one process each on this machine:
    `torchrun --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d --rdzv-endpoint HOST:PORT`; the two ranks end
    with the same weights."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT)))
    out = tmp_path / "nodes"
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend",
           "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "scar-test", str(driver),
           *args(frozen, out, steps=2)]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [node.communicate(timeout=600) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), results[0][1][-3000:] + results[1][1][-3000:]
    rank0, rank1 = torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert read_meta(out / "checkpoint.safetensors")["step"] == 2


@pytest.mark.parametrize("arch", ["next-token", "next-scale"])
def test_activation_checkpointing_trains_the_same_weights(frozen, tmp_path, arch):
    """--checkpointing recomputes each block in backward, dropout masks included: the same run, the same weights."""
    train.main(args(frozen, tmp_path / "plain", "--dropout", "0.1", arch=arch, steps=2))
    train.main(args(frozen, tmp_path / "recomputed", "--dropout", "0.1", "--checkpointing", arch=arch, steps=2))
    plain, recomputed = weights(tmp_path / "plain"), weights(tmp_path / "recomputed")
    assert all(torch.allclose(plain[k], recomputed[k], atol=1e-6) for k in plain)


def test_checkpointing_keeps_fewer_activations():
    """What autograd saves for backward while a checkpointed forward runs is a fraction of the plain forward's."""
    torch.manual_seed(0)
    backbone = model_module.NextTokenTransformer(model_module.gpt_config("toy", vocab_size=64, cond="class"))
    scar = model_module.SCAR(model_module.SCARConfig(feature_dim=8, feature_grid=4, k=1), backbone)
    batch = dict(F_s=torch.randn(2, 4, 4, 8), F_t=torch.randn(2, 4, 4, 8), text=torch.tensor([1, 2]),
                 codes=torch.randint(0, 64, (2, 64)))

    def saved_bytes(checkpointing):
        backbone.checkpointing, sizes = checkpointing, []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t, lambda t: t):
            scar(**batch)["loss"]
        return sum(sizes)
    assert saved_bytes(True) < 0.5 * saved_bytes(False)


def test_bf16_path_runs(frozen, tmp_path):
    train.main(args(frozen, tmp_path, "--precision", "bf16", steps=2))
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)


def test_compile_path_runs(frozen, tmp_path):
    train.main(args(frozen, tmp_path, "--compile", steps=2))
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and logs[1]["loss"] < logs[0]["loss"] * 1.5


def test_non_finite_loss_stops_and_keeps_a_checkpoint_that_resumes(frozen, tmp_path, monkeypatch, capsys):
    """A NaN loss at step 3: nothing of step 3 is applied, and the checkpoint kept is step 1's, the last whose
    weights gave a finite next step (step 2's would have been validated by step 3)."""
    forward, calls = model_module.SCAR.forward, []

    def poisoned(self, *a, **kw):
        out = forward(self, *a, **kw)
        calls.append(1)
        return dict(out, loss=out["loss"] * float("nan")) if len(calls) == 3 else out

    monkeypatch.setattr(model_module.SCAR, "forward", poisoned)
    with pytest.raises(SystemExit) as exit_:
        train.main(args(frozen, tmp_path, "--save-every", "1", steps=5))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "non-finite loss or gradients at step 3" in err and "loss=nan" in err
    assert "(step 1) is kept and resumes" in err
    assert read_meta(tmp_path / "checkpoint.safetensors")["step"] == 1
    assert not list(tmp_path.glob(".*tmp*")) and not (tmp_path / "edit.safetensors").exists()
    monkeypatch.undo()
    train.main(args(frozen, tmp_path, "--resume", "--save-every", "1", steps=5))
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_divergence_keeps_a_checkpoint_that_resumes_and_trains(frozen, tmp_path, capsys):
    """A learning rate of 100 blows the loss up to 1e13, 1e16, 1e19, then inf: the checkpoint kept holds weights
    that gave a finite step, so a resume with a sane learning rate trains on."""
    with pytest.raises(SystemExit) as exit_:
        train.main(args(frozen, tmp_path, "--save-every", "1", "--lr", "100", steps=20))
    assert exit_.value.code == 2 and "non-finite loss or gradients" in capsys.readouterr().err
    kept = read_meta(tmp_path / "checkpoint.safetensors")["step"]
    assert kept >= 1 and all(torch.isfinite(v).all() for v in weights(tmp_path).values())
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert max(r["loss"] for r in logs) > 1e6  # it did diverge
    train.main(args(frozen, tmp_path, "--resume", "--allow-changes", "--lr", "1e-4", steps=kept + 3))
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs][-3:] == [kept + 1, kept + 2, kept + 3]
    assert all(math.isfinite(r["loss"]) for r in logs) and all(torch.isfinite(v).all() for v in weights(tmp_path).values())


def test_resume_without_checkpoint_is_a_clear_error(frozen, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(args(frozen, tmp_path, "--resume"))
    assert exit_.value.code == 2 and "no checkpoint in" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [("--dropout", "1", "--dropout must be in [0, 1), got 1.0"),
                                                  ("--weight-decay", "-0.1", "--weight-decay must be >= 0, got -0.1")])
def test_regularisation_out_of_range_is_a_clear_error(frozen, tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_:
        train.main(args(frozen, tmp_path / "run", flag, value))
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_toy_stages_export_what_the_loaders_read(tmp_path, monkeypatch):
    """--task encoder and --task vq write files that load_dinov2 / load_vq / load_msvq accept."""
    from encoder import load_dinov2
    from vq import load_msvq, load_vq
    monkeypatch.setattr(train, "SEED_IMAGES", 64)  # the k-means of 8192 images' patches takes minutes
    train.main(["--task", "encoder", "--toy", "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "enc")])
    assert load_dinov2(tmp_path / "enc" / "encoder.safetensors").cfg.patch_size == 8
    train.main(["--task", "vq", "--toy", "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "vq")])
    assert load_vq(tmp_path / "vq" / "vq.safetensors").cfg == train.PatchVQConfig()
    train.main(["--task", "vq", "--arch", "next-scale", "--toy", "--steps", "1", "--batch-size", "2",
                "--out", str(tmp_path / "msvq")])
    patch_nums = read_meta(tmp_path / "msvq" / "vq.safetensors")["patch_nums"]
    assert load_msvq(tmp_path / "msvq" / "vq.safetensors", patch_nums=patch_nums).cfg.patch_nums == tuple(patch_nums)


def test_toy_tokenizer_resumes_with_its_seeded_centroids(tmp_path, monkeypatch):
    """--task vq --arch next-token seeds PatchVQ's centroids once, at the start; a resumed run reads them
    from the checkpoint and ends where an uninterrupted run does."""
    monkeypatch.setattr(train, "SEED_IMAGES", 64)
    run = lambda out, steps, *extra: train.main(["--task", "vq", "--toy", "--steps", str(steps), "--batch-size", "2",
                                                 "--out", str(tmp_path / out), "--log-every", "1", "--save-every", "2",
                                                 *extra])
    run("full", 3)
    run("split", 2)
    monkeypatch.setattr(train.PatchVQ, "seed", lambda *a: pytest.fail("a resumed run must not seed again"))
    run("split", 3, "--resume")
    full, split = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert all(torch.equal(full[k], split[k]) for k in full) and full["model.centroids"].abs().sum() > 0


def test_codebook_init_starts_alike_codes_alike():
    """A new backbone's embedding and head start as the centroids' principal coordinates: with fewer pixel values
    than the width, distances between rows are the centroids' distances, scaled to the std-0.02 rows' norm."""
    torch.manual_seed(0)
    centroids = torch.rand(64, 12)  # a PatchVQ of 2 x 2 patches
    centroids[1] = centroids[0]
    backbone = model_module.NextTokenTransformer(model_module.gpt_config("toy", vocab_size=64, cond="class"))
    train.codebook_init(backbone, centroids)
    rows = backbone.tok_embeddings.weight
    assert torch.equal(rows, backbone.output.weight) and torch.equal(rows[0], rows[1])
    assert rows.norm(dim=1).mean().item() == pytest.approx(0.02 * 128 ** 0.5, rel=1e-5)
    ratio = torch.pdist(rows.double())[1:] / torch.pdist(centroids.double())[1:]  # pair (0, 1) is at distance 0
    assert ratio.std() / ratio.mean() < 1e-5


def test_init_from_an_official_backbone_on_labelled_control_data(tmp_path, capsys):
    """--init with the official-format c2i GPT: class labels condition it, the new SCAR parts are reported."""
    folder = tmp_path / "control"
    shutil.copytree(FIXTURES / "control_folder", folder)
    (folder / "manifest.jsonl").write_text('{"image": "a.png", "label": 1}\n{"image": "b.png", "label": 7}\n')
    train.main(["--task", "control", "--arch", "next-token", "--data", str(folder), "--image-size", "32",
                "--init", str(FIXTURES / "llamagen_gpt_c2i" / "checkpoint.pt"),
                "--dino", str(FIXTURES / "dinov2_hf" / "dinov2-vit48d4h3"), "--vq", str(FIXTURES / "llamagen_vq" / "checkpoint.pt"),
                "--batch-size", "2", "--steps", "2", "--log-every", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    reported = err.split("newly initialised: ")[1].split("\n")[0].split("\r")[0].split(", ")
    assert {"null_prefix", "proj.weight", "compressor.conv.weight", "compressor.up.0.weight"} <= set(reported)
    assert not any(name.startswith("backbone.") for name in reported)
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    assert read_meta(tmp_path / "run" / "control.safetensors")["backbone"]["cond"] == "class"


def test_fp16_export_loads_as_float32(frozen, tmp_path):
    train.main(args(frozen, tmp_path, "--export-dtype", "fp16", steps=1))
    exported = read_checkpoint(tmp_path / "edit.safetensors")[0]
    assert {v.dtype for v in exported.values() if v.is_floating_point()} == {torch.float16}
    model, _ = model_module.load_scar(tmp_path / "edit.safetensors")
    trained = weights(tmp_path)  # the training checkpoint keeps float32
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, trained[f"model.{k}"], atol=1e-3, rtol=1e-3)


def test_bf16_trains_on_the_codes_and_features_of_float32(tmp_path, monkeypatch):
    """--precision bf16 autocasts the trained model only: the shipped toy encoder and tokenizer give the step
    the same F_s, F_t and Z_t as in float32 (under bf16 autocast most of the toy VQ's codes would change)."""
    seen, forward = {}, model_module.SCAR.forward

    def spy(self, F_s, F_t, text, codes, text_mask=None, inputs=None):
        seen.setdefault(torch.is_autocast_enabled("cpu"), (F_s, F_t, codes))
        return forward(self, F_s, F_t, text, codes, text_mask, inputs)

    monkeypatch.setattr(model_module.SCAR, "forward", spy)
    for precision in ("fp32", "bf16"):
        train.main(["--task", "edit", "--steps", "1", "--batch-size", "16", "--precision", precision,
                    "--out", str(tmp_path / precision)])
    (F_s, F_t, codes), (F_s16, F_t16, codes16) = seen[False], seen[True]
    assert F_s.dtype == F_s16.dtype == torch.float32
    assert torch.equal(codes16, codes) and torch.equal(F_s16, F_s) and torch.equal(F_t16, F_t)


def test_the_missions_command_trains_the_toy_editor_with_the_shipped_parts():
    """`train.py --task edit` alone: the toy world, the shipped encoder and tokenizer, the toy recipe, runs/."""
    a = train.parse_args(["--task", "edit"])
    assert a.toy and a.model == "toy" and a.image_size == 64 and a.out == Path("runs/edit_next_token")
    assert a.dino == train.SHIPPED / "encoder" / "encoder.safetensors" and a.vq == train.SHIPPED / "vq" / "vq.safetensors"
    assert (a.steps, a.lr, a.schedule, a.dropout, a.weight_decay) == (4000, 1e-3, "cosine", 0.0, 0.5)
    given = train.parse_args(["--task", "edit", "--lr", "3e-4", "--dropout", "0.1"])
    assert (given.lr, given.dropout, given.steps) == (3e-4, 0.1, 4000)  # what the user gives wins
    scale = train.parse_args(["--task", "edit", "--arch", "next-scale", "--vq", "runs/toy/msvq/vq.safetensors"])
    assert (scale.steps, scale.weight_decay, scale.dropout) == (4000, 0.5, 0.0)  # one recipe for both backbones
    assert train.parse_args(["--task", "vq"]).lr == 1e-4  # the toy recipe is SCAR's


@pytest.mark.parametrize("arch, sizes", [("next-token", (512, 448)), ("next-scale", (256, 224))])
def test_a_data_folder_takes_the_papers_sizes_and_needs_a_backbone(arch, sizes, capsys):
    base = ["--task", "edit", "--arch", arch, "--data", "d", "--dino", "x", "--vq", "y"]
    a = train.parse_args([*base, "--model", "toy"])
    assert not a.toy and (a.image_size, a.dino_size) == sizes and (a.steps, a.lr, a.dropout) == (1000, 1e-4, 0.1)
    assert train.parse_args([*base, "--model", "toy", "--image-size", "128"]).dino_size == 0  # explicit: rounded down
    with pytest.raises(SystemExit):
        train.parse_args(base)
    assert "--data needs a backbone: --model SIZE" in capsys.readouterr().err


def test_a_folder_with_long_instructions_gets_the_word_slots_it_needs(frozen, tmp_path):
    folder = tmp_path / "long"
    shutil.copytree(FIXTURES / "edit_folder", folder)
    long = " ".join(["make the purple square a big triangle"] * 4)  # 28 words, more than the toy's 16 slots
    (folder / "manifest.jsonl").write_text(
        json.dumps({"source": "images/0_src.png", "target": "images/0_tgt.png", "instruction": long}) + "\n")
    run = [a for a in args(frozen, tmp_path / "run", steps=1) if a != "--toy"] + ["--data", str(folder), "--batch-size", "1"]
    train.main(run)
    assert read_meta(tmp_path / "run" / "edit.safetensors")["backbone"]["text_len"] == 28


def test_lean_reconstruction_head_trains_from_the_command_line(frozen, tmp_path):
    train.main(args(frozen, tmp_path / "lean", "--pres-head", "lean", "--k", "2", steps=2))  # the toy recipe's k = 1 has no U_k
    w = weights(tmp_path / "lean")
    assert w["model.compressor.up.0.weight"].shape == (4 * 64, 64, 1, 1)  # 1x1 conv C -> 4C of the tiny DINOv2's C
    assert read_meta(tmp_path / "lean" / "edit.safetensors")["scar"]["pres_head"] == "lean"
