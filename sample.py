"""Decoding loops for the official backbones and for SCAR models.

Both prefill [P_s ; T_t] once into the KV cache and then decode: one image token per step
(next-token) or one whole scale per step (next-scale). Classifier-free guidance runs on a doubled
batch [cond ; uncond] (EditAR eq. 5), where the unconditional half drops the text (or class) and
keeps the image prefix.
"""
import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from checkpoint import CheckpointError
from data import CONTROLS, DataError, control_map, load_image, to_image, to_tensor
from encoder import load_dinov2, load_t5
from model import encode_words, load_scar, words_of
from vq import load_msvq, load_vq, prefix_codes


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """Keep the top_k largest logits (0 = all), then the smallest set whose probability exceeds top_p
    (1.0 = all; the most likely token always stays); the rest become -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        beyond = sorted_logits.softmax(-1).cumsum(-1) > top_p
        beyond[..., 1:] = beyond[..., :-1].clone()  # keep the token that crosses top_p
        beyond[..., 0] = False
        logits = logits.masked_fill(beyond.scatter(-1, order, beyond), float("-inf"))
    return logits


def probabilities(logits, temperature=1.0, top_k=0, top_p=1.0):  # (B, V) -> (B, V) what sampling draws from
    return F.softmax(filter_logits(logits / max(temperature, 1e-5), top_k, top_p), dim=-1)


def sample_logits(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):  # (B, V) -> (B,) int64
    return torch.multinomial(probabilities(logits, temperature, top_k, top_p), 1, generator=generator)[:, 0]


def plausible_only(guided, cond, plausibility: float):
    """Keep the guided logits of the codes whose conditional probability is at least `plausibility` times the
    most likely code's; the rest become -inf (0 = keep all, plain guidance).

    Guidance extrapolates away from the unconditional branch, and at a strong scale it also lifts codes the
    conditional model itself finds unlikely: on the toy at cfg 3 even greedy decoding drew such codes where the
    edit leaves the image alone, and once one is drawn the rest of the image derails. Restricting guidance to
    the codes the conditional model finds plausible (the adaptive plausibility constraint of contrastive
    decoding) keeps the edit's amplification and drops those codes."""
    if plausibility <= 0:
        return guided
    logp = cond.float().log_softmax(-1)
    return guided.masked_fill(logp < logp.amax(-1, keepdim=True) + math.log(plausibility), float("-inf"))


def guide(logits, cfg: float, plausibility: float = 0.0):  # (2B, V) [cond ; uncond] -> (B, V)
    cond, uncond = logits.chunk(2)
    return plausible_only(uncond + cfg * (cond - uncond), cond, plausibility)


@torch.no_grad()
def generate_tokens(model, cond, n_tokens, cond_mask=None, cfg=1.0, temperature=1.0, top_k=0, top_p=1.0,
                    generator=None, use_cache=True, progress=False, plausibility=0.0, compile=False):
    """Sample (B, n_tokens) int64 image tokens, as LlamaGen's `generate`.

    `model` is an official `NextTokenTransformer` (cond: class ids or caption features with
    `cond_mask`) or a `SCAR` model (cond: (F_s, text)). For cfg > 1 the unconditional half is built
    here from the conditional batch; `plausibility` > 0 restricts it to plausible codes (plausible_only;
    0 = LlamaGen's). `use_cache=False` recomputes the whole sequence every step and gives the same tokens.
    No cache is left on the model afterwards. `progress` shows a bar. `compile` runs each step up to the
    sampling probabilities (decode, guidance, filtering, softmax) as one torch.compile graph with static shapes
    over the whole preallocated cache (gpt-fast style: NextTokenTransformer.decode with a tensor index); the
    draw itself (torch.multinomial with the generator) stays eager, so the tokens are eager decoding's. No
    CUDA graphs: the KV cache is a plain attribute that each prefill replaces.
    """
    backbone = getattr(model, "backbone", model)
    prefix = model.prefix(cond, cond_mask)
    B = prefix.h.shape[0]
    guided = cfg > 1.0
    if guided:
        prefix = prefix.cat(model.prefix(cond, cond_mask, drop_text=torch.ones(B, dtype=torch.bool, device=prefix.h.device)))
    tokens = torch.zeros(B, n_tokens, dtype=torch.long, device=prefix.h.device)

    def probs_of(logits):
        return probabilities(guide(logits, cfg, plausibility) if guided else logits, temperature, top_k, top_p)

    def step(nxt, index):  # probabilities of token index + 1
        return probs_of(backbone.decode(nxt.repeat(2) if guided else nxt, index))
    steps = range(n_tokens)
    if compile:  # 0-dim tensor positions: the graph does not specialise on the step
        step, steps = torch.compile(step, fullgraph=True, dynamic=False), torch.arange(n_tokens, device=prefix.h.device)
    try:
        probs = probs_of(backbone.prefill(prefix, n_tokens)) if use_cache else None
        for i in tqdm(range(n_tokens), desc="decoding", disable=not progress, leave=False):
            if not use_cache:  # the last column is a placeholder that is never read
                seen = tokens[:, :i + 1].repeat(2 if guided else 1, 1)
                probs = probs_of(backbone.logits(prefix, seen, n_tokens)[:, i])
            tokens[:, i] = torch.multinomial(probs, 1, generator=generator)[:, 0]
            if use_cache and i + 1 < n_tokens:
                probs = step(tokens[:, i], steps[i])
    finally:
        backbone.reset_cache()
    return tokens


