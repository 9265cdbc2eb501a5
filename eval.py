"""Metrics: a SCAR checkpoint on the toy world's held-out edits, drawings and control maps; PIE-Bench's and the
control benchmarks' on generated images.

    python eval.py --bench toy --ckpt checkpoints/toy/edit_next_token/edit.safetensors

For each held-out edit (source, instruction, ground-truth target, edit mask) the model edits the
source, and per image:
    edit success      inside the edit region the output is closer (MSE) to the target than to the source
    background PSNR   outside the edit region, output vs source (what must not change)
    target PSNR       the whole output vs the ground-truth target
    exact             the share of edits whose target PSNR is at least 25 dB (the toy's targets are exact, and
                      edit success alone passes outputs that move, drop or redraw what the edit leaves alone)
PSNRs are computed per image on [0, 1] pixels (capped at 60 dB for identical images) and averaged.

    python eval.py --bench drawn

measures the same on pictures drawn with PIL's ImageDraw, not the generator (data.DrawnEdits): shapes
anywhere at radii of 5-18 % of the side, anti-aliased, every colour a little off the palette.

    python eval.py --bench vq --ckpt runs/toy/vq/vq.safetensors

scores a tokenizer alone (a toy export, or the one a SCAR checkpoint names) on the sources and targets of
the held-out toy edits and of the drawings: whole-image reconstruction PSNR, and edge sharpness (the
reconstruction's gradient magnitude on the original's edge pixels over the original's: 1 = as sharp,
a blur less, ringing more).

    python eval.py --bench toy --ckpt CKPT --teacher-forced

(next-token) says where a model fails rather than how much: the share of target codes it predicts
(argmax) given the true previous ones, on the tokens the edit leaves alone, by kind: background, a
shape's first token (a shape token with background to its left and above, the first the raster order
reaches: only the source can announce it), and the rest of a shape (which its first token implies).
It also says whether Semantic Alignment Guidance does its job: by edit kind, how far the hidden states H_s
go from the source's P_s towards the target's P_t on the prefix cells the edit touches (0 % = H_s copies
the source, 100 % = it reaches the target semantics; edit_progress).

    python eval.py --bench toy-control

scores a control model (default: the shipped one) on held-out toy scenes, for each control kind it was trained on (toy_control): the
paper's condition consistency (Canny F1; SSIM of soft edges; RMSE of depth), PSNR against the scene the map
was made from, and a Frechet distance to the real scenes in the toy DINOv2's features. Editing benches refuse
control models and this one refuses editing models.

    python eval.py --bench toy --ckpt CKPT --split train --seed 7

measures the same on edits of the training distribution: with a seed other than training's (0), scenes the
model never saw, but (edit, shape, colour) triples it did; the held-out split's triples are all new.

    python eval.py --bench pie --data PIE_DIR --pred PRED_DIR --out results.json

scores edited images on PIE-Bench (the paper's Table 3) as its protocol's evaluation code does (PnPInversion's
evaluation/): PRED_DIR holds each record's edited image at the record's image_path (or the same name as a PNG),
and outside the record's edit mask (run-length decoded, its border counted as edited) PSNR, MSE (x 10^4) and SSIM
(x 10^2) compare it with the source, by editing type and in total; with --lpips also LPIPS (x 10^3, SqueezeNet)
there, with --dino-v1 the structure distance (x 10^3) of the whole images, and with --clip the CLIP similarity
(CLIPScore, 100 x cosine) of the target prompt with the whole edited image and with its edited region. A metric
whose network is not given is null.

    python eval.py --bench control --data DIR --pred PRED_DIR --control canny --inception pt_inception.pth

scores controllable generation (the paper's Tables 1 and 2) on a control folder (manifest.jsonl, README: Data):
FID with --inception (pytorch-fid's network and definition) and FD-DINOv2 with --dino (the same distance on
DINOv2's class token at 224 px) of the generated images against the folder's images, CLIPScore of the captions
with --clip, and condition consistency: Canny F1 and SSIM of the generated images' Canny edges (OpenCV's 100 / 200)
against the condition; for soft edges SSIM and for depth RMSE (0-255) of the maps your annotator made of the
generated images (--pred-control: this code has no HED or depth network). A generated image of another size
is resized (bicubic) to its real image's for the condition.

    python eval.py --ablate compression

trains every row of one of the paper's ablations on the toy world (train.py, the toy recipe, the same
--steps and seed for every row, next-token), scores each on the held-out split and prints the table as
Markdown and JSON (also runs/ablate/<table>/table.json; --runs moves it). Rows are trained in
runs/ablate/rows/, named by the flags they change, so a row two tables share is trained once; a row whose
export exists is reused, one with a checkpoint is resumed, so an interrupted table continues where it stopped.
Tables (ABLATIONS):
    compression   the paper's Table 4: resize / unshuffle / conv+resize, each with and without L_pres, k = 2;
                  and conv+resize with the lean U_k (--pres-head lean)
    ratio         Table 5: k = 1, 2, 4
    prefix        Table 7 and Fig. 1d: EditAR (VQ prefix, L_distill), VQ prefix 4x, SCAR 1x and 4x; two seeds
    alignment     Fig. 7: delta = 0, 0.3, 0.5, 1
    attention     the bidirectional prefix vs plain causal attention (the released code), text rotary
                  rows zero (LlamaGen) vs identity
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from checkpoint import CheckpointError, check_state_dict, read_checkpoint, read_meta
from data import CONTROLS, DataError, DrawnEdits, ToyControl, ToyEdits, canny, read_manifest
from encoder import IMAGENET_MEAN, IMAGENET_STD, load_clip, load_dinov2
import train
from model import load_scar
from vq import load_msvq, load_vq
from sample import (DEFAULT_CKPT, DEFAULT_CONTROL_CKPT, PLAUSIBILITY, SampleError, check_control, check_device,
                    check_sampling, edit_batch, frozen_parts, source_condition, text_condition, tokenizer_of)

MAX_PSNR = 60.0
EXACT_PSNR = 25.0  # the strict measure: an output within this PSNR of the exact target, over the whole image
EDGE = 0.25  # edge pixels: a gradient magnitude above this, on [-1, 1] pixels (a flat side of a shape is ~1-3)


def psnr(a, b, region):  # a, b (B, 3, H, W) in [-1, 1], region (B, 1, H, W) in {0, 1} -> (B,)
    err = ((a - b) / 2).pow(2) * region
    mse = err.sum((1, 2, 3)) / (3 * region.sum((1, 2, 3))).clamp(min=1)
    return (10 * torch.log10(1 / mse.clamp(min=10 ** (-MAX_PSNR / 10)))).clamp(max=MAX_PSNR)


def edit_success(out, source, target, mask):  # (B,) bool
    to_target = ((out - target).pow(2) * mask).sum((1, 2, 3))
    to_source = ((out - source).pow(2) * mask).sum((1, 2, 3))
    return to_target < to_source


def edit_data(bench: str, meta: dict, n: int, seed: int, split="heldout", varied=False):
    """The first n edits a bench scores: the toy world's split (`varied`: instructions phrased as users type
    them, data.vary), or drawings made outside the generator (data.DrawnEdits)."""
    if bench == "drawn":
        return DrawnEdits(n, size=meta["image_size"], seed=seed)
    return ToyEdits(n, split, size=meta["image_size"], seed=seed, varied=varied)


def edit_batches(data, batch: int, device):
    """(items, source, target, mask) of every edit of `data`, `batch` at a time, with a progress bar."""
    for first in tqdm(range(0, len(data), batch), desc="edits"):
        items = [data[i] for i in range(first, min(len(data), first + batch))]
        yield items, *(torch.stack([it[k] for it in items]).to(device) for k in ("source", "target", "mask"))


def load_editor(ckpt: Path):
    """A SCAR editing model and its config; a control model cannot be scored on edits."""
    model, meta = load_scar(ckpt)
    if meta["task"] != "edit":
        raise SampleError(f"{ckpt}: a {meta['task']} model; --bench toy scores editing models")
    return model, meta


@torch.no_grad()
def evaluate(ckpt: Path, n=200, batch=25, cfg=3.0, top_k=0, seed=0, device="cpu", plausibility=PLAUSIBILITY,
             split="heldout", varied=False, bench="toy") -> dict:
    model, meta = load_editor(ckpt)
    model = model.to(device)
    dino, vq, t5 = frozen_parts(meta, ckpt, device)
    generator = torch.Generator(device).manual_seed(seed)
    success, background, target_psnr, kinds = [], [], [], []
    start = time.perf_counter()
    for items, source, target, mask in edit_batches(edit_data(bench, meta, n, seed, split, varied), batch, device):
        out = edit_batch(model, meta, dino, vq, source, [it["text"] for it in items], cfg, top_k=top_k, generator=generator,
                         t5=t5, plausibility=plausibility)
        success.append(edit_success(out, source, target, mask))
        background.append(psnr(out, source, 1 - mask))
        target_psnr.append(psnr(out, target, torch.ones_like(mask)))
        kinds += [it["kind"] for it in items]
    seconds = time.perf_counter() - start
    success, background, target_psnr = torch.cat(success).float(), torch.cat(background), torch.cat(target_psnr)
    per_kind = {k: round(100 * success[[i for i, kk in enumerate(kinds) if kk == k]].mean().item(), 1)
                for k in sorted(set(kinds))}
    return {"checkpoint": str(ckpt), "arch": meta["arch"], "bench": bench, "split": split, "varied": varied, "n": n,
            "cfg": cfg, "plausibility": plausibility, "top_k": top_k,
            "seed": seed, "edit_success_pct": round(100 * success.mean().item(), 1),
            "exact_pct": round(100 * (target_psnr >= EXACT_PSNR).float().mean().item(), 1),
            "background_psnr_db": round(background.mean().item(), 2), "target_psnr_db": round(target_psnr.mean().item(), 2),
            "images_per_s": round(n / seconds, 2), "edit_success_by_kind_pct": per_kind}


@torch.no_grad()
def toy_control(ckpt: Path, n=200, batch=25, cfg=3.0, top_k=0, seed=0, device="cpu", plausibility=PLAUSIBILITY,
                kinds=None) -> dict:
    """A control model on n held-out toy scenes for each control kind it was trained on (or `kinds`): the
    paper's condition consistency (Canny F1 of the output's Canny edges against the input map; SSIM and RMSE
    (0-255) of the toy's own soft-edge and depth maps of the output against the input map, data.CONTROLS), the
    PSNR against the scene the map was made from, and the Frechet distance of the outputs to the scenes in the
    toy DINOv2's mean patch features (FD-DINOv2 with the toy encoder; its class token is not trained)."""
    model, meta = load_scar(ckpt)
    if meta["task"] != "control":
        raise SampleError(f"{ckpt}: trained for {meta['task']!r}; --bench toy-control scores control models")
    kinds = kinds or meta.get("control", list(CONTROLS))
    for kind in kinds:
        check_control(kind, meta, ckpt)
    model = model.to(device)
    dino, vq, t5 = frozen_parts(meta, ckpt, device)
    by_class = model.backbone.cfg.cond == "class"
    generator = torch.Generator(device).manual_seed(seed)
    result = {"checkpoint": str(ckpt), "arch": meta["arch"], "bench": "toy-control", "n": n, "cfg": cfg,
              "plausibility": plausibility, "top_k": top_k, "seed": seed,
              "condition": "class" if by_class else meta["text"]["kind"], "by_kind": {}}
    for kind in kinds:
        data, rows, scores, feats = ToyControl(n, "heldout", size=meta["image_size"], seed=seed, control=kind), [], [], ([], [])
        for first in tqdm(range(0, n, batch), desc=kind):
            items = [data[i] for i in range(first, min(n, first + batch))]
            source, target = (torch.stack([it[k] for it in items]).to(device) for k in ("source", "target"))
            prompts = [str(it["label"]) if by_class else it["text"] for it in items]
            out = edit_batch(model, meta, dino, vq, source, prompts, cfg, top_k=top_k, generator=generator, t5=t5,
                             plausibility=plausibility).clamp(-1, 1)
            scores.append(psnr(out, target, torch.ones_like(target[:, :1])))
            for store, img in zip(feats, (target, out)):
                store.append(dino.features(img).float().mean((1, 2)))
            for o, s in zip(out.cpu(), source.cpu()):
                made = None if kind == "canny" else CONTROLS[kind](o)
                rows.append(condition_consistency(kind, (o + 1) / 2, (s[0] + 1) / 2, made))
        row = {key: round(statistics.fmean(r[key] for r in rows), 4) for key in rows[0]}
        row |= {"target_psnr_db": round(torch.cat(scores).mean().item(), 2),
                "fd_toy_dinov2": round(frechet_distance(torch.cat(feats[0]), torch.cat(feats[1])), 4)}
        result["by_kind"][kind] = row
    return result


