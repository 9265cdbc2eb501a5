"""Training: SCAR (edit / control), the toy tokenizers (vq) and the toy image encoder (encoder).

    python train.py --task edit                  # the toy editor, with the shipped toy encoder and tokenizer
    torchrun --nproc_per_node=8 train.py --task edit --data DIR --init t2i_XL_stage2_512.pt --text t5 \\
        --t5 flan-t5-xl --dino dinov2_vitb14_pretrain.pth --vq vq_ds16_t2i.pt --out runs/xl

One process or torchrun (DDP, or FSDP with --fsdp; NCCL on CUDA, gloo on CPU). Without --data the run
trains on the toy world (--toy), with the shipped toy encoder and tokenizer unless --dino / --vq say
otherwise, and SCAR takes the toy recipe's hyperparameters (TOY_RECIPE) for every flag not given. With
--data a backbone must be named (--model or --init), and images are the paper's sizes unless
--image-size says otherwise.

The frozen DINOv2, tokenizer and T5 run once per step under no_grad and outside autocast, in float32,
and are not part of the checkpoint (only their paths). Every --save-every steps and at the end,
`OUT/checkpoint.safetensors` is written atomically with the model, the AdamW state, the step, every
rank's RNG state and the data position, so --resume continues the run exactly; a checkpoint is written
only once its weights have given a finite loss and finite gradients on the next step, so the one kept
after a divergence resumes. `OUT/log.jsonl` gets one JSON line per logged step.
"""
import argparse
import contextlib
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from checkpoint import CheckpointError, read_checkpoint, read_meta, save_checkpoint
from data import (T5_DIR, T5_SLOTS, ControlDataset, DataError, EditDataset, ToyControl, ToyEdits, control_kinds,
                  read_text_features)
from encoder import DINOv2, DINOv2Config, load_dinov2, load_t5
from model import (SCAR, GPT_SIZES, NextScaleTransformer, NextTokenTransformer, SCARConfig, encode_words, gpt_config,
                   load_llamagen, load_var, var_config, vocabulary, words_of)
from vq import MSVQ_SIZES, MultiScaleVQVAE, PatchVQ, PatchVQConfig, load_msvq, load_vq, prefix_codes

TOY_SAMPLES = 1_000_000  # the toy world is generated on the fly: an "epoch" is this many indices
TOY_DINO = DINOv2Config(dim=128, depth=4, heads=2, ffn_hidden=512, patch_size=8, pos_grid=8)
EDITAR_DISTILL = 0.5  # lambda of L_distill (EditAR section 4.1)
TEXT_LEN = {"edit": 16, "control": 24}  # word slots of instructions and captions (the toy's longest: 10, 14)
SEED_IMAGES = 8192  # images whose patches seed PatchVQ's centroids (the toy world: ~67 000 distinct patches)
SHIPPED = Path(__file__).resolve().parent / "checkpoints" / "toy"  # the toy encoder and tokenizer (docs/toy.md)
TOY_SIZE = 64
PAPER_SIZES = {"next-token": (512, 448), "next-scale": (256, 224)}  # image and DINOv2 input sides (DESIGN.md 1)
MAX_SEED = 2 ** 32 - 1

# Hyperparameters of flags the user did not give: the papers' fine-tuning, and for SCAR on the toy world the
# recipe the shipped toy models were trained with (docs/toy.md: the toy stack on a CPU).
DEFAULTS = dict(steps=1000, lr=1e-4, warmup=0, schedule="constant", dropout=0.1, weight_decay=0.05, k=2, log_every=10,
                save_every=500, export_dtype="fp32")
# k = 1 on the toy: its 8 x 8 feature grid already matches the 8 x 8 token grid, and its targets are exact, so a
# prefix cell must say its patch to the pixel; at k = 2 one cell spans 16 x 16 px of several shapes and the
# editor redraws untouched shapes elsewhere (docs/toy.md). The paper's 4x compression is an ablation row here.
TOY_RECIPE = dict(DEFAULTS, steps=4000, lr=1e-3, warmup=50, schedule="cosine", dropout=0.0, weight_decay=0.5, k=1,
                  log_every=50, save_every=500, export_dtype="fp16")

# What --resume compares with the checkpoint's run: these may change freely; any other difference is refused
# unless --allow-changes is given (a changed architecture cannot load at all).
FREE_ON_RESUME = {"steps", "save_every", "log_every", "workers", "out", "resume", "compile", "precision", "skip_bad",
                  "dist_timeout", "allow_changes", "micro_batch_size", "export_dtype", "checkpointing", "fsdp"}
PATH_FLAGS = ("data", "init", "dino", "vq", "t5")

EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UsageError(ValueError):
    """A bad command line or input: reported in one line, exit status 2."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: p.exit(2, f"error: {message} (train.py --help lists the flags)\n")  # one line, no usage
    p.add_argument("--task", choices=["edit", "control", "vq", "encoder"], default="edit",
                   help="edit / control: train SCAR; vq: a toy tokenizer; encoder: the toy DINOv2")
    p.add_argument("--arch", choices=["next-token", "next-scale"], default="next-token",
                   help="backbone (edit/control) or tokenizer kind (vq): LlamaGen VQ vs VAR multi-scale VQVAE")
    p.add_argument("--model", help=f"backbone size: {', '.join(GPT_SIZES)} (next-token) or toy, d12, d16, d20, d24, d30 "
                   "(next-scale); default toy with the toy world; with --data required unless --init is given")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--toy", action="store_true", help="train on the procedurally generated toy world (the default)")
    source.add_argument("--data", type=Path, help="a folder with manifest.jsonl (README: Data)")
    p.add_argument("--steps", type=int, help="optimiser steps in total, also when resuming (default 1000; toy SCAR: "
                   "the toy recipe's 4000, both backbones)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size per optimiser step")
    p.add_argument("--micro-batch-size", type=int, default=0,
                   help="per-process batch of one forward pass (default: batch / processes); the rest is accumulated")
    p.add_argument("--lr", type=float, help="AdamW learning rate, betas 0.9/0.95 (default 1e-4; toy SCAR 1e-3)")
    p.add_argument("--weight-decay", type=float,
                   help="AdamW weight decay of the weight matrices (default 0.05 as the papers; toy SCAR 0.5)")
    p.add_argument("--warmup", type=int, help="steps of linear learning-rate warmup (default 0; toy SCAR 50)")
    p.add_argument("--schedule", choices=["constant", "cosine"],
                   help="after warmup: constant (default: the papers' fine-tuning) or cosine decay to 0 at --steps (toy SCAR)")
    p.add_argument("--out", type=Path, help="run folder: checkpoint.safetensors, log.jsonl, exports "
                   "(default runs/<task>_<arch>, e.g. runs/edit_next_token)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    p.add_argument("--allow-changes", action="store_true", help="--resume even though hyperparameters (lr, seed, "
                   "dropout, data, ...) differ from the checkpoint's run; without it such a resume is refused")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="bf16 autocast or fp32; default bf16 on CUDA, fp32 on "
                   "CPU (CPU bf16 runs but is ~10-20x slower than fp32 on CPUs without bf16 units)")
    p.add_argument("--compile", action="store_true", help="torch.compile the trained model")
    p.add_argument("--checkpointing", action="store_true", help="SCAR: recompute each backbone block in backward instead "
                   "of keeping its activations (less memory for the sizes past XL, about a third more compute)")
    p.add_argument("--fsdp", action="store_true", help="SCAR with torchrun: shard the weights, gradients and AdamW state "
                   "across the processes (FSDP2, one unit per backbone block; bf16 weights with float32 gradient reduction "
                   "under bf16) instead of a copy on each (DDP): for the backbones past GPT-XL. The checkpoint is the "
                   "same file as DDP's, gathered on rank 0")
    p.add_argument("--init", type=Path, help="official LlamaGen GPT (.pt) or VAR (.pth) checkpoint to start the backbone from")
    p.add_argument("--dino", type=Path, help="DINOv2 checkpoint (hub .pth, HF folder, or the toy encoder's export; "
                   "default with the toy world: the shipped one)")
    p.add_argument("--vq", type=Path, help="tokenizer checkpoint (LlamaGen VQ, VAR VQVAE, or a toy export; default with "
                   "the toy world, next-token: the shipped one)")
    p.add_argument("--image-size", type=int, help="training resolution in pixels (default: 64 on the toy world; with "
                   "--data the paper's, 512 next-token / 256 next-scale)")
    p.add_argument("--dino-size", type=int, help="DINOv2 input size (default: with --data the paper's, 448 / 224, "
                   "which gives 32 x 32 / 16 x 16 features; on the toy world the image size rounded down to the patch size)")
    p.add_argument("--dino-layers", choices=["last", "quarters"], default="last", help="DINOv2 features F_s (DESIGN.md 2)")
    p.add_argument("--dropout", type=float,
                   help="next-token backbone: dropout on its input tokens and on each block's attention and feed-forward "
                   "outputs while training (default 0.1 as LlamaGen's training scripts; toy SCAR 0)")
    p.add_argument("--k", type=int, choices=[1, 2, 4],
                   help="compression per side, k^2 fewer prefix tokens (default 2 as the paper; toy SCAR 1)")
    p.add_argument("--compressor", default="conv+resize", choices=["conv+resize", "resize", "unshuffle"])
    p.add_argument("--delta", type=float, default=0.5, help="weight of L_align")
    p.add_argument("--pres-head", choices=["released", "lean"], default="released", help="U_k, the reconstruction head of "
                   "L_pres: the released code's 3x3 convolutions, or 1x1 convolutions and pixel shuffles (compressor.py)")
    p.add_argument("--pres-weight", type=float, default=1.0,
                   help="weight of L_pres; 0 builds no reconstruction head U_k (the paper's Table 4, w/o L_pres)")
    p.add_argument("--text-rope", choices=["zero", "identity"], default="zero",
                   help="next-token, new backbones: rotary rows of the text tokens, zero as LlamaGen (their q and k are "
                   "then zero: every text key gets the same logit) or identity (an ablation); --init keeps zero")
    p.add_argument("--causal", action="store_true", help="plain causal attention (ablation) instead of the prefix mask")
    p.add_argument("--prefix", choices=["semantic", "vq"], default="semantic",
                   help="P_s from DINOv2 features (SCAR) or the source's own codes (the EditAR baseline; next-scale: its "
                   "f_hat), embedded by the backbone and compressed by --k; no L_align")
    p.add_argument("--distill", action="store_true",
                   help="add EditAR's L_distill (weight 0.5): one 1x1 convolution maps the hidden states that predict the "
                   "target tokens to the target's DINOv2 features")
    p.add_argument("--stop-grad-target", action="store_true",
                   help="no gradient into P_t through L_align (on the toy the compressor's output then grows, and "
                   "L_align with it: docs/toy.md)")
    p.add_argument("--text", choices=["words", "t5", "class"], default="words",
                   help="how T_t reads text: one token per word of the training texts' vocabulary (the toy), T5 "
                   "caption features (LlamaGen t2i weights; needs --t5), or class ids (--task control: the records' "
                   "'label'; on the toy the background, 0 white, 1 gray, 2 black, 3 beige)")
    p.add_argument("--t5", type=Path, help="google/flan-t5-* folder: encodes captions on the fly unless DATA/t5/ holds "
                   "features precomputed by `python data.py t5-features`")
    p.add_argument("--control", default="canny", help="control map kind: canny, softedge or depth; several, comma "
                   "separated (canny,softedge,depth), train one SCAR-Uni model on a uniform mix of them")
    p.add_argument("--skip-bad", action="store_true", help="skip missing or unreadable images (counted in the log)")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes (0 keeps resumption bit-exact)")
    p.add_argument("--save-every", type=int, help="checkpoint interval in steps (default 500)")
    p.add_argument("--log-every", type=int, help="log interval in steps (default 10; toy SCAR 50)")
    p.add_argument("--export-dtype", choices=list(EXPORT_DTYPES),
                   help="dtype of the weights in OUT/<task>.safetensors (default fp32; toy SCAR fp16, as shipped)")
    p.add_argument("--dist-timeout", type=float, default=600, help="seconds a process waits for the others at a "
                   "collective before the job ends, naming the ranks that did not arrive (torchrun)")
    p.add_argument("--seed", type=int, default=0, help=f"0 to {MAX_SEED}")
    args = p.parse_args(argv)
    args.toy = args.data is None
    scar = args.task in ("edit", "control")
    recipe = TOY_RECIPE if args.toy and scar else DEFAULTS
    for name, value in recipe.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    fill_sizes(p, args, scar)
    if args.out is None:
        args.out = Path("runs") / f"{args.task}_{args.arch.replace('-', '_')}"
    check_args(p, args)
    return args


def fill_sizes(p, args, scar: bool):
    """The toy world's defaults (model, frozen parts, 64 px), or the paper's sizes for a data folder."""
    if args.toy:
        args.model = args.model or "toy"
        args.image_size = TOY_SIZE if args.image_size is None else args.image_size
        args.dino_size = args.dino_size or 0
        if scar:
            args.dino = args.dino or SHIPPED / "encoder" / "encoder.safetensors"
            if args.vq is None and args.arch == "next-scale":
                p.error("no toy multi-scale tokenizer ships: train one (python train.py --task vq --arch next-scale) "
                        "and pass it with --vq")
            args.vq = args.vq or SHIPPED / "vq" / "vq.safetensors"
        return
    if scar:
        if args.model is None and args.init is None:
            p.error("--data needs a backbone: --model SIZE (from scratch) or --init CHECKPOINT (official weights)")
        if not (args.dino and args.vq):
            p.error(f"--task {args.task} --data needs --dino and --vq")
        if args.image_size is None:
            args.image_size, args.dino_size = PAPER_SIZES[args.arch][0], args.dino_size or PAPER_SIZES[args.arch][1]
    elif args.image_size is None:
        p.error(f"--task {args.task} --data needs --image-size (the toy {args.task} architecture at your resolution)")
    args.model = args.model or "toy"
    args.dino_size = args.dino_size or 0


def check_args(p, args):
    at_least = {"--steps": (args.steps, 1), "--batch-size": (args.batch_size, 1), "--save-every": (args.save_every, 1),
                "--log-every": (args.log_every, 1), "--image-size": (args.image_size, 1), "--workers": (args.workers, 0),
                "--micro-batch-size": (args.micro_batch_size, 0), "--warmup": (args.warmup, 0),
                "--dino-size": (args.dino_size, 0), "--seed": (args.seed, 0)}
    for flag, (value, low) in at_least.items():
        if value < low:
            p.error(f"{flag} must be at least {low}, got {value}")
    if args.seed > MAX_SEED:
        p.error(f"--seed must be at most {MAX_SEED}, got {args.seed}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a positive finite number, got {args.lr}")
    if not (math.isfinite(args.delta) and args.delta >= 0):
        p.error(f"--delta must be a finite number >= 0, got {args.delta}")
    if not (math.isfinite(args.pres_weight) and args.pres_weight >= 0):
        p.error(f"--pres-weight must be a finite number >= 0, got {args.pres_weight}")
    if args.text_rope != "zero" and (args.init or args.arch != "next-token"):
        p.error("--text-rope identity is for new next-token backbones (official weights were trained with zero rows)")
    if not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        p.error(f"--dist-timeout must be a positive number of seconds, got {args.dist_timeout}")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    for flag in ("checkpointing", "fsdp"):
        if getattr(args, flag) and args.task not in ("edit", "control"):
            p.error(f"--{flag} is for SCAR (--task edit or control)")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        p.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.text == "t5" and args.t5 is None and not (args.data and (args.data / T5_DIR).is_dir()):
        p.error(f"--text t5 needs --t5 FOLDER, or features in DATA/{T5_DIR}/ (python data.py t5-features)")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out}: is a file, not a folder")
    if args.allow_changes and not args.resume:
        p.error("--allow-changes goes with --resume")
    if args.text == "class" and args.task != "control":
        p.error("--text class is for --task control (class-to-image control); edits read instructions")
    try:
        control_kinds(args.control)
    except ValueError as e:
        p.error(f"--control: {e}")


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    store: object = None  # the rendezvous store: where each rank notes the collective it is entering (arrive)
    arrivals: int = 0


def setup_distributed(timeout: float) -> Dist:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python train.py` is a world of one. A collective
    that some rank does not reach within `timeout` seconds fails on the others instead of waiting 30 minutes
    (gloo raises; NCCL's watchdog aborts the process)."""
    if "RANK" not in os.environ:
        return Dist(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(seconds=timeout))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=10))
    run = Dist(dist.get_rank(), dist.get_world_size(), device, store)
    arrive(run, "the start")
    return run