@torch.no_grad()
def generate_scales(model, vqvae, labels, cfg=1.0, temperature=1.0, top_k=0, top_p=0.0, generator=None, mask=None,
                    progress=False, plausibility=0.0):
    """Sample the codes of every scale, [(B, p, p) int64], as VAR's `autoregressive_infer_cfg`.

    `model` is an official `NextScaleTransformer` (labels: class ids) or a next-scale `SCAR` model
    (labels: (F_s, text)). The batch is always doubled and the guidance ramps linearly over the
    scales: at scale s, guided = (1 + t) cond - t uncond with t = cfg * s / (S - 1), so cfg = 1
    still guides the last scale. top_p = 0.0 is off (VAR's convention); temperature divides the
    guided logits. The image is `vqvae.decode(codes)`. `mask` is the text padding mask of a text model;
    `progress` shows a bar over the scales; `plausibility` as in generate_tokens (0 = VAR's guidance).
    """
    backbone = getattr(model, "backbone", model)
    prefix = model.prefix(labels, mask)
    B = prefix.h.shape[0]
    prefix = prefix.cat(model.prefix(labels, mask, drop_text=torch.ones(B, dtype=torch.bool, device=prefix.h.device)))
    patch_nums = backbone.cfg.patch_nums
    K, S = patch_nums[-1], len(patch_nums)
    f_hat = prefix.h.new_zeros(B, vqvae.cfg.z_channels, K, K, dtype=torch.float32)
    codes, inputs = [], None
    try:
        backbone.prefill(prefix)
        for s, p in enumerate(tqdm(patch_nums, desc="decoding scales", disable=not progress, leave=False)):
            logits = backbone.decode(s, inputs)  # (2B, p^2, V)
            t = cfg * s / (S - 1)
            guided = plausible_only((1 + t) * logits[:B] - t * logits[B:], logits[:B], plausibility)
            idx = sample_logits(guided.flatten(0, 1), temperature, top_k, top_p or 1.0, generator)
            codes.append(idx.view(B, p, p))
            f_hat = f_hat + vqvae.scale_embedding(s, codes[-1])
            if s + 1 < S:
                inputs = vqvae.next_input(f_hat, s).repeat(2, 1, 1)
    finally:
        backbone.reset_cache()
    return codes


# ---------------------------------------------------------------- the command line

# The command line's guidance: over plausible codes only (plausible_only). 0.03 was chosen on held-out edits of
# another seed than the reported ones (docs/toy.md: the shipped model).
PLAUSIBILITY = 0.03

# The shipped toy model (docs/toy.md: the toy stack on a CPU); it finds its encoder and tokenizer in ../encoder, ../vq.
SHIPPED = Path(__file__).resolve().parent / "checkpoints" / "toy"
DEFAULT_CKPT = SHIPPED / "edit_next_token" / "edit.safetensors"
DEFAULT_CONTROL_CKPT = SHIPPED / "control" / "control.safetensors"  # with --control