def load_tokenizer(ckpt: Path, device):
    """A toy tokenizer export (train.py --task vq), or the tokenizer a SCAR checkpoint names."""
    meta = read_meta(ckpt)
    if "task" in meta:  # only the tokenizer: a T5 model's text encoder is not needed here
        return tokenizer_of(meta, ckpt, device)
    if meta.get("kind") == "msvq":
        return load_msvq(ckpt, patch_nums=tuple(meta["patch_nums"])).to(device)
    if meta.get("kind") == "vq":
        return load_vq(ckpt).to(device)
    raise SampleError(f"{ckpt}: neither a tokenizer nor a SCAR checkpoint")


def gradient(x):  # (B, 3, H, W) -> (B, H - 1, W - 1) colour gradient magnitude
    dy, dx = x[:, :, 1:, 1:] - x[:, :, :-1, 1:], x[:, :, 1:, 1:] - x[:, :, 1:, :-1]
    return (dy.pow(2) + dx.pow(2)).sum(1).sqrt()


def edge_sharpness(recon, img):  # (B, 3, H, W) x2 -> (B,)
    g, g_recon = gradient(img), gradient(recon)
    edges = g > EDGE
    return (g_recon * edges).sum((1, 2)) / (g * edges).sum((1, 2)).clamp(min=1e-8)