def arrive(run: Dist, where: str):
    """Note in the store that this rank is entering the collective `where`: if one never completes, the
    ranks whose note is older are the ones that stalled or died (stragglers)."""
    if run.store is not None:
        run.arrivals += 1
        run.store.set(f"scar/arrived/{run.rank}", f"{run.arrivals} {where}")


def stragglers(run: Dist) -> str:
    """The ranks that did not reach the collective this rank is in, and the last one they did reach."""
    try:
        notes = [run.store.get(f"scar/arrived/{r}").decode().split(" ", 1) for r in range(run.world)]
    except (RuntimeError, dist.DistError):  # the store went down with the job
        return "unknown (the rendezvous store does not answer)"
    mine = int(notes[run.rank][0])
    behind = [f"rank {r} (last at {where})" for r, (n, where) in enumerate(notes) if int(n) < mine]
    return ", ".join(behind) or "a rank not noted as behind"


def collective_failed(e: Exception) -> str:
    """What went wrong, in a few words, if `e` is a failed collective (gloo raises RuntimeErrors), else ''."""
    cause = re.search(r"timed out[^.\n]*|connection (closed|reset) by peer", str(e), re.I)
    if cause or isinstance(e, dist.DistError) or re.search(r"gloo|nccl", str(e), re.I):
        return cause.group(0) if cause else type(e).__name__
    return ""