MAX_SEED = 2 ** 32 - 1


class SampleError(ValueError):
    """A user mistake: reported in one line, exit status 2, nothing written."""


def check_device(name: str) -> str:
    """`name` if torch can run there (cpu, or cuda[:i] with that GPU present), else a SampleError."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SampleError(f"--device {name!r}: not a device (cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SampleError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SampleError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        raise SampleError(f"--device {name}: only cpu and cuda are supported")
    return name


def check_sampling(cfg: float, plausibility: float, seed: int, top_k: int, temperature=1.0, top_p=1.0):
    """One line for each sampling flag out of its range (NaN included: it would silently switch guidance off)."""
    if not (math.isfinite(cfg) and cfg >= 0):
        raise SampleError(f"--cfg must be a finite number >= 0, got {cfg}")
    if not 0 <= plausibility <= 1:
        raise SampleError(f"--plausibility must be between 0 and 1, got {plausibility}")
    if not 0 <= seed <= MAX_SEED:
        raise SampleError(f"--seed must be between 0 and {MAX_SEED}, got {seed}")
    if top_k < 0:
        raise SampleError(f"--top-k must be >= 0, got {top_k}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise SampleError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise SampleError(f"--top-p must be in (0, 1], got {top_p}")


def check_output(path: Path) -> None:
    """Before any generation: `path` can be written (its folder exists and takes files, it is not a folder)."""
    if path.is_dir():
        raise SampleError(f"--out {path}: is a directory; give a file name such as {path / 'edited.png'}")
    if not path.parent.is_dir():
        raise SampleError(f"--out {path}: the folder {path.parent} does not exist")
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise SampleError(f"--out {path}: cannot write in {path.parent} ({e.strerror})") from None


def fit_square(img: Image.Image, size: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Pad the shorter side with the image's border colour (the background of a drawing), then resize
    to size x size; returns the padded box so the output can be cropped back to the input's shape. A larger
    drawing is reduced by averaging the pixels under each model pixel (box filter), as the toy world renders
    its anti-aliased edges, so a drawing's sharp edge arrives as the toy's, without a bicubic halo."""
    w, h = img.size
    side = max(w, h)
    border = np.concatenate([np.asarray(img)[[0, -1]].reshape(-1, 3), np.asarray(img)[:, [0, -1]].reshape(-1, 3)])
    fill = tuple(int(c) for c in np.median(border, axis=0))
    canvas = Image.new("RGB", (side, side), fill)
    box = ((side - w) // 2, (side - h) // 2, (side - w) // 2 + w, (side - h) // 2 + h)
    canvas.paste(img, box[:2])
    return canvas.resize((size, size), Image.BOX if side >= size else Image.BICUBIC), box


def unfit(out: Image.Image, box, side: int, size: tuple[int, int]) -> Image.Image:
    """Inverse of fit_square: back to the padded square's scale, crop the input's box, input's size."""
    return out.resize((side, side), Image.BICUBIC).crop(box).resize(size, Image.BICUBIC)


def tokenizer_of(meta: dict, ckpt: Path, device):
    """The tokenizer a SCAR checkpoint names, its path relative to the checkpoint's folder."""
    vq_path = ckpt.parent / meta["vq"]["path"]
    if meta["arch"] == "next-scale":
        return load_msvq(vq_path, patch_nums=tuple(meta["vq"]["patch_nums"])).to(device)
    return load_vq(vq_path).to(device)


def frozen_parts(meta: dict, ckpt: Path, device, t5=None):
    """The DINOv2, tokenizer and (for T5 models) text encoder a SCAR checkpoint names, paths relative to
    the checkpoint's folder; `t5` overrides the T5 folder recorded at training."""
    dino, vq = load_dinov2(ckpt.parent / meta["dino"]["path"]).to(device), tokenizer_of(meta, ckpt, device)
    text = meta["text"]
    if text["kind"] != "t5":
        return dino, vq, None
    if t5 is None and "t5" not in text:
        raise SampleError(f"{ckpt}: this model reads T5 features: pass --t5 FOLDER (google/flan-t5-*)")
    return dino, vq, load_t5(t5 or ckpt.parent / text["t5"]).to(device)


def text_condition(model, prompts: list[str], t5=None, device="cpu"):
    """T_t's input for the prompts -> (text, mask): class ids, T5 caption features, or word ids."""
    cfg = model.backbone.cfg
    if cfg.cond == "class":
        if not all(p.strip().isdigit() and int(p) < cfg.num_classes for p in prompts):
            raise SampleError(f"this model is class-conditional: the prompt must be a class id, 0 to {cfg.num_classes - 1}")
        return torch.tensor([int(p) for p in prompts], device=device), None
    if cfg.cond == "caption":
        embs, mask = t5.caption_features(prompts)
        return embs.to(device), mask.bool().to(device)
    if not all(words_of(p) for p in prompts):
        raise SampleError(f"the prompt {prompts[0][:40]!r} has no word (letters) this model can read")
    try:
        ids, mask = encode_words(prompts, cfg.words, cfg.text_len)
    except ValueError as e:  # a word the model never read, or more words than its text slots
        raise SampleError(str(e)) from None
    return ids.to(device), mask.to(device)


@torch.no_grad()
def source_condition(meta, dino, vq, x):
    """The source x (B, 3, S, S) as SCAR.prefix reads it: DINOv2's features F_s, or, for the EditAR
    baseline (--prefix vq), the tokenizer's codes (vq.prefix_codes)."""
    if meta["scar"].get("prefix") == "vq":
        return prefix_codes(vq, x)
    return dino.features(x, meta["dino"]["layers"], meta["dino"]["size"]).float()


@torch.no_grad()
def edit_batch(model, meta, dino, vq, x, prompts: list[str], cfg=3.0, temperature=1.0, top_k=0, top_p=1.0,
               generator=None, progress=False, t5=None, plausibility=PLAUSIBILITY, compile=False):
    """Images (B, 3, S, S) in [-1, 1] generated from sources x (B, 3, S, S) at the model's resolution S
    (the image to edit, or a control map) and the prompts. `compile`: the compiled decoder (next-token only)."""
    F_s = source_condition(meta, dino, vq, x)
    text, mask = text_condition(model, prompts, t5, x.device)
    if meta["arch"] == "next-scale":
        if compile:
            raise SampleError("--compile compiles the next-token decode step; this is a next-scale model")
        codes = generate_scales(model, vq, (F_s, text), cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p,
                                generator=generator, mask=mask, progress=progress, plausibility=plausibility)
    else:
        grid = meta["image_size"] // vq.downsample
        codes = generate_tokens(model, (F_s, text), grid * grid, cond_mask=mask, cfg=cfg, temperature=temperature,
                                top_k=top_k, top_p=top_p, generator=generator, progress=progress,
                                plausibility=plausibility, compile=compile).view(-1, grid, grid)
    return vq.decode(codes).clamp(-1, 1)


def edit(model, meta, dino, vq, image: Image.Image, prompt: str, n=1, cfg=3.0, temperature=1.0, top_k=0, top_p=1.0,
         seed=0, device="cpu", t5=None, plausibility=PLAUSIBILITY, compile=False, control=None) -> list[Image.Image]:
    """`n` outputs for `image` (any size or aspect ratio) and `prompt`, at the input's size. `control` "canny",
    "softedge" or "depth": the image is a picture whose map the model reads, computed at the model's resolution
    as in training (a map computed at a larger size and reduced would arrive faint and blurred)."""
    square, box = fit_square(image, meta["image_size"])
    x = to_tensor(square)
    x = (control_map(x, control) if control in CONTROLS else x)[None].to(device).expand(n, -1, -1, -1)
    out = edit_batch(model, meta, dino, vq, x, [prompt] * n, cfg, temperature, top_k, top_p,
                     torch.Generator(device).manual_seed(seed), progress=True, t5=t5, plausibility=plausibility,
                     compile=compile)
    return [unfit(to_image(o), box, max(image.size), image.size) for o in out]


def grid_image(images: list[Image.Image]) -> Image.Image:
    w, h = images[0].size
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    canvas = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        canvas.paste(img, ((i % cols) * w, (i // cols) * h))
    return canvas


def save_atomic(img: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Edit an image (or generate one from a control map) with a SCAR model: source image -> DINOv2 "
                    "-> compressor -> prefill -> decode -> VQ decode, with classifier-free guidance.",
        epilog='examples:\n  python sample.py --image examples/heldout_9_remove.png --prompt "remove the blue circle"\n'
               '  python sample.py --image examples/control_drawing.png --control canny --prompt "a red circle and a blue '
               'square on a white background"\n'
               '  python sample.py --image edges.png --control map --prompt "a cat on a sofa" --ckpt runs/canny/control.safetensors\n'
               '  python sample.py --image photo.jpg --prompt "make the sky pink" --ckpt runs/xl/edit.safetensors --t5 flan-t5-xl',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=Path, required=True, help="the source image (any format Pillow reads, any size)")
    p.add_argument("--prompt", required=True, help="the instruction (\"make the circle blue\"), a caption, or a class "
                   "id for class-conditional control models")
    p.add_argument("--ckpt", type=Path, help="SCAR checkpoint (default: the shipped toy editor, or with --control the "
                   "shipped toy control model)")
    p.add_argument("--out", type=Path, help="output PNG (default: <image name>_edited.png next to the input)")
    p.add_argument("--n", type=int, default=1, help="number of samples, saved side by side as one grid")
    p.add_argument("--control", choices=["map", *CONTROLS],
                   help="controllable generation (a control model): the image is the control map (map), or a picture "
                        "whose map is computed at the model's resolution (canny, softedge, depth)")
    p.add_argument("--text", choices=["words", "t5", "class"], help="how the model reads text (default: as it was trained)")
    p.add_argument("--t5", type=Path, help="google/flan-t5-* folder for T5 models (default: the one used in training)")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = none; EditAR uses 3)")
    p.add_argument("--plausibility", type=float, default=PLAUSIBILITY,
                   help="guidance acts only on codes whose conditional probability is at least this fraction of the "
                        "most likely code's (0 = plain EditAR guidance; see plausible_only)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely codes (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same image")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--compile", action="store_true", help="compile the decode step (next-token models): the same "
                   "image, faster per token once compiled; compiling takes seconds to a minute, worth it for large "
                   "models or many samples")
    p.error = lambda message: p.exit(2, f"error: {message} (sample.py --help lists the flags)\n")  # one line, no usage
    args = p.parse_args(argv)
    args.ckpt = args.ckpt or (DEFAULT_CONTROL_CKPT if args.control else DEFAULT_CKPT)
    return args


def check_control(control: str | None, meta: dict, ckpt: Path):
    """--control goes with control models, and names a kind the model was trained on."""
    task, trained = meta.get("task"), meta.get("control", list(CONTROLS))
    if (task == "control") != (control is not None):
        raise SampleError(f"{ckpt}: trained for {task!r}: " + ("pass --control" if task == "control" else "drop --control"))
    if control not in (None, "map", *trained):
        raise SampleError(f"{ckpt}: trained on {', '.join(trained)} maps, not {control}")


def main(argv=None):
    args = parse_args(argv)
    try:
        if not args.prompt.strip():
            raise SampleError("the prompt is empty")
        if args.n < 1:
            raise SampleError("--n must be at least 1")
        check_sampling(args.cfg, args.plausibility, args.seed, args.top_k, args.temperature, args.top_p)
        check_device(args.device)
        out = args.out or args.image.with_name(f"{args.image.stem}_edited.png")
        check_output(out)
        image = load_image(args.image)
        model, meta = load_scar(args.ckpt)
        kind = meta["text"]["kind"]
        if args.text and args.text != kind:
            raise SampleError(f"{args.ckpt}: this model reads text as {kind}, not {args.text}")
        check_control(args.control, meta, args.ckpt)
        model = model.to(args.device)
        dino, vq, t5 = frozen_parts(meta, args.ckpt, args.device, args.t5)
        outs = edit(model, meta, dino, vq, image, args.prompt.strip(), args.n, args.cfg, args.temperature, args.top_k,
                    args.top_p, args.seed, args.device, t5, args.plausibility, args.compile, args.control)
        save_atomic(grid_image(outs), out)
        print(out)
    except (SampleError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