@torch.no_grad()
def reconstruction(ckpt: Path, n=200, batch=25, seed=0, device="cpu") -> dict:
    """The tokenizer's round trip (encode, decode) on the n held-out toy edits' and n drawings' images."""
    vq = load_tokenizer(ckpt, device)
    size = vq.downsample * 8  # the toy tokenizers' 8 x 8 latent grid: 64 px
    result = {"checkpoint": str(ckpt), "bench": "vq", "n": n, "seed": seed}
    for name, data in (("toy", ToyEdits(n, "heldout", size=size, seed=seed)), ("drawn", DrawnEdits(n, size=size, seed=seed))):
        scores, sharp = [], []
        for _, source, target, _ in edit_batches(data, batch, device):
            img = torch.cat([source, target])
            recon = vq.decode(vq.encode(img)).clamp(-1, 1)
            scores.append(psnr(recon, img, torch.ones_like(img[:, :1])))
            sharp.append(edge_sharpness(recon, img))
        result[name] = {"psnr_db": round(torch.cat(scores).mean().item(), 2),
                        "edge_sharpness": round(torch.cat(sharp).mean().item(), 3)}
    return result


def token_kinds(codes):
    """Masks (B, h, w) bool of background, first-of-shape and rest-of-shape tokens of source codes (B, h, w);
    the background is each image's most frequent code."""
    shape = codes != codes.flatten(1).mode(1).values[:, None, None]
    left, above = F.pad(shape, (1, 0))[:, :, :-1], F.pad(shape, (0, 0, 1, 0))[:, :-1]
    first = shape & ~left & ~above
    return {"background": ~shape, "shape, first token": first, "shape, rest": shape & ~first}


def edit_progress(H_s, P_s, P_t, cells):  # (B, L_c, D) x3, cells (B, L_c) bool -> two (B,)
    """How far H_s goes from P_s towards P_t on the cells, as a projection onto the edit's direction:
    returns <H_s - P_s, P_t - P_s> and |P_t - P_s|^2 summed over the cells (ratio 0 = the source, 1 = the target)."""
    edit = (P_t - P_s) * cells[..., None]
    return ((H_s - P_s) * edit).sum((1, 2)), edit.pow(2).sum((1, 2))


@torch.no_grad()
def teacher_forced(ckpt: Path, n=200, batch=25, seed=0, device="cpu", split="heldout") -> dict:
    model, meta = load_editor(ckpt)
    if meta["arch"] != "next-token":
        raise SampleError(f"{ckpt}: --teacher-forced reads next-token models, this one is {meta['arch']}")
    model = model.to(device)
    dino, vq, t5 = frozen_parts(meta, ckpt, device)
    right, count, along, length = {}, {}, {}, {}
    semantic = meta["scar"].get("prefix") != "vq"  # the EditAR baseline has no P_t to go towards
    for items, source, target, mask in edit_batches(edit_data("toy", meta, n, seed, split), batch, device):
        text, text_mask = text_condition(model, [it["text"] for it in items], t5, device)
        codes = vq.encode(target)  # (B, h, w)
        prefix = model.prefix((source_condition(meta, dino, vq, source), text), text_mask)
        H = model.backbone.hidden(prefix, codes.flatten(1))
        hit = model.backbone.predict(H, prefix).argmax(-1).view_as(codes) == codes
        if semantic:
            Pk_t = model.compressor(dino.features(target, meta["dino"]["layers"], meta["dino"]["size"]).float())
            P_s, P_t = prefix.h[:, :prefix.n_image], model.proj(Pk_t.flatten(1, 2))  # (B, L_c, D)
            touched = F.adaptive_max_pool2d(mask, Pk_t.shape[1:3]).flatten(1) > 0  # (B, L_c)
            num, den = edit_progress(H[:, :prefix.n_image], P_s, P_t, touched)
            for b, it in enumerate(items):
                along[it["kind"]] = along.get(it["kind"], 0) + num[b].item()
                length[it["kind"]] = length.get(it["kind"], 0) + den[b].item()
        kept = F.max_pool2d(mask, vq.downsample)[:, 0] == 0  # tokens the edit does not touch
        for kind, where in token_kinds(vq.encode(source)).items():
            right[kind] = right.get(kind, 0) + (hit & where & kept).sum().item()
            count[kind] = count.get(kind, 0) + (where & kept).sum().item()
    return {"checkpoint": str(ckpt), "split": split, "n": n, "seed": seed, "prefix_tokens": prefix.n_image,
            "teacher_forced_accuracy_pct": {k: round(100 * right[k] / max(1, count[k]), 1) for k in right},
            "tokens": count,
            "align_edit_progress_pct": {k: round(100 * along[k] / length[k], 1) for k in sorted(length) if length[k] > 0}}


# ---------------------------------------------------------------- the ablation runner

SCAR_4X = ("--k", "2")  # every row starts from the paper's SCAR: 4x compression
ABLATIONS = {
    "compression": {f"{kind}{'' if w else ', w/o L_pres'}": (*SCAR_4X, "--compressor", kind, "--pres-weight", str(w))
                    for kind in ("resize", "unshuffle", "conv+resize") for w in (1, 0)}
                   | {"conv+resize, lean U_k": (*SCAR_4X, "--pres-head", "lean")},
    "ratio": {f"k = {k} ({k * k}x)": ("--k", str(k)) for k in (1, 2, 4)},
    "prefix": {"EditAR: VQ prefix 1x + L_distill": ("--prefix", "vq", "--k", "1", "--distill"),
               "VQ prefix 4x": ("--prefix", "vq", "--k", "2"),
               "SCAR: semantic prefix 1x": ("--k", "1"),
               "SCAR: semantic prefix 4x": SCAR_4X},
    "alignment": {f"delta = {d:g}": (*SCAR_4X, "--delta", str(d)) for d in (0, 0.3, 0.5, 1.0)},
    "attention": {f"{mask}, text rotary {rope}": (*SCAR_4X, *(("--causal",) if mask == "causal" else ()),
                                                  "--text-rope", rope)
                  for mask in ("bidirectional prefix", "causal") for rope in ("zero", "identity")},
}
SEEDS = {"prefix": (0, 1)}  # the SCAR-vs-EditAR rows run twice
ABLATION_DIR = Path("runs/ablate")
ABLATION_STEPS = 1000


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")