def precomputed_text(args) -> bool:
    """T5 features written by `python data.py t5-features` are read instead of running the T5."""
    return args.text == "t5" and args.data is not None and (args.data / T5_DIR).is_dir()


def dataset(args):
    features = precomputed_text(args)
    if args.task == "control":
        if args.toy:
            return ToyControl(TOY_SAMPLES, size=args.image_size, seed=args.seed, control=args.control)
        return ControlDataset(args.data, args.image_size, args.control, skip_bad=args.skip_bad, text_features=features,
                              seed=args.seed)
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
        if args.image_size % self.vq.downsample:
            raise UsageError(f"--image-size {args.image_size} must be a multiple of the tokenizer's {self.vq.downsample} px tokens")
        grid = (args.dino_size or args.image_size) // self.dino.cfg.patch_size
        C = self.dino.cfg.dim * (4 if args.dino_layers == "quarters" else 1)
        scar_cfg = SCARConfig(feature_dim=C, feature_grid=grid, k=args.k, compressor=args.compressor,
                              delta=args.delta, pres_weight=args.pres_weight, pres_head=args.pres_head,
                              stop_grad_target=args.stop_grad_target,
                              causal=args.causal, prefix=args.prefix, distill=EDITAR_DISTILL if args.distill else 0.0)
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
        if args.task == "control":
            self.meta["control"] = list(control_kinds(args.control))
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
            if backbone.cfg.cond != "class" and a.text == "class":
                raise UsageError(f"{a.init} reads captions, not class labels: drop --text class")
            if a.text == "t5" and backbone.cfg.caption_dim != self.t5_dim():
                raise UsageError(f"{a.init} reads {backbone.cfg.caption_dim}-d captions; the T5 gives {self.t5_dim()}-d features")
            return backbone
        if a.model not in GPT_SIZES:
            raise UsageError(f"unknown next-token size {a.model!r}; choose from {', '.join(GPT_SIZES)}")
        backbone = NextTokenTransformer(gpt_config(a.model, **self.text_config(data), vocab_size=self.vq.cfg.codebook_size,
                                                   dropout=a.dropout, text_rope=a.text_rope))
        if isinstance(self.vq, PatchVQ):
            codebook_init(backbone, self.vq.centroids)
        return backbone

    def text_config(self, data) -> dict:
        """How a new backbone reads T_t: T5 features, class ids, or the words of the training texts (fixed here,
        stored with the model; the toy's are every word its generator writes)."""
        a = self.args
        if a.text == "t5":
            return dict(cond="caption", text_len=T5_SLOTS, caption_dim=self.t5_dim())
        if a.text == "class":  # LlamaGen's / VAR's class embedding, its last row the null class of CFG
            return dict(cond="class", num_classes=data.num_classes, text_len=1)
        texts = data.texts()
        words = vocabulary(texts)
        if not words:
            raise UsageError(f"{a.data}: the texts of the data hold no word to read (letters); --text words needs some")
        longest = 0 if a.toy else max(len(words_of(t)) for t in texts)  # the toy's fill-in texts are not real ones
        return dict(cond="words", words=words, text_len=max(TEXT_LEN[a.task], longest))

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
    def inputs(self, batch) -> dict:
        """What SCAR.forward reads: F_s, F_t (DINOv2), the target codes Z_t (the tokenizer) and the text. The
        frozen parts run here, outside autograd and outside the step's autocast, in their own float32: under
        bf16 the tokenizer's nearest-code search would pick other codes than the tokenizer gives at sampling."""
        source, target = batch["source"].to(self.device), batch["target"].to(self.device)
        size, layers = self.args.dino_size or None, self.args.dino_layers
        if self.args.prefix == "vq":  # the source's codes; DINOv2 only for L_distill's target
            F_s = prefix_codes(self.vq, source)
            F_t = self.dino.features(target, layers, size).float() if self.args.distill else None
        else:
            F_s, F_t = self.dino.features(torch.cat([source, target]), layers, size).float().chunk(2)
        codes = self.vq.encode(target)
        text, mask = self.text(batch)
        if self.next_scale:
            return dict(F_s=F_s, F_t=F_t, text=text, codes=torch.cat([c.flatten(1) for c in codes], 1), text_mask=mask,
                        inputs=self.vq.teacher_forcing_input(codes))
        return dict(F_s=F_s, F_t=F_t, text=text, codes=codes.flatten(1), text_mask=mask)

    def losses(self, model, inputs, step):
        return model(**inputs)

    def export(self, weights):
        return weights, self.meta


