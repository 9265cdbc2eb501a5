"""Training: SCAR (edit / control), the toy tokenizers (vq) and the toy image encoder (encoder).

    python train.py --task edit --arch next-token --model toy --toy --dino D --vq V --out runs/edit
    torchrun --nproc_per_node=8 train.py --task edit --data DIR --init t2i_XL_stage2_512.pt \\
        --dino dinov2_vitb14_pretrain.pth --vq vq_ds16_t2i.pt --image-size 512 --out runs/xl

One process or torchrun (DDP; NCCL on CUDA, gloo on CPU). The frozen DINOv2 and tokenizer run
once per step under no_grad and are not part of the checkpoint (only their paths). Every
--save-every steps and at the end, `OUT/checkpoint.safetensors` is written atomically with the
model, the AdamW state, the step, every rank's RNG state and the data position, so --resume
continues the run exactly; `OUT/log.jsonl` gets one JSON line per logged step.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from checkpoint import CheckpointError, read_checkpoint, read_meta, save_checkpoint
from data import T5_DIR, T5_SLOTS, ControlDataset, DataError, EditDataset, ToyControl, ToyEdits, read_text_features
from encoder import DINOv2, DINOv2Config, load_dinov2, load_t5
from model import (SCAR, GPT_SIZES, NextScaleTransformer, NextTokenTransformer, SCARConfig, encode_words, gpt_config,
                   load_llamagen, load_var, var_config)
from vq import MSVQ_SIZES, VQ_SIZES, MultiScaleVQVAE, VQModel, load_msvq, load_vq

TOY_SAMPLES = 1_000_000  # the toy world is generated on the fly: an "epoch" is this many indices
TOY_DINO = DINOv2Config(dim=128, depth=4, heads=2, ffn_hidden=512, patch_size=8, pos_grid=8)
TEXT_LEN = {"edit": 16, "control": 24}  # word slots of instructions and captions (the toy's longest: 10, 14)
SEED_IMAGES = 4096  # --vq-warmup: images whose patches seed the codebook (the toy: all 868 distinct patches)


EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UsageError(ValueError):
    """A bad command line or input: reported in one line, exit status 2."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["edit", "control", "vq", "encoder"], default="edit",
                   help="edit / control: train SCAR; vq: a toy tokenizer; encoder: the toy DINOv2")
    p.add_argument("--arch", choices=["next-token", "next-scale"], default="next-token",
                   help="backbone (edit/control) or tokenizer kind (vq): LlamaGen VQ vs VAR multi-scale VQVAE")
    p.add_argument("--model", default="toy", help=f"backbone size: {', '.join(GPT_SIZES)} (next-token) or "
                   "toy, d12, d16, d20, d24, d30 (next-scale); ignored with --init")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--toy", action="store_true", help="train on the procedurally generated toy world")
    source.add_argument("--data", type=Path, help="a folder with manifest.jsonl (README: Data)")
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps in total (also when resuming)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size per optimiser step")
    p.add_argument("--micro-batch-size", type=int, default=0,
                   help="per-process batch of one forward pass (default: batch / processes); the rest is accumulated")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (betas 0.9/0.95)")
    p.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW weight decay of the weight matrices (the papers: 0.05; README: the toy with 0.5)")
    p.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warmup")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="after warmup: constant (the papers' fine-tuning) or cosine decay to 0 at --steps (toy runs from scratch)")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint.safetensors, log.jsonl, exports")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="bf16 autocast or fp32; default bf16 on CUDA, fp32 on "
                   "CPU (CPU bf16 runs but is ~10-20x slower than fp32 on CPUs without bf16 units)")
    p.add_argument("--compile", action="store_true", help="torch.compile the trained model")
    p.add_argument("--init", type=Path, help="official LlamaGen GPT (.pt) or VAR (.pth) checkpoint to start the backbone from")
    p.add_argument("--dino", type=Path, help="DINOv2 checkpoint (hub .pth, HF folder, or the toy encoder's export)")
    p.add_argument("--vq", type=Path, help="tokenizer checkpoint (LlamaGen VQ, VAR VQVAE, or a toy export)")
    p.add_argument("--image-size", type=int, default=64, help="training resolution in pixels")
    p.add_argument("--dino-size", type=int, default=0, help="DINOv2 input size (0: the image size rounded down "
                   "to the patch size; 448 for 512 px images gives the paper's 32 x 32 features)")
    p.add_argument("--dino-layers", choices=["last", "quarters"], default="last", help="DINOv2 features F_s (DESIGN.md 2)")
    p.add_argument("--dropout", type=float, default=0.1,
                   help="next-token backbone: dropout on its input tokens and on each block's attention and feed-forward "
                   "outputs while training (LlamaGen's training scripts: 0.1)")
    p.add_argument("--k", type=int, default=2, choices=[1, 2, 4], help="compression per side (k^2 fewer prefix tokens)")
    p.add_argument("--compressor", default="conv+resize", choices=["conv+resize", "resize", "unshuffle"])
    p.add_argument("--delta", type=float, default=0.5, help="weight of L_align")
    p.add_argument("--causal", action="store_true", help="plain causal attention (ablation) instead of the prefix mask")
    p.add_argument("--stop-grad-target", action="store_true",
                   help="no gradient into P_t through L_align (on the toy the compressor's output then grows, and "
                   "L_align with it: README, the shipped toy model)")
    p.add_argument("--text", choices=["words", "t5"], default="words",
                   help="how T_t reads text: one token per word of the training texts' vocabulary (the toy), or T5 "
                   "caption features (LlamaGen t2i weights; needs --t5)")
    p.add_argument("--t5", type=Path, help="google/flan-t5-* folder: encodes captions on the fly unless DATA/t5/ holds "
                   "features precomputed by `python data.py t5-features`")
    p.add_argument("--control", default="canny", choices=["canny", "softedge", "depth"], help="control map kind")
    p.add_argument("--skip-bad", action="store_true", help="skip missing or unreadable images (counted in the log)")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes (0 keeps resumption bit-exact)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint interval in steps")
    p.add_argument("--log-every", type=int, default=10, help="log interval in steps")
    p.add_argument("--export-dtype", choices=list(EXPORT_DTYPES), default="fp32",
                   help="dtype of the weights in OUT/<task>.safetensors (fp16 halves the shipped toy models)")
    p.add_argument("--vq-warmup", type=int, default=0, help="--task vq --arch next-token: train as a plain autoencoder "
                   "for this many steps, then seed the codebook with one code per distinct image patch (the toy recipe; README)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.task in ("edit", "control") and not (args.dino and args.vq):
        p.error(f"--task {args.task} needs --dino and --vq")
    if args.task in ("vq", "encoder") and not args.toy and args.data is None:
        p.error("--data or --toy is required")
    if args.vq_warmup and (args.task != "vq" or args.arch != "next-token"):
        p.error("--vq-warmup is for --task vq --arch next-token")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.weight_decay < 0:
        p.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.text == "t5" and args.t5 is None and not (args.data and (args.data / T5_DIR).is_dir()):
        p.error(f"--text t5 needs --t5 FOLDER, or features in DATA/{T5_DIR}/ (python data.py t5-features)")
    return args


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device


def setup_distributed() -> Dist:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python train.py` is a world of one."""
    if "RANK" not in os.environ:
        return Dist(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def precomputed_text(args) -> bool:
    """T5 features written by `python data.py t5-features` are read instead of running the T5."""
    return args.text == "t5" and args.data is not None and (args.data / T5_DIR).is_dir()


def dataset(args):
    features = precomputed_text(args)
    if args.task == "control":
        if args.toy:
            return ToyControl(TOY_SAMPLES, size=args.image_size, seed=args.seed, control=args.control)
        return ControlDataset(args.data, args.image_size, args.control, skip_bad=args.skip_bad, text_features=features)
    if args.toy:
        return ToyEdits(TOY_SAMPLES, size=args.image_size, seed=args.seed, varied=True)
    return EditDataset(args.data, args.image_size, skip_bad=args.skip_bad, text_features=features)


def collate(items):
    out = {k: torch.stack([it[k] for it in items]) for k in ("source", "target", "mask")}
    for key in ("text", "label"):
        if key in items[0]:
            out[key] = [it[key] for it in items]
    if "text_emb" in items[0]:
        out["text_emb"], out["text_mask"] = (torch.stack([it[k] for it in items]) for k in ("text_emb", "text_mask"))
    return out


# ---------------------------------------------------------------- tasks: a model, its losses, its config


class SCARTask:
    """SCAR on precomputed-per-step frozen features: F_s, F_t from DINOv2, Z_t from the tokenizer."""

    def __init__(self, args, device, data):
        self.args, self.device = args, device
        self.dino = load_dinov2(args.dino).to(device)
        self.t5 = load_t5(args.t5).to(device) if args.text == "t5" and not precomputed_text(args) else None
        self.next_scale = args.arch == "next-scale"
        if self.next_scale:
            patch_nums = read_meta(args.vq).get("patch_nums") if str(args.vq).endswith(".safetensors") else None
            self.vq = load_msvq(args.vq, **({"patch_nums": tuple(patch_nums)} if patch_nums else {})).to(device)
        else:
            self.vq = load_vq(args.vq).to(device)
        grid = (args.dino_size or args.image_size) // self.dino.cfg.patch_size
        C = self.dino.cfg.dim * (4 if args.dino_layers == "quarters" else 1)
        scar_cfg = SCARConfig(feature_dim=C, feature_grid=grid, k=args.k, compressor=args.compressor,
                              delta=args.delta, stop_grad_target=args.stop_grad_target, causal=args.causal)
        self.model = SCAR(scar_cfg, self.backbone(data)).to(device)
        if args.init and int(os.environ.get("RANK", 0)) == 0:
            print(f"{args.init}: backbone loaded; newly initialised: {', '.join(self.model.new_parameter_names())}",
                  file=sys.stderr)
        # Frozen parts are referenced, not stored: paths relative to the run folder, so a copied run still finds them.
        relative = lambda p: os.path.relpath(Path(p).resolve(), args.out.resolve())
        self.meta = {"kind": "scar", "task": args.task, "arch": args.arch,
                     "backbone": asdict(self.model.backbone.cfg), "scar": asdict(scar_cfg),
                     "dino": {"path": relative(args.dino), "layers": args.dino_layers, "size": args.dino_size or None},
                     "vq": {"path": relative(args.vq)}, "image_size": args.image_size, "text": {"kind": args.text}}
        if args.t5:
            self.meta["text"]["t5"] = relative(args.t5)
        if self.next_scale:
            self.meta["vq"]["patch_nums"] = list(self.vq.cfg.patch_nums)
        self.tokens = sum(self.model.backbone.blocks_of_scales) if self.next_scale else \
            (args.image_size // self.vq.downsample) ** 2  # target tokens per sample

    def backbone(self, data):
        a = self.args
        if self.next_scale:
            if a.init:
                return load_var(a.init).train()
            return NextScaleTransformer(var_config(a.model, **self.text_config(data), vae_dim=self.vq.cfg.z_channels,
                                                   vocab_size=self.vq.cfg.codebook_size, patch_nums=self.vq.cfg.patch_nums))
        if a.init:
            backbone = load_llamagen(a.init, dropout=a.dropout).train()
            if backbone.cfg.cond == "caption" and a.text != "t5":
                raise UsageError(f"{a.init} reads T5 caption features: pass --text t5 --t5 FOLDER")
            if backbone.cfg.cond == "class" and a.text == "t5":
                raise UsageError(f"{a.init} is class-conditional: it reads class labels, not T5 captions")
            if a.text == "t5" and backbone.cfg.caption_dim != self.t5_dim():
                raise UsageError(f"{a.init} reads {backbone.cfg.caption_dim}-d captions; the T5 gives {self.t5_dim()}-d features")
            return backbone
        if a.model not in GPT_SIZES:
            raise UsageError(f"unknown next-token size {a.model!r}; choose from {', '.join(GPT_SIZES)}")
        return NextTokenTransformer(gpt_config(a.model, **self.text_config(data), vocab_size=self.vq.cfg.codebook_size,
                                               dropout=a.dropout))

    def text_config(self, data) -> dict:
        """How a new backbone reads T_t: T5 features, or the words of the training texts (fixed here, stored
        with the model; the toy's are every word its generator writes)."""
        a = self.args
        if a.text == "t5":
            return dict(cond="caption", text_len=T5_SLOTS, caption_dim=self.t5_dim())
        return dict(cond="words", words=data.words(), text_len=TEXT_LEN[a.task])

    def t5_dim(self) -> int:
        if self.t5 is not None:
            return self.t5.cfg.d_model
        first = next((self.args.data / T5_DIR).glob("*.npy"), None)
        if first is None:
            raise UsageError(f"{self.args.data / T5_DIR}: no feature files; write them with python data.py t5-features")
        return read_text_features(first)[0].shape[1]

    def text(self, batch):
        cond = self.model.backbone.cfg.cond
        if cond == "class":
            if "label" not in batch:
                raise DataError("this backbone is class-conditional: the records need a 'label'")
            return torch.tensor(batch["label"], device=self.device), None
        if cond == "caption":
            if "text_emb" in batch:
                return batch["text_emb"].to(self.device), batch["text_mask"].to(self.device)
            if self.t5 is None:
                raise UsageError("this backbone reads T5 caption features: pass --text t5 --t5 FOLDER")
            embs, mask = self.t5.caption_features(batch["text"])
            return embs, mask.bool()
        cfg = self.model.backbone.cfg
        ids, mask = encode_words(batch["text"], cfg.words, cfg.text_len)
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def frozen(self, batch):
        """F_s, F_t and the target codes: the frozen encoder and tokenizer, once per step, outside autograd."""
        source, target = batch["source"].to(self.device), batch["target"].to(self.device)
        size, layers = self.args.dino_size or None, self.args.dino_layers
        F_s, F_t = self.dino.features(torch.cat([source, target]), layers, size).float().chunk(2)
        codes = self.vq.encode(target)
        if self.next_scale:
            return F_s, F_t, torch.cat([c.flatten(1) for c in codes], 1), self.vq.teacher_forcing_input(codes)
        return F_s, F_t, codes.flatten(1), None

    def losses(self, model, batch, step):
        F_s, F_t, codes, inputs = self.frozen(batch)
        text, mask = self.text(batch)
        return model(F_s, F_t, text, codes, mask, inputs)

    def export(self, model):
        return dict(model.state_dict()), self.meta


class VQTask:
    """A toy tokenizer on the images of the data (sources and targets)."""

    def __init__(self, args, device, data):
        self.args = args
        if args.arch == "next-scale":
            self.model = MultiScaleVQVAE(MSVQ_SIZES["toy"]).to(device)
            self.meta = {"kind": "msvq", "config": asdict(self.model.cfg), "patch_nums": list(self.model.cfg.patch_nums)}
        else:
            self.model = VQModel(VQ_SIZES["toy"]).to(device)
            self.meta = {"kind": "vq", "config": asdict(self.model.cfg)}
        self.device, self.tokens = device, 0

    def losses(self, model, batch, step):
        images = torch.cat([batch["source"], batch["target"]]).to(self.device)
        out = model(images, quantize=step >= self.args.vq_warmup) if self.args.vq_warmup else model(images)
        return {k: v for k, v in out.items() if k not in ("recon", "codes")}

    def seed_codebook(self, data):
        """At the end of the --vq-warmup: codes from the latents of the first SEED_IMAGES images of the data."""
        items = [data[i] for i in range(min(len(data), SEED_IMAGES // 2))]
        self.model.seed_codebook(torch.cat([collate(items)[k] for k in ("source", "target")]))

    def export(self, model):
        return dict(model.state_dict()), self.meta


class MaskedPatchPretraining(nn.Module):
    """The toy's frozen encoder is pretrained self-supervised, by masked-patch pixel reconstruction:
    a random third of the patches is replaced by DINOv2's own mask token, and a linear head predicts
    every patch's pixels from its final-normed token (MAE-style). The features must then describe
    colours, shapes and positions, and infer hidden patches from their context."""

    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        self.dino = DINOv2(cfg)
        self.head = nn.Linear(cfg.dim, 3 * cfg.patch_size ** 2)

    def forward(self, images):  # (B, 3, H, W) in [-1, 1]
        p = self.dino.cfg.patch_size
        x = self.dino.preprocess(images)
        masks = torch.rand(x.shape[0], (x.shape[2] // p) * (x.shape[3] // p), device=x.device) < 1 / 3
        tokens = self.dino.forward_features(x, masks)["x_norm_patchtokens"]  # (B, N, C)
        patches = F.unfold(images, p, stride=p).transpose(1, 2)  # (B, N, 3 p^2), the head's row order
        rec = F.mse_loss(self.head(tokens).float(), patches)
        return {"loss": rec, "rec": rec}


class EncoderTask:
    def __init__(self, args, device, data):
        self.device, self.tokens = device, 0
        self.model = MaskedPatchPretraining(TOY_DINO).to(device)
        self.meta = {"kind": "dinov2", "config": asdict(TOY_DINO)}

    def losses(self, model, batch, step):
        return model(batch["source"].to(self.device))

    def export(self, model):  # the bare DINOv2 in the torch-hub layout: load_dinov2 reads it
        return dict(model.dino.state_dict()), self.meta


TASKS = {"edit": SCARTask, "control": SCARTask, "vq": VQTask, "encoder": EncoderTask}


# ---------------------------------------------------------------- optimiser and checkpoint state


def make_optimizer(model, lr, weight_decay):
    """AdamW as the papers: betas 0.9 / 0.95, weight decay on matrices only (not norms, biases, embeddings' rows alike)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def learning_rate(args, step: int) -> float:  # for optimiser step `step` (0-based)
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule == "cosine":
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))
    return args.lr


def optimizer_tensors(opt) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors = {f"optim.{i}.{k}": v for i, state in sd["state"].items() for k, v in state.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer(opt, tensors: dict, meta: dict):
    state = {}
    for key, value in tensors.items():
        _, i, name = key.split(".", 2)
        state.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_states(run: Dist) -> dict[str, torch.Tensor]:
    """Every rank's RNG states, (world, n) uint8 each: CPU, and CUDA when training on it."""
    states = {"rng": torch.get_rng_state()}
    if run.device.type == "cuda":
        states["rng_cuda"] = torch.cuda.get_rng_state(run.device)
    if run.world == 1:
        return {k: v[None] for k, v in states.items()}
    gathered = [None] * run.world
    dist.all_gather_object(gathered, states)
    return {k: torch.stack([g[k] for g in gathered]) for k in states}


def set_rng_states(tensors, run: Dist):
    torch.set_rng_state(tensors["rng"][run.rank])
    if run.device.type == "cuda" and "rng_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng_cuda"][run.rank], run.device)


def save(path, model, opt, step, data_pos, rng, task, args, run):
    """The training state: every trained weight (also heads the export leaves out), AdamW, step, data, RNG."""
    if run.rank != 0:
        return
    opt_tensors, opt_meta = optimizer_tensors(opt)
    tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()}, **opt_tensors, **rng}
    save_checkpoint(path, tensors, {**task.meta, "step": step, "data": data_pos, "optimizer": opt_meta,
                                    "args": {k: str(v) for k, v in vars(args).items()}})


def export(path, model, task, run, dtype):
    if run.rank == 0:  # loaders return float32 models whatever the file holds
        weights, meta = task.export(model)
        save_checkpoint(path, {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}, meta)


# ---------------------------------------------------------------- the loop


def batches(data, run, args, epoch: int, start: int):
    """Per-process micro-batches of one epoch, from sample position `start` of this rank's share."""
    sampler = DistributedSampler(data, run.world, run.rank, shuffle=True, seed=args.seed, drop_last=True)
    sampler.set_epoch(epoch)
    micro = args.micro_batch_size or args.batch_size // run.world
    # A generator of its own: creating a loader must not draw from the global RNG, or a resumed run
    # (which creates one more loader) would drift from the uninterrupted one.
    return DataLoader(torch.utils.data.Subset(data, list(sampler)[start:]), batch_size=micro, shuffle=False,
                      num_workers=args.workers, collate_fn=collate, drop_last=True,
                      generator=torch.Generator().manual_seed(args.seed + epoch))


def check_finite(losses, step, run):
    """Stop every rank together when a loss term is NaN or infinite (before anything is written)."""
    bad = torch.tensor(float(not all(torch.isfinite(v).all() for v in losses.values())), device=run.device)
    if run.world > 1:
        dist.all_reduce(bad)
    if bad.item():
        terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        raise FloatingPointError(f"non-finite loss at step {step} ({terms}); "
                                 "the last good checkpoint is kept, nothing was written for this step")


def train(args, run: Dist):
    torch.manual_seed(args.seed + run.rank)
    bf16 = (args.precision or ("bf16" if run.device.type == "cuda" else "fp32")) == "bf16"
    micro = args.micro_batch_size or args.batch_size // run.world
    if micro < 1 or args.batch_size % (micro * run.world):
        raise UsageError(f"--batch-size {args.batch_size} must be a multiple of micro batch {micro} x {run.world} processes")
    accum = args.batch_size // (micro * run.world)
    data = dataset(args)
    if len(data) // run.world < micro:  # drop_last would leave every epoch empty
        raise UsageError(f"{len(data)} samples give no micro-batch of {micro} on each of {run.world} processes: "
                         "lower --batch-size")
    task = TASKS[args.task](args, run.device, data)  # SCAR: a word-reading backbone takes its vocabulary from data
    model = task.model
    opt = make_optimizer(model, args.lr, args.weight_decay)
    ckpt = args.out / "checkpoint.safetensors"
    step, epoch, pos = 0, 0, 0
    if args.resume:
        meta = read_meta(ckpt)
        tensors, _ = read_checkpoint(ckpt)
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        load_optimizer(opt, {k: v for k, v in tensors.items() if k.startswith("optim.")}, meta["optimizer"])
        step, (epoch, pos) = meta["step"], meta["data"]
        set_rng_states(tensors, run)
    ddp = DDP(model) if run.world > 1 else model
    fwd = torch.compile(ddp) if args.compile else ddp
    log = open(args.out / "log.jsonl", "a") if run.rank == 0 else None
    bar = tqdm(total=args.steps, initial=step, desc=f"{args.task} {args.arch}", disable=run.rank != 0, dynamic_ncols=True)
    model.train()  # the frozen DINOv2 and tokenizer stay in eval mode
    it = iter(batches(data, run, args, epoch, pos))
    while step < args.steps:
        if args.vq_warmup and step == args.vq_warmup:
            task.seed_codebook(data)
        t0 = time.perf_counter()
        totals, tokens = {}, 0
        for i in range(accum):
            batch = next(it, None)
            if batch is None:  # next epoch
                epoch, pos = epoch + 1, 0
                it = iter(batches(data, run, args, epoch, 0))
                batch = next(it)
            pos += micro
            sync = ddp.no_sync() if run.world > 1 and i < accum - 1 else contextlib.nullcontext()
            with sync, torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=bf16):
                losses = task.losses(fwd, batch, step)
            check_finite(losses, step + 1, run)
            (losses["loss"] / accum).backward()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + v.item() / accum
            tokens += task.tokens * batch["target"].shape[0]
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = learning_rate(args, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        dt = time.perf_counter() - t0
        if log and (step % args.log_every == 0 or step == args.steps):
            record = {"step": step, **{k: round(v, 5) for k, v in totals.items()}, "lr": learning_rate(args, step - 1),
                      "step_time": round(dt, 4)}
            if tokens:
                record["tokens_per_s"] = round(tokens * run.world / dt, 1)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{totals['loss']:.4f}")
        if step % args.save_every == 0 or step == args.steps:
            save(ckpt, model, opt, step, (epoch, pos), rng_states(run), task, args, run)
    bar.close()
    export(args.out / f"{args.task}.safetensors", model, task, run, EXPORT_DTYPES[args.export_dtype])
    if log:
        log.close()


def main(argv=None):
    args = parse_args(argv)
    run = setup_distributed()
    try:
        if run.rank == 0:
            args.out.mkdir(parents=True, exist_ok=True)
        if args.resume and not (args.out / "checkpoint.safetensors").is_file():
            raise UsageError(f"--resume: no checkpoint in {args.out}")
        train(args, run)
    except (UsageError, CheckpointError, DataError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