def ablation_row(folder: Path, flags, steps: int, seed: int, n: int, base=()) -> dict:
    """Train (or resume, or reuse) one row in `folder` and score it: held-out edits, teacher-forced first
    tokens, step time, prefix length, parameters (kept in folder/row.json)."""
    export, scored = folder / "edit.safetensors", folder / "row.json"
    if scored.is_file() and export.is_file():
        return json.loads(scored.read_text())
    if not export.is_file():
        resume = ("--resume",) if (folder / "checkpoint.safetensors").is_file() else ()
        train.main(["--task", "edit", "--arch", "next-token", "--steps", str(steps), "--seed", str(seed), "--out",
                    str(folder), *base, *flags, *resume])
    model, _ = load_scar(export)
    logs = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    result, forced = evaluate(export, n=n, seed=0), teacher_forced(export, n=n, seed=0)
    row = {"seed": seed, "edit_success_pct": result["edit_success_pct"], "exact_pct": result["exact_pct"],
            "background_psnr_db": result["background_psnr_db"], "target_psnr_db": result["target_psnr_db"],
            "first_token_pct": forced["teacher_forced_accuracy_pct"].get("shape, first token", 0.0),
            "step_time_s": round(statistics.median(r["step_time"] for r in logs), 3),
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in logs), 1),
            "prefix_tokens": forced["prefix_tokens"], "parameters": sum(p.numel() for p in model.parameters())}
    write_json(scored, row)
    return row


def row_folder(folder: Path, flags, steps: int, seed: int, base=()) -> Path:
    """Where a row is trained: named by the training settings it changes, so a row that several tables share
    (SCAR at 4x is in all five) is trained once, in folder/../rows/."""
    scar = ["--task", "edit", "--arch", "next-token", "--steps", str(steps), "--seed", str(seed), *base]
    row, default = vars(train.parse_args([*scar, *flags])), vars(train.parse_args(scar))
    changed = "_".join(f"{name}_{row[name]}" for name in sorted(row) if row[name] != default[name])
    return folder.parent / "rows" / slug(f"{changed or 'toy_recipe'}_seed{seed}_{steps}steps")


def ablate(table: str, rows: dict, steps: int, n: int, folder: Path, seeds=(0,), base=()) -> list[dict]:
    """Every row of `rows` (label -> train.py flags) at every seed; writes folder/table.json."""
    results = []
    for label, flags in rows.items():
        for seed in seeds:
            run = row_folder(folder, flags, steps, seed, base)
            results.append({"row": label, "flags": " ".join(flags), **ablation_row(run, flags, steps, seed, n, base)})
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "table.json", {"table": table, "steps": steps, "n": n, "rows": results})
    return results


def write_json(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # written whole or not at all
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def markdown(results: list[dict]) -> str:
    head = ("| row | seed | edit success | exact | background PSNR | PSNR vs target | first tokens (teacher-forced) "
            "| step time | tokens / s | prefix tokens | parameters |\n|" + "---|" * 11)
    lines = [f"| {r['row']} | {r['seed']} | {r['edit_success_pct']:.1f} % | {r['exact_pct']:.1f} % | "
             f"{r['background_psnr_db']:.2f} dB | {r['target_psnr_db']:.2f} dB | {r['first_token_pct']:.1f} % | "
             f"{r['step_time_s']:.2f} s | {r['tokens_per_s']:.0f} | {r['prefix_tokens']} | {r['parameters'] / 1e6:.2f} M |"
             for r in results]
    return "\n".join([head, *lines])


# ---------------------------------------------------------------- FID: pytorch-fid's Inception and the Frechet distance

class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x):  # FID's Inception leaves the zero padding out of its 3x3 averages (TF's default)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(cin, 48, 1), BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv2d(cin, 64, 1), BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3, self.branch_pool = BasicConv2d(96, 96, 3, padding=1), BasicConv2d(cin, pool, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv2d(cin, 64, 1), BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = BasicConv2d(cin, c7, 1), BasicConv2d(c7, c7, **row), BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = BasicConv2d(cin, c7, 1), BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = BasicConv2d(c7, c7, **row), BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5, self.branch_pool = BasicConv2d(c7, 192, **row), BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(cin, 192, 1), BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """FID's Mixed_7b pools by average (zero padding left out), its Mixed_7c by maximum (`max_pool`)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = BasicConv2d(384, 384, (1, 3), padding=(0, 1)), BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv2d(cin, 448, 1), BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = BasicConv2d(384, 384, (1, 3), padding=(0, 1)), BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """pytorch-fid's Inception v3 (the TF FID graph's weights, pt_inception-2015-12-05-6726825d.pth): images in
    [0, 1] resized to 299 px (bilinear, no antialiasing), scaled to [-1, 1], to the 2048-d pool3 features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = BasicConv2d(3, 32, 3, stride=2), BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = BasicConv2d(32, 64, 3, padding=1), BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = InceptionD(768), InceptionE(1280, False), InceptionE(2048, True)

    def forward(self, images):  # (B, 3, H, W) in [0, 1] -> (B, 2048)
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3))


def load_inception(path: Path) -> FIDInception:
    """From pytorch-fid's weights file (its 1008-class `fc` is not needed for the features)."""
    sd, _ = read_checkpoint(path)
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    model = FIDInception()
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    check_state_dict(sd, expected, path, "FID Inception")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    return model.eval().requires_grad_(False)


def frechet_distance(a, b) -> float:  # features (N, D) x2 -> the Frechet distance of their Gaussians
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64. The trace of the square root is the sum
    of the square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which has those of S_a S_b and is
    symmetric (pytorch-fid takes scipy's sqrtm of the product itself)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    S_a, S_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    w, V = torch.linalg.eigh(S_a)
    root_a = V @ torch.diag(w.clamp(min=0).sqrt()) @ V.T
    cross = torch.linalg.eigvalsh(root_a @ S_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + S_a.trace() + S_b.trace() - 2 * cross).item()


# ---------------------------------------------------------------- PIE-Bench (the paper's Table 3)

PIE_SIDE = 512  # PIE-Bench's images and masks
PIE_TYPES = {"0": "random", "1": "change object", "2": "add object", "3": "delete object", "4": "change content",
             "5": "change pose", "6": "change color", "7": "change material", "8": "change background",
             "9": "change style"}
PIE_METRICS = {  # name: (the protocol's metric, the factor of the paper's table unit)
    "structure_distance": ("structure_distance", 1e3), "psnr": ("psnr_unedit_part", 1.0),
    "lpips": ("lpips_unedit_part", 1e3), "mse": ("mse_unedit_part", 1e4), "ssim": ("ssim_unedit_part", 1e2),
    "clip_whole": ("clip_similarity_target_image", 1.0), "clip_edited": ("clip_similarity_target_image_edit_part", 1.0)}


def rle_mask(encoded, side=PIE_SIDE):  # PIE-Bench's run-length mask -> (side, side) bool, True = the edit
    """`encoded` is [start, length, start, length, ...] over the flattened image. As the protocol, the border
    rows and columns count as edited (it does so against annotation errors at the border)."""
    flat = torch.zeros(side * side, dtype=torch.bool)
    for start, length in zip(encoded[::2], encoded[1::2]):
        flat[start:start + length] = True
    mask = flat.view(side, side)
    mask[0], mask[-1], mask[:, 0], mask[:, -1] = True, True, True, True
    return mask


def gaussian_window(size=11, sigma=1.5):  # (size, size), summing to 1
    x = torch.arange((1 - size) / 2, (1 + size) / 2)
    g = torch.exp(-(x / sigma).pow(2) / 2)
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a, b):  # a, b (B, 3, H, W) in [0, 1] -> (B,)
    """SSIM as torchmetrics computed it when PIE-Bench was published (before 1.4): an 11 x 11 Gaussian window
    (sigma 1.5) over the reflect-padded image, the padded border left out of the mean."""
    pad, c1, c2 = 5, 0.01 ** 2, 0.03 ** 2
    window = gaussian_window().expand(3, 1, 11, 11).to(a)
    a, b = (F.pad(x, (pad,) * 4, mode="reflect") for x in (a, b))
    mu_a, mu_b, aa, bb, ab = F.conv2d(torch.cat([a, b, a * a, b * b, a * b]), window, groups=3).chunk(5)
    var_a, var_b = (aa - mu_a ** 2).clamp(min=0), (bb - mu_b ** 2).clamp(min=0)
    cov = ab - mu_a * mu_b
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s[..., pad:-pad, pad:-pad].flatten(1).mean(1)