class VQTask:
    """A toy tokenizer on the images of the data (sources and targets)."""

    def __init__(self, args, device, data):
        self.args = args
        if args.arch == "next-scale":
            self.model = MultiScaleVQVAE(MSVQ_SIZES["toy"]).to(device)
            self.meta = {"kind": "msvq", "config": asdict(self.model.cfg), "patch_nums": list(self.model.cfg.patch_nums)}
        else:
            self.model = PatchVQ(PatchVQConfig()).to(device)
            self.meta = {"kind": "vq", "config": asdict(self.model.cfg)}
            if not args.resume:  # a resumed run reads its centroids from the checkpoint
                self.seed(data)
        self.device, self.tokens = device, 0

    def inputs(self, batch):
        return torch.cat([batch["source"], batch["target"]]).to(self.device)

    def losses(self, model, images, step):
        return {k: v for k, v in model(images).items() if k not in ("recon", "codes")}

    def seed(self, data):
        """PatchVQ's centroids from the patches of the first SEED_IMAGES images of the data."""
        items = [data[i] for i in range(min(len(data), SEED_IMAGES // 2))]
        self.model.seed(torch.cat([collate(items)[k] for k in ("source", "target")]))

    def export(self, weights):
        return weights, self.meta


@torch.no_grad()
def codebook_init(backbone, centroids):
    """A new toy backbone's token embedding and output head start as the PatchVQ centroids (V, 3 p^2) projected
    on their top principal directions, at the embedding's initial scale: codes of alike patches start alike.

    Why: the paper fine-tunes a pretrained LlamaGen, whose embedding and head already know which codes look
    alike; the toy backbone is new, and a head that starts at zero must learn each of the 16 384 rows from the
    few times its code is a target (docs/toy.md measures both starts)."""
    D = backbone.cfg.dim
    c = centroids.double() - centroids.double().mean(0)
    directions = torch.linalg.svd(c, full_matrices=False).Vh[:D]  # (D', 3 p^2), D' = min(D, 3 p^2)
    rows = F.pad(c @ directions.T, (0, D - len(directions)))  # (V, D)
    rows *= 0.02 * D ** 0.5 / rows.norm(dim=1).mean()  # the mean row norm of std-0.02 rows
    backbone.tok_embeddings.weight.copy_(rows)
    backbone.output.weight.copy_(rows)


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

    def inputs(self, batch):
        return batch["source"].to(self.device)

    def losses(self, model, images, step):
        return model(images)

    def export(self, weights):  # the bare DINOv2 in the torch-hub layout: load_dinov2 reads it
        return {k[5:]: v for k, v in weights.items() if k.startswith("dino.")}, self.meta


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


def shard(model, bf16: bool):
    """--fsdp: each backbone block is one FSDP unit (its weights gathered just before it runs, freed after), the rest
    of SCAR (embeddings, head, compressor, projection, U_k) the root unit. Under bf16 the gathered weights are bf16
    and gradients are reduced in float32, as LlamaGen's FSDP runs."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    with torch.no_grad():  # each rank initialised with its own seed: start from rank 0's weights, as DDP does
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)
    backbone = model.backbone
    for block in backbone.layers if isinstance(backbone, NextTokenTransformer) else backbone.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0 only


def full_weights(model, sharded: bool) -> dict:
    """The weights as whole tensors; sharded (FSDP), a collective that gathers them on rank 0 (the others get {})."""
    return get_model_state_dict(model, options=GATHERED) if sharded else model.state_dict()


def full_state(model, opt, sharded: bool) -> tuple[dict, dict]:
    """The weights and AdamW state as whole tensors, AdamW's keyed by parameter index as torch's own state_dict,
    gathered on rank 0 when sharded: one checkpoint file whatever the sharding, so a run can resume with or without
    --fsdp and export as it is."""
    if not sharded:
        return model.state_dict(), opt.state_dict()
    weights, sd = full_weights(model, True), get_optimizer_state_dict(model, opt, options=GATHERED)
    if not sd:
        return weights, sd
    index = {name: i for i, name in enumerate(name for group in sd["param_groups"] for name in group["params"])}
    return weights, {"state": {index[name]: state for name, state in sd["state"].items()},
                     "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in sd["param_groups"]]}


def load_full_state(model, opt, weights: dict, sd: dict, sharded: bool):
    """full_state's inverse; sharded, every rank passes the whole tensors and keeps its shards."""
    if not sharded:
        model.load_state_dict(weights)
        opt.load_state_dict(sd)
        return
    name_of = {p: name for name, p in model.named_parameters()}
    names = [name_of[p] for group in opt.param_groups for p in group["params"]]
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, opt, {"state": {names[i]: state for i, state in sd["state"].items()},
                                          "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                                           for g in sd["param_groups"]]}, options=options)


def optimizer_tensors(sd) -> tuple[dict, dict]:
    tensors = {f"optim.{i}.{k}": v for i, state in sd["state"].items() for k, v in state.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def optimizer_state(tensors: dict, meta: dict) -> dict:
    state = {}
    for key, value in tensors.items():
        _, i, name = key.split(".", 2)
        state.setdefault(int(i), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


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
    # A copy, not the row: torch.set_rng_state crashes (segfault) on a view with a storage offset.
    torch.set_rng_state(tensors["rng"][run.rank].clone())
    if run.device.type == "cuda" and "rng_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng_cuda"][run.rank].clone(), run.device)


def recorded_args(args) -> dict[str, str]:
    """The flags as the checkpoint stores them: strings, paths absolute (a resume from elsewhere compares equal)."""
    return {k: str(Path(v).resolve()) if k in PATH_FLAGS and v is not None else str(v) for k, v in vars(args).items()}


def check_resumable(meta: dict, args, run: Dist, ckpt: Path):
    """Refuse, in one line, a --resume whose flags differ from the checkpoint's run (FREE_ON_RESUME aside)
    unless --allow-changes, and always one with another number of processes (the data and RNG are per rank)."""
    if meta.get("world", run.world) != run.world:
        raise UsageError(f"--resume: {ckpt} was written by {meta['world']} processes; resume it with {meta['world']}, "
                         f"not {run.world} (each rank's data position and RNG state are stored)")
    stored, now = meta.get("args", {}), recorded_args(args)
    changed = [f"--{k.replace('_', '-')} {stored[k]} (now {now[k]})" for k in now
               if k in stored and k not in FREE_ON_RESUME and stored[k] != now[k]]
    if changed and not args.allow_changes:
        raise UsageError(f"--resume: {ckpt} was trained with other settings: {'; '.join(changed)}; pass --allow-changes "
                         "to continue with the new ones")


def save(path, model, opt, step, data_pos, rng, task, args, run):
    """The training state: every trained weight (also heads the export leaves out), AdamW, step, data, RNG.
    Every rank calls it (FSDP gathers the state), rank 0 writes."""
    weights, sd = full_state(model, opt, args.fsdp)
    if run.rank != 0:
        return
    opt_tensors, opt_meta = optimizer_tensors(sd)
    tensors = {**{f"model.{k}": v for k, v in weights.items()}, **opt_tensors, **rng}
    save_checkpoint(path, tensors, {**task.meta, "step": step, "data": data_pos, "optimizer": opt_meta,
                                    "world": run.world, "args": recorded_args(args)})


def export(path, model, task, run, dtype, sharded: bool):
    weights = full_weights(model, sharded)
    if run.rank == 0:  # loaders return float32 models whatever the file holds
        weights, meta = task.export(weights)
        save_checkpoint(path, {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}, meta)


def resume(args, model, opt, run: Dist):
    """Load OUT/checkpoint.safetensors into the model and AdamW; returns (step, epoch, data position)."""
    ckpt = args.out / "checkpoint.safetensors"
    meta = read_meta(ckpt)
    tensors, _ = read_checkpoint(ckpt)
    try:
        load_full_state(model, opt, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
                        optimizer_state({k: v for k, v in tensors.items() if k.startswith("optim.")}, meta["optimizer"]),
                        args.fsdp)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: does not fit this model ({str(e).strip().splitlines()[0]})") from None
    opt.param_groups[0]["weight_decay"] = args.weight_decay  # a changed --weight-decay (--allow-changes) applies
    set_rng_states(tensors, run)
    return meta["step"], *meta["data"]


# ---------------------------------------------------------------- the run folder


def prepare_run_folder(args, run: Dist):
    """Check that the run can start (--resume: a checkpoint of the same configuration; otherwise none to
    overwrite), then rank 0 makes OUT (one line if it cannot be written), removes the temp files of writes that a
    killed process left behind, and drops the log lines past the checkpoint's step (they are redone; a fresh start
    keeps none, so a run killed before its first checkpoint and started again logs each step once)."""
    ckpt = args.out / "checkpoint.safetensors"
    if args.resume:
        if not ckpt.is_file():
            raise UsageError(f"--resume: no checkpoint in {args.out}")
        check_resumable(read_meta(ckpt), args, run, ckpt)
    elif ckpt.is_file():
        raise UsageError(f"{args.out} already holds a run: pass --resume to continue it, or another --out")
    if run.rank != 0:
        return
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.out):
            pass
    except OSError as e:
        raise UsageError(f"--out {args.out}: cannot write there ({e.strerror})") from None
    for stale in args.out.glob(".*.tmp*"):  # save_checkpoint's and trim_log's temp files: .<name>.tmp<pid>
        stale.unlink(missing_ok=True)
    trim_log(args.out / "log.jsonl", read_meta(ckpt)["step"] if args.resume else 0)


def trim_log(path: Path, step: int):
    """Keep the log lines of steps <= `step` (and drop a line cut short by a kill), rewritten atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def log_line(path: Path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------- the loop


def micro_batches(data, run, args, micro: int, epoch: int, pos: int):
    """This rank's micro-batches from sample position `pos` of `epoch` on, epoch after epoch; yields each batch
    with the data position after it, (epoch, position), as the checkpoint stores it."""
    while True:
        data.epoch = epoch  # a SCAR-Uni folder draws each record's control kind anew every epoch
        sampler = DistributedSampler(data, run.world, run.rank, shuffle=True, seed=args.seed, drop_last=True)
        sampler.set_epoch(epoch)
        # A generator of its own: creating a loader must not draw from the global RNG, or a resumed run
        # (which creates one more loader) would drift from the uninterrupted one.
        loader = DataLoader(torch.utils.data.Subset(data, list(sampler)[pos:]), batch_size=micro, shuffle=False,
                            num_workers=args.workers, collate_fn=collate, drop_last=True,
                            generator=torch.Generator().manual_seed(args.seed + epoch))
        for batch in loader:
            pos += micro
            yield batch, (epoch, pos)
        epoch, pos = epoch + 1, 0


@contextlib.contextmanager
def local_gradients(fwd, sharded: bool):
    """Gradients kept on each rank, summed over micro-batches, until the last one syncs them."""
    if not sharded:
        with fwd.no_sync():
            yield
        return
    fwd.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        fwd.set_requires_gradient_sync(True)


def accumulate(task, fwd, stream, accum: int, step: int, run, bf16: bool, sharded: bool):
    """Forward and backward of `accum` micro-batches (gradients summed, synced across ranks on the last one);
    returns the micro-batch averaged loss tensors, the target tokens seen and the data position."""
    totals, tokens = {}, 0
    for i in range(accum):
        batch, position = next(stream)
        inputs = task.inputs(batch)  # the frozen parts, in float32
        syncs = run.world > 1 and i == accum - 1
        with local_gradients(fwd, sharded) if run.world > 1 and not syncs else contextlib.nullcontext():
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=bf16):
                losses = task.losses(fwd, inputs, step)
            if syncs:
                arrive(run, f"the gradient all-reduce of step {step + 1}")
            (losses["loss"] / accum).backward()
        for k, v in losses.items():
            totals[k] = totals.get(k, 0.0) + v.detach().float() / accum
        tokens += task.tokens * batch["target"].shape[0]
    return totals, tokens, position


def check_update(losses: dict, grad_norm, step: int, run: Dist):
    """Stop every rank together, before the update is applied, when a loss term or the gradient is NaN or
    infinite; `losses` are this step's (micro-batch averaged) loss tensors."""
    values = [*losses.values(), grad_norm]
    bad = torch.tensor(float(not all(torch.isfinite(v).all() for v in values)), device=run.device)
    if run.world > 1:
        arrive(run, f"the finiteness check of step {step}")
        dist.all_reduce(bad)
    if bad.item():
        terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        raise FloatingPointError(f"non-finite loss or gradients at step {step} ({terms}, grad norm={grad_norm.item():.4g}); "
                                 "the update was not applied")


def whole(t):
    """A tensor whole: an FSDP shard (DTensor) gathered, on every rank."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def check_weights(model, step: int):
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(whole(p)).all()]
    if bad:
        raise FloatingPointError(f"non-finite weights after step {step} ({bad[0]}, {len(bad)} tensors); not saved")


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
    if args.checkpointing:
        model.backbone.checkpointing = True
    if args.fsdp:
        if run.world == 1:
            raise UsageError("--fsdp shards the model across processes: start the run with torchrun")
        shard(model, bf16)
    opt = make_optimizer(model, args.lr, args.weight_decay)
    ckpt = args.out / "checkpoint.safetensors"
    step, epoch, pos = resume(args, model, opt, run) if args.resume else (0, 0, 0)
    if run.world > 1:
        arrive(run, "the start of training")
    ddp = DDP(model, broadcast_buffers=False) if run.world > 1 and not args.fsdp else model  # buffers: fixed tables
    fwd = torch.compile(ddp) if args.compile else ddp
    log = args.out / "log.jsonl" if run.rank == 0 else None
    if log:
        print(f"train.py: --task {args.task} on {args.data or 'the toy world'}, {args.image_size} px; writing to {args.out}",
              file=sys.stderr)
    bar = tqdm(total=args.steps, initial=step, desc=f"{args.task} {args.arch}", disable=run.rank != 0, dynamic_ncols=True)
    model.train()  # the frozen DINOv2 and tokenizer stay in eval mode
    stream = micro_batches(data, run, args, micro, epoch, pos)
    pending = None  # (step, data position, RNG) of a checkpoint to write once its weights gave a finite step
    try:  # the bar ends its line before any error is printed
        while step < args.steps:
            t0 = time.perf_counter()
            totals, tokens, position = accumulate(task, fwd, stream, accum, step, run, bf16, args.fsdp)
            grad_norm = whole(nn.utils.clip_grad_norm_(model.parameters(), 1.0))
            check_update(totals, grad_norm, step + 1, run)
            if pending:  # the weights it holds have just given a finite loss and finite gradients
                save(ckpt, model, opt, *pending, task, args, run)
                pending = None
            for group in opt.param_groups:
                group["lr"] = learning_rate(args, step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            dt = time.perf_counter() - t0
            if log and (step % args.log_every == 0 or step == args.steps):
                record = {"step": step, **{k: round(v.item(), 5) for k, v in totals.items()},
                          "lr": learning_rate(args, step - 1), "step_time": round(dt, 4)}
                if tokens:
                    record["tokens_per_s"] = round(tokens * run.world / dt, 1)
                log_line(log, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            if step % args.save_every == 0 or step == args.steps:
                if run.world > 1:
                    arrive(run, f"the checkpoint of step {step}")
                pending = (step, position, rng_states(run))
    finally:
        bar.close()
    check_weights(model, step)
    if pending:  # None when a resumed run had no step left to do
        save(ckpt, model, opt, *pending, task, args, run)
    export(args.out / f"{args.task}.safetensors", model, task, run, EXPORT_DTYPES[args.export_dtype], args.fsdp)


def main(argv=None):
    args = parse_args(argv)
    made = not args.out.exists()
    run = setup_distributed(args.dist_timeout)
    try:
        prepare_run_folder(args, run)
        train(args, run)
    except (UsageError, CheckpointError, DataError) as e:
        fail(e, args, run, made)
    except FloatingPointError as e:
        ckpt = args.out / "checkpoint.safetensors"
        kept = f"{ckpt} (step {read_meta(ckpt)['step']}) is kept and resumes" if ckpt.is_file() else "no checkpoint was written"
        fail(f"{e}; {kept}", args, run, made)
    except RuntimeError as e:
        if run.world == 1 or not collective_failed(e):
            raise
        fail(f"rank {run.rank}: a collective failed ({collective_failed(e)}): {stragglers(run)} never reached it, stalled "
             f"or died (a collective waits --dist-timeout {args.dist_timeout:g} s)", args, run, made)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def fail(message, args, run: Dist, made: bool):
    """One line, exit status 2; a run folder this run made and left empty is removed."""
    print(f"error: {message}", file=sys.stderr)
    if run.rank == 0 and made and args.out.is_dir() and not any(args.out.iterdir()):
        args.out.rmdir()
    sys.exit(2)


if __name__ == "__main__":
    main()