@torch.no_grad()
def unedited_metrics(source, edited, keep, lpips=None) -> dict:  # (3, H, W) in [0, 1] x2, keep (H, W) {0, 1}
    """PSNR, MSE, SSIM (and LPIPS) outside the edit, as the protocol: both images times the mask, then the
    whole-image metric (so the edit region counts as equal pixels)."""
    a, b = source * keep, edited * keep
    mse = (a - b).pow(2).mean().item()
    out = {"psnr": 10 * math.log10(1 / mse) if mse else math.inf, "mse": mse, "ssim": ssim(a[None], b[None]).item()}
    if lpips is not None:
        out["lpips"] = lpips(a[None] * 2 - 1, b[None] * 2 - 1).item()
    return out


def read_rgb(path: Path):  # (3, H, W) float in [0, 1], as the protocol's np.array(image) / 255
    try:
        with Image.open(path) as img:
            return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the image ({e})")


def resized(img, H: int, W: int):  # (C, h, w) in [0, 1] -> (C, H, W), bicubic, kept in [0, 1]
    if img.shape[1:] == (H, W):
        return img
    return F.interpolate(img[None], size=(H, W), mode="bicubic", align_corners=False)[0].clamp(0, 1)


def as_prediction(edited, side=PIE_SIDE):  # -> (3, side, side), and how it was made so
    """The protocol crops a wider image to its bottom-right square (its methods save [source | edit]); an image of
    another size is resized (bicubic) to the benchmark's, where the protocol would stop."""
    H, W = edited.shape[1:]
    if (H, W) == (side, side):
        return edited, None
    if H >= side and W >= side and H != W:
        return edited[:, H - side:, W - side:], "cropped"
    return resized(edited, side, side), "resized"


def pie_records(data: Path) -> dict:
    mapping = data / "mapping_file.json"
    if not mapping.is_file():
        raise DataError(f"{mapping}: no such file (--data is PIE-Bench's folder: mapping_file.json, annotation_images/)")
    try:
        records = json.loads(mapping.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{mapping}: not readable JSON ({e})")
    bad = [k for k, r in records.items() if not {"image_path", "mask", "editing_type_id"} <= set(r)]
    if bad:
        raise DataError(f"{mapping}: {len(bad)} records lack image_path, mask or editing_type_id (first: {bad[0]})")
    return records


def edited_path(pred: Path, image_path: str) -> Path | None:
    """The record's own relative path, as the protocol reads it, or the same name as a PNG (what sample.py writes)."""
    for path in (pred / image_path, (pred / image_path).with_suffix(".png")):
        if path.is_file():
            return path
    return None


class Fire(nn.Module):
    """SqueezeNet's module: a 1x1 squeeze, then 1x1 and 3x3 expansions side by side (torchvision's names)."""

    def __init__(self, cin: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1, self.expand3x3 = nn.Conv2d(squeeze, expand, 1), nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


def conv_relu(cin: int, cout: int, kernel: int, stride=1, padding=0):
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding), nn.ReLU()]


def lpips_backbone(net: str) -> tuple[nn.Sequential, tuple, tuple]:
    """torchvision's `features` of SqueezeNet 1.1, AlexNet or VGG16 (its indices, so its state dict loads), the
    end of each stage whose ReLU LPIPS compares, and those stages' widths."""
    pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=net == "squeeze")
    if net == "squeeze":
        layers = [*conv_relu(3, 64, 3, 2), pool(), Fire(64, 16, 64), Fire(128, 16, 64), pool(), Fire(128, 32, 128),
                  Fire(256, 32, 128), pool(), Fire(256, 48, 192), Fire(384, 48, 192), Fire(384, 64, 256), Fire(512, 64, 256)]
        return nn.Sequential(*layers), (2, 5, 8, 10, 11, 12, 13), (64, 128, 256, 384, 384, 512, 512)
    if net == "alex":
        layers = [*conv_relu(3, 64, 11, 4, 2), pool(), *conv_relu(64, 192, 5, padding=2), pool(),
                  *conv_relu(192, 384, 3, padding=1), *conv_relu(384, 256, 3, padding=1), *conv_relu(256, 256, 3, padding=1)]
        return nn.Sequential(*layers), (2, 5, 8, 10, 12), (64, 192, 384, 256, 256)
    layers, cin = [], 3
    for width, convs in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
        layers += [nn.MaxPool2d(2, 2)] if cin > 3 else []
        for _ in range(convs):
            layers += conv_relu(cin, width, 3, padding=1)
            cin = width
    return nn.Sequential(*layers), (4, 9, 16, 23, 30), (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """LPIPS (the lpips package's weights, as torchmetrics computes it; PIE-Bench's is net="squeeze").

    Both images are shifted and scaled (ScalingLayer) and run through the backbone's features; at each stage's
    ReLU the channel-normalised features are subtracted, squared, weighted by that stage's 1x1 convolution
    (lin0, lin1, ...) and averaged over space; the stages' averages add up."""

    SHIFT, SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)

    def __init__(self, net: str = "squeeze"):
        super().__init__()
        self.features, self.stages, widths = lpips_backbone(net)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in widths)

    def forward(self, a, b):  # (B, 3, H, W) in [-1, 1] x2 -> (B,)
        shift, scale = a.new_tensor(self.SHIFT).view(1, 3, 1, 1), a.new_tensor(self.SCALE).view(1, 3, 1, 1)
        a, b = (a - shift) / scale, (b - shift) / scale
        unit = lambda x: x / torch.sqrt(1e-8 + x.pow(2).sum(1, keepdim=True))
        total, start = 0, 0
        for end, lin in zip(self.stages, self.lins):
            a, b = self.features[start:end](a), self.features[start:end](b)
            total = total + lin((unit(a) - unit(b)).pow(2)).mean((2, 3))
            start = end
        return total.flatten()


LPIPS_NETS = {"squeeze": "squeezenet1_1", "alex": "alexnet", "vgg": "vgg16"}


def load_lpips(backbone: Path, linear: Path) -> LPIPS:
    """From torchvision's state dict of SqueezeNet 1.1, AlexNet or VGG16 (the classifier is ignored) and the lpips
    package's linear layers for it (weights/v0.1/squeeze.pth, alex.pth, vgg.pth); the backbone is told by its keys."""
    backbone_sd, _ = read_checkpoint(backbone)
    lins, _ = read_checkpoint(linear)
    first = tuple(backbone_sd.get("features.0.weight", torch.empty(0)).shape)
    net = "squeeze" if "features.3.squeeze.weight" in backbone_sd else "alex" if first == (64, 3, 11, 11) else "vgg"
    sd = {k: v for k, v in backbone_sd.items() if k.startswith("features.")}
    sd.update({f"lins.{k[3]}.weight": v for k, v in lins.items() if k.startswith("lin") and k.endswith(".model.1.weight")})
    model = LPIPS(net)
    check_state_dict(sd, {k: v.shape for k, v in model.state_dict().items()}, f"{backbone} + {linear}", f"LPIPS ({LPIPS_NETS[net]})")
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.eval().requires_grad_(False)


def pie_bench(data: Path, pred: Path, dino=None, lpips=None, clip=None) -> dict:
    """The PIE-Bench numbers of the edited images in `pred` (each at its record's image_path), in the paper's
    units, by editing type and in total; structure distance with `dino` (DINO ViT-B/8), LPIPS with `lpips`, CLIP
    similarity with `clip`; the metrics whose networks are not given are null."""
    records = pie_records(data)
    found = {k: edited_path(pred, r["image_path"]) for k, r in records.items()}
    missing = [records[k]["image_path"] for k, path in found.items() if path is None]
    if missing:
        raise DataError(f"{len(missing)} of {len(records)} edited images are missing under {pred} "
                        f"(first: {', '.join(missing[:3])})")
    per_type, changed, unedited = {}, {"cropped": 0, "resized": 0}, 0
    for key, r in tqdm(records.items(), desc="PIE-Bench", leave=False):
        source = read_rgb(data / "annotation_images" / r["image_path"])
        edited, how = as_prediction(read_rgb(found[key]))
        if how:
            changed[how] += 1
        if source.shape != edited.shape:
            raise DataError(f"{r['image_path']}: the source is {source.shape[2]}x{source.shape[1]}, PIE-Bench's are {PIE_SIDE}")
        row = {"structure_distance": structure_distance(dino, source, edited)} if dino is not None else {}
        edit = rle_mask(r["mask"])
        if clip is not None:
            row.update(clip_similarity(clip, edited, edit, r.get("editing_prompt", "")))
        keep = (~edit).float()
        if keep.sum():  # the protocol has no unedited part to score otherwise
            row.update(unedited_metrics(source, edited, keep, lpips))
            unedited += 1
        per_type.setdefault(r["editing_type_id"], []).append(row)
    rows = [row for t in per_type.values() for row in t]
    return {"total": pie_summary(rows), "by_type": {PIE_TYPES.get(t, t): pie_summary(v) for t, v in sorted(per_type.items())},
            "n": len(records), "with_unedited_part": unedited, **changed}


def pie_summary(rows: list[dict]) -> dict:  # the mean of each metric over the records that have it, in table units
    out = {}
    for name, (_, unit) in PIE_METRICS.items():
        values = [row[name] for row in rows if name in row]
        out[name] = statistics.fmean(values) * unit if values else None
    return out


def clip_similarity(clip, edited, edit, prompt: str) -> dict:  # edited (3, H, W) in [0, 1], edit (H, W) bool
    """CLIPScore of the target prompt (its [brackets] removed) with the whole edited image and with the edited
    region alone (black outside the mask), from the image's 8-bit pixels as the protocol reads them."""
    prompt = prompt.replace("[", "").replace("]", "")
    pixels = (edited * 255).round().to(torch.uint8)
    return {"clip_whole": clip.score(pixels, prompt), "clip_edited": clip.score(pixels * edit, prompt)}


def last_block_keys(dino, img):  # img (3, H, W) in [0, 1] -> (N, C), N = 1 + (224 / 8)^2
    """The keys of DINO's last block over all tokens (the class token too), the heads side by side, the
    input prepared as the protocol does: pixels 0-255 (it never divides by 255) resized to 224 px by bilinear
    interpolation without antialiasing (torchvision 0.13's Resize on a tensor; PIE-Bench's images are square),
    then ImageNet's normalisation."""
    x = F.interpolate(img[None] * 255, size=(224, 224), mode="bilinear", align_corners=False, antialias=False)
    x = (x - x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    tokens = dino.prepare_tokens(x)
    for block in dino.blocks[:-1]:
        tokens = block(tokens)
    last, C = dino.blocks[-1], dino.cfg.dim
    return last.attn.qkv(last.norm1(tokens))[0, :, C:2 * C]


def key_self_similarity(dino, img):  # (N, N): the cosine similarity of every pair of last-block keys
    keys = last_block_keys(dino, img)
    norms = keys.norm(dim=1, keepdim=True)
    return keys @ keys.T / (norms @ norms.T).clamp(min=1e-8)


@torch.no_grad()
def structure_distance(dino, source, edited) -> float:  # (3, H, W) in [0, 1] x2
    """PIE-Bench's structure distance (PnP's): the MSE between the two images' key self-similarities."""
    return F.mse_loss(key_self_similarity(dino, edited), key_self_similarity(dino, source)).item()


# ---------------------------------------------------------------- controllable generation (the paper's Tables 1-2)

def edge_f1(pred, target) -> float:  # binary maps (H, W) x2
    """F1 of predicted edge pixels against the condition's, pixel for pixel (1 when both are empty)."""
    hit = (pred * target).sum().item()
    n_pred, n_target = pred.sum().item(), target.sum().item()
    return 1.0 if n_pred + n_target == 0 else 2 * hit / (n_pred + n_target)


def gray_map(path: Path, H: int, W: int) -> torch.Tensor:  # a control map file -> (H, W) in [0, 1]
    return resized(read_rgb(path), H, W).mean(0)


def condition_consistency(kind: str, generated, control: torch.Tensor, made: torch.Tensor | None) -> dict:
    """How well a generated image (3, H, W) in [0, 1] follows its condition map (H, W) in [0, 1]: Canny F1 and SSIM
    of the generated image's Canny edges (OpenCV's 100 / 200), SSIM of a soft-edge map, RMSE of a depth map on
    0-255; the last two from the map (H, W) in [0, 1] an annotator made of the generated image (`made`)."""
    if kind == "canny":
        edges = canny(generated * 2 - 1)
        return {"canny_f1": edge_f1(edges, control.round()),
                "ssim": ssim(edges.expand(3, -1, -1)[None], control.expand(3, -1, -1)[None]).item()}
    if made is None:
        return {}
    if kind == "softedge":
        return {"ssim": ssim(made.expand(3, -1, -1)[None], control.expand(3, -1, -1)[None]).item()}
    return {"rmse": (255 * (made - control)).pow(2).mean().sqrt().item()}


@torch.no_grad()
def control_bench(data: Path, pred: Path, kind: str, inception=None, dino=None, clip=None, pred_controls=None) -> dict:
    """Controllable generation scored as the paper's Tables 1-2: FID (pytorch-fid's Inception) and FD-DINOv2
    (the same distance on DINOv2's normed class token at 224 px) of the generated images against the folder's
    real ones, CLIPScore of the captions, and the condition consistency of each generated image."""
    records = read_manifest(data, ("image",))
    found = {n: edited_path(pred, r["image"]) for n, r in records}
    missing = [r["image"] for n, r in records if found[n] is None]
    if missing:
        raise DataError(f"{len(missing)} of {len(records)} generated images are missing under {pred} (first: {', '.join(missing[:3])})")
    embed = {"fid": inception, "fd_dinov2": None if dino is None else lambda x: dino(dino.preprocess(x * 2 - 1, 224))}
    embed = {key: f for key, f in embed.items() if f is not None}  # (1, 3, H, W) in [0, 1] -> features
    feats = {key: ([], []) for key in embed}  # real, generated
    rows = []
    for n, r in tqdm(records, desc="control", leave=False):
        real = read_rgb(data / r["image"])
        generated = resized(read_rgb(found[n]), *real.shape[1:])  # the condition is the real image's size
        control = gray_map(data / r["control"], *real.shape[1:]) if r.get("control") else CONTROLS[kind](real * 2 - 1)
        made = edited_path(pred_controls, r["image"]) if pred_controls else None
        row = condition_consistency(kind, generated, control, None if made is None else gray_map(made, *control.shape))
        if clip is not None and "caption" in r:
            row["clip_score"] = clip.score((generated * 255).round().to(torch.uint8), str(r["caption"]))
        rows.append(row)
        for key, f in embed.items():
            for store, img in zip(feats[key], (real, generated)):
                store.append(f(img[None]))
    result = {"n": len(records), "control": kind, "fid": None, "fd_dinov2": None}
    for key, (real, generated) in feats.items():
        result[key] = frechet_distance(torch.cat(real), torch.cat(generated))
    for key in ("clip_score", "canny_f1", "ssim", "rmse"):
        values = [row[key] for row in rows if key in row]
        result[key] = statistics.fmean(values) if values else None
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--bench", choices=["toy", "drawn", "vq", "toy-control", "pie", "control"],
                      help="toy: the toy world's held-out split; drawn: pictures drawn with PIL, not the generator "
                      "(shapes anywhere, anti-aliased, colours off); vq: the tokenizer's reconstructions of both; "
                      "toy-control: a control model on held-out toy scenes; pie: PIE-Bench, edited images in --pred; "
                      "control: controllable generation, generated images in --pred")
    what.add_argument("--ablate", choices=list(ABLATIONS), help="train and score every row of one ablation table (above)")
    p.add_argument("--steps", type=int, default=ABLATION_STEPS, help="--ablate: training steps of every row")
    p.add_argument("--runs", type=Path, default=ABLATION_DIR, help="--ablate: where each table's rows are trained")
    p.add_argument("--ckpt", type=Path, help="SCAR checkpoint (default: the shipped toy editor; with --bench toy-control "
                   "the shipped toy control model); with --bench vq also a tokenizer export")
    p.add_argument("--n", type=int, default=200, help="edits to evaluate")
    p.add_argument("--batch", type=int, default=25, help="edits generated together")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--plausibility", type=float, default=PLAUSIBILITY, help="guidance restricted to plausible codes "
                   "(as sample.py; 0 = plain guidance)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (0 = all codes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split's edits and of the sampling")
    p.add_argument("--split", choices=["heldout", "train"], default="heldout",
                   help="train: edits of the training distribution (with a --seed other than training's 0 they are "
                        "scenes the model never saw, but (edit, shape, colour) triples it did)")
    p.add_argument("--varied", action="store_true", help="phrase the instructions as users type them: a capital, "
                   "a closing '.' or '!', a leading 'please ', at random (as the toy models are trained)")
    p.add_argument("--teacher-forced", action="store_true", help="next-token: teacher-forced code accuracy by token "
                   "kind away from the edit, instead of sampling (see above)")
    p.add_argument("--data", type=Path, help="--bench pie: PIE-Bench's folder (mapping_file.json, annotation_images/); "
                   "--bench control: a control folder (manifest.jsonl: image, control, caption; README: Data)")
    p.add_argument("--pred", type=Path, help="--bench pie / control: the edited or generated images, each at its "
                   "record's image path (or the same name as a PNG)")
    p.add_argument("--control", choices=list(CONTROLS), help="--bench control: the condition kind (default canny); "
                   "--bench toy-control: score this kind only (default: every kind the model was trained on)")
    p.add_argument("--pred-control", type=Path, help="--bench control, softedge / depth: the maps your annotator (HED, a "
                   "depth estimator) made of the generated images, at the same relative paths")
    p.add_argument("--inception", type=Path, help="--bench control: pytorch-fid's pt_inception-2015-12-05-6726825d.pth, for FID")
    p.add_argument("--dino", type=Path, help="--bench control: a DINOv2 (dinov2_vitl14_pretrain.pth), for FD-DINOv2")
    p.add_argument("--dino-v1", type=Path, help="--bench pie: DINO ViT-B/8, the official dino_vitbase8_pretrain.pth, "
                   "for the structure distance")
    p.add_argument("--clip", type=Path, help="--bench pie: CLIP ViT-L/14, the Hugging Face openai/clip-vit-large-patch14 "
                   "folder, for the CLIP similarities")
    p.add_argument("--lpips", type=Path, nargs=2, metavar=("BACKBONE", "LINEAR"), help="--bench pie: LPIPS's networks: "
                   "torchvision's squeezenet1_1-b8a52dc0.pth and the lpips package's weights/v0.1/squeeze.pth (the "
                   "protocol's; AlexNet or VGG16 with alex.pth or vgg.pth load too)")
    p.add_argument("--out", "--json", type=Path, dest="out", help="also write the results to this JSON file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.error = lambda message: p.exit(2, f"error: {message} (eval.py --help lists the flags)\n")  # one line, no usage
    args = p.parse_args(argv)
    args.ckpt = args.ckpt or (DEFAULT_CONTROL_CKPT if args.bench == "toy-control" else DEFAULT_CKPT)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.ablate:
        if args.steps < 1 or args.n < 1:
            print("error: --steps and --n must be at least 1", file=sys.stderr)
            sys.exit(2)
        folder = args.runs / args.ablate
        results = ablate(args.ablate, ABLATIONS[args.ablate], args.steps, args.n, folder, SEEDS.get(args.ablate, (0,)))
        print(f"{args.ablate}: {args.steps} steps a row, {args.n} held-out edits ({folder / 'table.json'})")
        print(markdown(results))
        print(json.dumps(results))
        return
    try:
        for flag, value in (("--n", args.n), ("--batch", args.batch)):
            if value < 1:
                raise SampleError(f"{flag} must be at least 1, got {value}")
        check_sampling(args.cfg, args.plausibility, args.seed, args.top_k)
        check_device(args.device)
        if args.out and not args.out.parent.is_dir():
            raise SampleError(f"--out {args.out}: the folder {args.out.parent} does not exist")
        if args.out and args.out.is_dir():
            raise SampleError(f"--out {args.out}: is a directory")
        folders = args.bench in ("pie", "control")
        if folders and not (args.data and args.pred):
            raise SampleError(f"--bench {args.bench} needs --data DIR and --pred PRED_DIR")
        if not folders and (args.data or args.pred or args.clip):
            raise SampleError("--data, --pred and --clip are for --bench pie and --bench control")
        if args.bench != "pie" and (args.dino_v1 or args.lpips):
            raise SampleError("--dino-v1 and --lpips are for --bench pie")
        if args.bench != "control" and (args.inception or args.dino or args.pred_control):
            raise SampleError("--inception, --dino and --pred-control are for --bench control")
        if args.bench != "toy" and (args.split != "heldout" or args.varied or args.teacher_forced):
            raise SampleError("--split, --varied and --teacher-forced are for --bench toy")
        if args.bench not in ("toy-control", "control") and args.control:
            raise SampleError("--control is for --bench control and --bench toy-control")
        if args.bench == "control":
            result = control_bench(args.data, args.pred, args.control or "canny", load_inception(args.inception) if args.inception else None,
                                   load_dinov2(args.dino) if args.dino else None, load_clip(args.clip) if args.clip else None,
                                   args.pred_control)
        elif args.bench == "pie":
            result = pie_bench(args.data, args.pred, load_dinov2(args.dino_v1) if args.dino_v1 else None,
                               load_lpips(*args.lpips) if args.lpips else None, load_clip(args.clip) if args.clip else None)
        elif args.bench == "vq":
            result = reconstruction(args.ckpt, args.n, args.batch, args.seed, args.device)
        elif args.bench == "toy-control":
            result = toy_control(args.ckpt, args.n, args.batch, args.cfg, args.top_k, args.seed, args.device,
                                 args.plausibility, [args.control] if args.control else None)
        else:
            result = teacher_forced(args.ckpt, args.n, args.batch, args.seed, args.device, args.split) if args.teacher_forced \
                else evaluate(args.ckpt, args.n, args.batch, args.cfg, args.top_k, args.seed, args.device, args.plausibility,
                              args.split, args.varied, args.bench)
    except (SampleError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.teacher_forced:
        print(f"teacher-forced code accuracy away from the edit, {result['n']} {result['split']} toy edits")
        for kind, pct in result["teacher_forced_accuracy_pct"].items():
            print(f"  {kind:<24}{pct:>8.1f} %   ({result['tokens'][kind]} tokens)")
        if result["align_edit_progress_pct"]:  # none for the EditAR baseline
            print("L_align: how far H_s goes from P_s towards P_t where the edit is (0 % = the source, 100 % = the target)")
            for kind, pct in result["align_edit_progress_pct"].items():
                print(f"  {kind:<24}{pct:>8.1f} %")
    elif args.bench == "pie":
        print_pie(result)
    elif args.bench == "control":
        print_control(result)
    elif args.bench == "toy-control":
        print_toy_control(result)
    elif args.bench == "vq":
        print(f"tokenizer round trip on the images of {result['n']} held-out toy edits and {result['n']} drawings")
        for name in ("toy", "drawn"):
            print(f"  {name:<8}PSNR {result[name]['psnr_db']:6.2f} dB   edge sharpness {result[name]['edge_sharpness']:.3f}")
    else:
        print_table(result)
    print(json.dumps(result))
    if args.out:
        write_json(args.out, result)


def print_table(result):
    rows = [("edit success", f"{result['edit_success_pct']:.1f} %"),
            (f"exact (>= {EXACT_PSNR:g} dB)", f"{result['exact_pct']:.1f} %"),
            ("background PSNR", f"{result['background_psnr_db']:.2f} dB"),
            ("PSNR vs target", f"{result['target_psnr_db']:.2f} dB"),
            ("images / s", f"{result['images_per_s']:.2f}")]
    rows += [(f"  success: {k}", f"{v:.1f} %") for k, v in result["edit_success_by_kind_pct"].items()]
    phrased = ", varied phrasings" if result["varied"] else ""
    edits = "drawn edits" if result["bench"] == "drawn" else f"{result['split']} toy edits{phrased}"
    print(f"{result['arch']} on {result['n']} {edits} (cfg {result['cfg']}, plausibility "
          f"{result['plausibility']}, top-k {result['top_k']}, seed {result['seed']})")
    for name, value in rows:
        print(f"  {name:<24}{value:>12}")


def print_control(result):
    print(f"controllable generation, {result['n']} images, {result['control']} condition")
    needs = {"fid": "--inception", "fd_dinov2": "--dino", "clip_score": "--clip (and captions)", "canny_f1": "--control canny",
             "ssim": "--pred-control, or --control canny", "rmse": "--control depth --pred-control"}
    for key, name in (("fid", "FID"), ("fd_dinov2", "FD-DINOv2"), ("clip_score", "CLIP score"),
                      ("canny_f1", "Canny F1"), ("ssim", "SSIM"), ("rmse", "RMSE (0-255)")):
        print(f"  {name:<14}" + (f"not computed (needs {needs[key]})" if result[key] is None else f"{result[key]:.4f}"))


def print_toy_control(result):
    print(f"{result['arch']} control model ({result['condition']} condition) on {result['n']} held-out toy scenes "
          f"a kind (cfg {result['cfg']}, seed {result['seed']})")
    names = {"canny_f1": "Canny F1", "ssim": "SSIM", "rmse": "RMSE (0-255)", "target_psnr_db": "PSNR vs scene (dB)",
             "fd_toy_dinov2": "FD (toy DINOv2)"}
    for kind, row in result["by_kind"].items():
        print(f"  {kind:<9}" + "   ".join(f"{names[k]} {v:.3f}" for k, v in row.items()))


def print_pie(result):
    """The paper's Table 3 columns: structure distance x 10^3, then outside the edit PSNR, LPIPS x 10^3, MSE x 10^4,
    SSIM x 10^2, then CLIP similarity of the whole image and of the edited region."""
    names = list(PIE_METRICS)
    print(f"PIE-Bench, {result['n']} images, {result['with_unedited_part']} with an unedited part (cropped to the "
          f"benchmark's square: {result['cropped']}, resized: {result['resized']})")
    print("| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for label, row in [("total", result["total"]), *result["by_type"].items()]:
        print(f"| {label} | " + " | ".join("-" if row[m] is None else f"{row[m]:.2f}" for m in names) + " |")
    if result["total"]["structure_distance"] is None:
        print("structure distance: not computed (--dino-v1 dino_vitbase8_pretrain.pth gives its network)")
    if result["total"]["lpips"] is None:
        print("LPIPS: not computed (--lpips BACKBONE LINEAR gives its networks)")
    if result["total"]["clip_whole"] is None:
        print("CLIP similarity: not computed (--clip FOLDER gives its network)")


if __name__ == "__main__":
    main()
