"""Frozen pretrained encoders: DINOv2, which gives SCAR its source features F_s.

DINOv2 is written from scratch with the official module names (`blocks.{i}.attn.qkv`, `ls1.gamma`,
...), so the torch-hub `.pth` files load as they are; Hugging Face `facebook/dinov2-*` folders are
renamed into that layout on load. Outputs match the official code to float32 rounding.

    images in [-1,1] --preprocess--> (B,3,H,W) normalised --ViT--> F_s (B, h, w, C), h = H / 14
"""
import html
import json
import math
import re
import unicodedata
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CheckpointError, check_state_dict, read_checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DINOv2Config:
    dim: int = 768
    depth: int = 12
    heads: int = 12
    ffn: str = "mlp"  # "mlp" (ViT-S/B/L) or "swiglu" (ViT-g)
    ffn_hidden: int = 3072
    registers: int = 0
    patch_size: int = 14
    pos_grid: int = 37  # side of the stored position-embedding grid (518 px / 14)
    # How the stored position embedding is resized to other grids, in the official names:
    # hub plain models (0.1, False), register models (0.0, True), HF plain models (0.0, False).
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    v1: bool = False  # DINO (v1), PIE-Bench's structure-distance network: no LayerScale, no mask token


def swiglu_hidden(dim: int) -> int:
    """ViT-g's SwiGLU width: 2/3 of 4C, rounded up to a multiple of 8."""
    return (int(4 * dim * 2 / 3) + 7) // 8 * 8


def dinov2_config(name: str) -> DINOv2Config:
    """Config of a released backbone by its hub name: "vits14", "vitb14", "vitl14", "vitg14", + "_reg"."""
    sizes = {"vits14": (384, 12, 6), "vitb14": (768, 12, 12), "vitl14": (1024, 24, 16), "vitg14": (1536, 40, 24)}
    base, reg = name.removesuffix("_reg"), name.endswith("_reg")
    if base not in sizes:
        raise ValueError(f"unknown DINOv2 size {name!r}; choose from {', '.join(sizes)} (optionally + '_reg')")
    dim, depth, heads = sizes[base]
    swiglu = base == "vitg14"
    return DINOv2Config(dim, depth, heads, "swiglu" if swiglu else "mlp",
                        swiglu_hidden(dim) if swiglu else 4 * dim, registers=4 if reg else 0,
                        interpolate_offset=0.0 if reg else 0.1, interpolate_antialias=reg)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # rows [q; k; v], heads contiguous inside each
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, N, C)
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C / heads)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU, as the official weights expect


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)  # the first half goes through SiLU, the second gates
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.attn = Attention(cfg.dim, cfg.heads)
        self.ls1 = nn.Identity() if cfg.v1 else LayerScale(cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.mlp = (SwiGLU if cfg.ffn == "swiglu" else Mlp)(cfg.dim, cfg.ffn_hidden)
        self.ls2 = nn.Identity() if cfg.v1 else LayerScale(cfg.dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x):  # (B, 3, H, W) -> (B, h*w, C), row-major over the patch grid
        return self.proj(x).flatten(2).transpose(1, 2)


class DINOv2(nn.Module):
    """DINOv2 ViT. Tokens are [cls, registers, patches]; only patch tokens feed SCAR (F_s)."""

    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        self.cfg = cfg
        C, R = cfg.dim, cfg.registers
        self.cls_token = nn.Parameter(torch.randn(1, 1, C) * 1e-6)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + cfg.pos_grid ** 2, C) * 0.02)
        if R:
            self.register_tokens = nn.Parameter(torch.randn(1, R, C) * 1e-6)
        if not cfg.v1:
            self.mask_token = nn.Parameter(torch.zeros(1, C))  # masked-image pretraining only; kept for strict loading
        self.patch_embed = PatchEmbed(C, cfg.patch_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(C, eps=1e-6)

    def interpolate_pos_encoding(self, H: int, W: int) -> torch.Tensor:
        """Position embedding for an H x W input: (1, 1 + h*w, C), float32, grid rows = height.

        The plain hub models resize with scale_factor (h + 0.1) / 37 (bicubic, A = -0.75), which maps
        coordinates differently from size=(h, w); register models and HF folders use size=(h, w),
        register models with antialias. A 518 x 518 input uses the stored grid unchanged.
        """
        p, M, C = self.cfg.patch_size, self.cfg.pos_grid, self.cfg.dim
        h, w = H // p, W // p
        pos = self.pos_embed.float()
        if h * w == M * M and H == W:
            return pos
        offset = self.cfg.interpolate_offset
        resize = dict(scale_factor=((h + offset) / M, (w + offset) / M)) if offset else dict(size=(h, w))
        grid = pos[:, 1:].reshape(1, M, M, C).permute(0, 3, 1, 2)  # (1, C, M, M)
        grid = F.interpolate(grid, mode="bicubic", align_corners=False,
                             antialias=self.cfg.interpolate_antialias, **resize)
        return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)

    def prepare_tokens(self, x, masks=None):  # (B, 3, H, W) normalised -> (B, 1 + R + h*w, C)
        p = self.cfg.patch_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % p or x.shape[3] % p or min(x.shape[2:]) < p:
            raise ValueError(f"DINOv2 expects (B, 3, H, W) with H and W multiples of {p}, got "
                             f"{tuple(x.shape)}; features() resizes images for you")
        B, _, H, W = x.shape
        tokens = self.patch_embed(x)
        if masks is not None:  # (B, h*w) bool: masked-image training replaces those patches by mask_token
            tokens = torch.where(masks[..., None], self.mask_token.to(tokens.dtype)[None], tokens)
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(H, W).to(tokens.dtype)
        if self.cfg.registers:  # registers carry no position embedding
            tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(B, -1, -1), tokens[:, 1:]], dim=1)
        return tokens

    def block_outputs(self, x, indices, masks=None) -> list[torch.Tensor]:
        """Raw outputs (B, 1 + R + N, C) of the 0-based blocks in `indices`, in block order."""
        indices = set(indices)
        if not indices or not indices <= set(range(self.cfg.depth)):
            raise ValueError(f"block indices must lie in 0..{self.cfg.depth - 1}, got {sorted(indices)}")
        x, outs = self.prepare_tokens(x, masks), []
        for i, block in enumerate(self.blocks[:max(indices) + 1]):
            x = block(x)
            if i in indices:
                outs.append(x)
        return outs

    def forward_features(self, x, masks=None) -> dict[str, torch.Tensor]:
        """The official output dict for a normalised input whose sides are multiples of the patch size."""
        x = self.block_outputs(x, [self.cfg.depth - 1], masks)[0]
        normed, R = self.norm(x), self.cfg.registers
        return {"x_norm_clstoken": normed[:, 0], "x_norm_regtokens": normed[:, 1:1 + R],
                "x_norm_patchtokens": normed[:, 1 + R:], "x_prenorm": x}

    def forward(self, x):  # (B, C): the normed class token, as the official model with its Identity head
        return self.forward_features(x)["x_norm_clstoken"]

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        """Patch tokens of the last `n` blocks (int) or of the 0-based blocks listed in `n`, as a tuple.

        `reshape` gives (B, C, h, w) maps; `return_class_token` gives (patches, cls) pairs.
        """
        B, _, H, W = x.shape
        p, R = self.cfg.patch_size, self.cfg.registers
        indices = range(self.cfg.depth - n, self.cfg.depth) if isinstance(n, int) else n
        outs = self.block_outputs(x, indices)
        if norm:
            outs = [self.norm(o) for o in outs]
        patches = [o[:, 1 + R:] for o in outs]
        if reshape:
            patches = [t.reshape(B, H // p, W // p, -1).permute(0, 3, 1, 2).contiguous() for t in patches]
        if return_class_token:
            return tuple(zip(patches, [o[:, 0] for o in outs]))
        return tuple(patches)

    def preprocess(self, images, size=None):
        """Images in [-1,1] -> the normalised input: antialiased bilinear resize, then ImageNet mean/std.

        `size` is an int or (H, W) in pixels, multiples of the patch size; by default each side goes
        down to the nearest multiple (SCAR's configs pass 448 so that 512 px images give 32 x 32 F_s).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        lo, hi = images.aminmax()
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"images must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")
        p = self.cfg.patch_size
        H, W = images.shape[-2:]
        size = (H // p * p, W // p * p) if size is None else (size, size) if isinstance(size, int) else tuple(size)
        if size[0] % p or size[1] % p or min(size) < p:
            raise ValueError(f"DINOv2 input size must be multiples of {p} pixels, got {size[0]}x{size[1]}")
        x = images.float()
        if size != (H, W):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return ((x + 1) / 2 - mean) / std

    @torch.no_grad()
    def features(self, images, layers="last", size=None) -> torch.Tensor:
        """F_s (B, h, w, C) of images in [-1,1] of any size.

        layers="last": the final-normed patch tokens of the last block (C = dim).
        layers="quarters": the raw outputs of the blocks at depths d/4, d/2, 3d/4, d (1-based),
        concatenated on channels and passed through a LayerNorm without affine parameters
        (eps 1e-6), as the authors' released code does (C = 4 * dim).
        """
        x = self.preprocess(images, size)
        B, _, H, W = x.shape
        p, d = self.cfg.patch_size, self.cfg.depth
        if layers == "last":
            tokens = self.forward_features(x)["x_norm_patchtokens"]
        elif layers == "quarters":
            if d < 4:
                raise ValueError(f"layers='quarters' needs at least 4 blocks, this DINOv2 has {d}")
            tokens = torch.cat(self.get_intermediate_layers(x, [d * q // 4 - 1 for q in (1, 2, 3, 4)], norm=False), -1)
            tokens = F.layer_norm(tokens.float(), tokens.shape[-1:], eps=1e-6)
        else:
            raise ValueError(f"layers must be 'last' or 'quarters', got {layers!r}")
        return tokens.reshape(B, H // p, W // p, -1)


# Legacy Hugging Face key names (what `facebook/dinov2-*` files hold) -> official hub names.
# q, k and v are separate there and are fused into `qkv` by `_hub_layout`.
HF_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.w12."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_out\.", r"blocks.\1.mlp.w3."),
    (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),  # norm1, norm2, mlp.fc1, mlp.fc2 keep their names
    (r"^layernorm\.", "norm."),
]
HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def _hub_layout(sd: dict) -> dict:
    """Rename a Hugging Face DINOv2 state dict to the hub layout; unknown keys pass through unchanged."""
    out, qkv = {}, {}
    for key, value in sd.items():
        m = HF_QKV.match(key)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        for pattern, repl in HF_RENAMES:
            if re.match(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        out[key] = value
    for (layer, kind), parts in qkv.items():
        if len(parts) == 3:
            out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
        else:
            out.update({f"encoder.layer.{layer}.attention.attention.{n}.{kind}": t for n, t in parts.items()})
    return out


def _infer_config(sd: dict, hf_config: dict | None, num_heads: int | None, path) -> DINOv2Config:
    core = ("cls_token", "pos_embed", "patch_embed.proj.weight")
    if any(k not in sd for k in core):  # not a ViT at all: report what is missing and what is there
        check_state_dict(sd, {k: sd[k].shape if k in sd else () for k in core}, path, "DINOv2")
    dim, patch = sd["cls_token"].shape[-1], sd["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max((int(m[1]) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    swiglu = "blocks.0.mlp.w12.weight" in sd
    hidden = 4 * dim
    if swiglu and "blocks.0.mlp.w3.weight" in sd:
        hidden = sd["blocks.0.mlp.w3.weight"].shape[1]
    elif "blocks.0.mlp.fc1.weight" in sd:
        hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    if hf_config is not None:
        kind = hf_config.get("model_type")
        if kind not in ("dinov2", "dinov2_with_registers") or hf_config.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"{path}: config.json describes a {kind!r} model, not DINOv2")
        heads = hf_config.get("num_attention_heads", dim // 64)
        # transformers resizes plain models with size=(h, w), unlike the official 0.1 offset.
        antialias = kind == "dinov2_with_registers"
        offset = 0.0
    else:
        heads = num_heads or dim // 64
        antialias, offset = registers > 0, 0.0 if registers else 0.1
    if heads < 1 or dim % heads:
        raise CheckpointError(f"{path}: cannot split width {dim} into {heads} heads; pass num_heads")
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    v1 = hf_config is None and "mask_token" not in sd and "blocks.0.ls1.gamma" not in sd
    return DINOv2Config(dim, depth, heads, "swiglu" if swiglu else "mlp", hidden, registers, patch, grid,
                        offset, antialias, v1)


def load_dinov2(path, num_heads=None) -> DINOv2:
    """A frozen DINOv2 (eval mode, no gradients) from a torch-hub `.pth` or a Hugging Face folder.

    Size, registers, feed-forward kind and interpolation rule come from the checkpoint; the head
    count from the HF config, else `num_heads`, else width / 64 (every released model). A DINO (v1) hub
    file (`dino_vitbase8_pretrain.pth`: no LayerScale, no mask token) loads too, as `cfg.v1`.
    """
    sd, hf_config = read_checkpoint(path)
    return dinov2_from_state_dict(sd, hf_config, num_heads, source=path)


def dinov2_from_state_dict(sd, hf_config=None, num_heads=None, source="state dict") -> DINOv2:
    """`load_dinov2` for a state dict already in memory (hub or HF names; meta tensors allowed)."""
    if hf_config is not None:
        sd = _hub_layout(sd)
    cfg = _infer_config(sd, hf_config, num_heads, source)
    with torch.device("meta"):
        model = DINOv2(cfg)
    check_state_dict(sd, {k: v.shape for k, v in model.state_dict().items()}, source, "DINOv2")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, assign=True)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------- T5: the caption encoder of LlamaGen's t2i models

T5_EOS = 1  # every Flan-T5 tokenizer: pad 0, </s> 1, <unk> 2, no BOS


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 2048  # Flan-T5-XL
    d_kv: int = 64
    num_heads: int = 32
    d_ff: int = 5120
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6


class T5LayerNorm(nn.Module):
    """T5's norm: scale by the root mean square, no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def relative_bucket(offset, num_buckets: int, max_distance: int):
    """Bidirectional T5 buckets of key - query offsets: half the buckets per direction (keys to the
    right get the upper half); small distances exactly, larger ones on a log scale up to max_distance."""
    half = num_buckets // 2
    exact = half // 2
    n = offset.abs()
    log = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (half - exact)).long()
    return (offset > 0).long() * half + torch.where(n < exact, n, log.clamp(max=half - 1))


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_bias:  # only the first block owns the table; every block adds the same position bias
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.num_heads)
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv

    def forward(self, x, bias):  # x (B, T, D), bias (B, H, T, T) position bias + key mask
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, self.d_kv).transpose(1, 2) for proj in (self.q, self.k, self.v))
        scores = (q @ k.transpose(-1, -2) + bias).float()  # T5 folds 1/sqrt(d_kv) into its q weights
        out = scores.softmax(-1).to(v.dtype) @ v  # (B, H, T, d_kv)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))


class T5SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.SelfAttention, self.layer_norm = T5Attention(cfg, has_bias), T5LayerNorm(cfg.d_model, cfg.eps)

    def forward(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5GatedGelu(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)  # the gate
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5FeedForwardLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense, self.layer_norm = T5GatedGelu(cfg), T5LayerNorm(cfg.d_model, cfg.eps)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5SelfAttentionLayer(cfg, has_bias), T5FeedForwardLayer(cfg)])

    def forward(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Encoder(nn.Module):
    """The encoder half of Flan-T5, in Hugging Face's names without the `encoder.` prefix.

        ids (B, T) --embed_tokens--> x --blocks (shared relative position bias)--> final norm --> (B, T, D)

    No absolute positions and no embedding scale: positions enter only through the bias that block 0's
    table gives every block. `tokenize` and `caption_features` need the folder's spiece.model.
    """

    def __init__(self, cfg: T5Config, spiece=None):
        super().__init__()
        self.cfg, self.spiece = cfg, spiece
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.block = nn.ModuleList(T5Block(cfg, has_bias=i == 0) for i in range(cfg.num_layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)

    def position_bias(self, T: int, device):  # (1, H, T, T): bias[h, i, j] = table[bucket(j - i), h]
        pos = torch.arange(T, device=device)
        buckets = relative_bucket(pos[None, :] - pos[:, None], self.cfg.num_buckets, self.cfg.max_distance)
        return self.block[0].layer[0].SelfAttention.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, ids, mask):  # ids, mask (B, T) -> last hidden state (B, T, D), pad rows included
        x = self.embed_tokens(ids)
        key_mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(mask == 0, torch.finfo(x.dtype).min)
        bias = self.position_bias(ids.shape[1], ids.device) + key_mask[:, None, None, :]
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)

    def tokenize(self, texts: list[str], max_len: int = 120):
        """(ids, mask) (B, max_len) int64: sentencepiece pieces + EOS, right-padded with 0; a long text
        keeps its first max_len - 1 pieces and the EOS. No cleaning (see `clean_caption`)."""
        if self.spiece is None:
            raise ValueError("this T5Encoder has no tokenizer: load it with load_t5(folder)")
        ids = torch.zeros(len(texts), max_len, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, text in enumerate(texts):
            pieces = self.spiece.encode(text)[:max_len - 1] + [T5_EOS]
            ids[row, :len(pieces)], mask[row, :len(pieces)] = torch.tensor(pieces), 1
        return ids, mask

    @torch.no_grad()
    def caption_features(self, texts: list[str], max_len: int = 120):
        """LlamaGen's caption conditioning: clean, tokenize, encode, then move each caption's L valid
        vectors to the last L slots (in order) and zero the rest. -> embs (B, max_len, D), mask (B, max_len)
        with zeros first: the left padding the t2i GPT reads."""
        ids, mask = self.tokenize([clean_caption(clean_caption(t)) for t in texts], max_len)
        device = self.embed_tokens.weight.device
        hidden = self(ids.to(device), mask.to(device))
        lengths = mask.sum(1).tolist()
        embs = torch.stack([h.roll(-L, 0) for h, L in zip(hidden, lengths)])  # rotate: valid rows to the end
        flipped = mask.flip(1).to(device)
        return embs * flipped[..., None], flipped


def load_t5(folder) -> T5Encoder:
    """The frozen T5 encoder of a Hugging Face `google/flan-t5-*` folder (config.json with
    model.safetensors, sharded safetensors or pytorch_model.bin); its spiece.model, when present,
    is the tokenizer (read on first use with the sentencepiece package)."""
    sd, hf_config = read_checkpoint(folder)
    if hf_config is None:
        raise CheckpointError(f"{folder}: not a Hugging Face folder with config.json: pass the google/flan-t5-* folder")
    return t5_from_state_dict(sd, hf_config, spiece=Path(folder) / "spiece.model", source=folder)


def t5_from_state_dict(sd, hf_config: dict, spiece=None, source="state dict") -> T5Encoder:
    """`load_t5` for a state dict in memory: the encoder keys of T5ForConditionalGeneration or T5EncoderModel."""
    kind, ffn = hf_config.get("model_type"), hf_config.get("feed_forward_proj", "relu")
    if kind != "t5":
        raise CheckpointError(f"{source}: config.json describes a {kind!r} model, not T5")
    if ffn != "gated-gelu":
        raise CheckpointError(f"{source}: feed_forward_proj is {ffn!r}; only the gated-GELU encoders of Flan-T5 / T5 v1.1 are supported")
    cfg = T5Config(hf_config["vocab_size"], hf_config["d_model"], hf_config["d_kv"], hf_config["num_heads"],
                   hf_config["d_ff"], hf_config["num_layers"], hf_config.get("relative_attention_num_buckets", 32),
                   hf_config.get("relative_attention_max_distance", 128), hf_config.get("layer_norm_epsilon", 1e-6))
    own = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    if "embed_tokens.weight" not in own and "shared.weight" in sd:  # newer save_pretrained drops tied copies
        own["embed_tokens.weight"] = sd["shared.weight"]
    with torch.device("meta"):
        model = T5Encoder(cfg, TokenizerFile(spiece) if spiece else None)
    check_state_dict(own, {k: v.shape for k, v in model.state_dict().items()}, source, "T5 encoder")
    model.load_state_dict({k: v.to(torch.float32, copy=True) for k, v in own.items()}, assign=True)
    return model.eval().requires_grad_(False)


class TokenizerFile:
    """T5's sentencepiece model, opened on first use: only tokenizing needs the sentencepiece package."""

    def __init__(self, path):
        self.path, self.processor = Path(path), None

    def encode(self, text: str) -> list[int]:
        if self.processor is None:
            if not self.path.is_file():
                raise CheckpointError(f"{self.path}: missing: T5's tokenizer file (spiece.model) must sit in the model folder")
            try:
                import sentencepiece
            except ImportError:
                raise CheckpointError("reading T5's spiece.model needs the sentencepiece package: pip install sentencepiece") from None
            self.processor = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        return self.processor.encode(text)


# LlamaGen cleans every caption twice with DeepFloyd IF's clean_caption before T5 sees it. The same rules,
# in the same order, without its ftfy and BeautifulSoup dependencies: HTML tags are dropped and entities
# unescaped by the standard library, and of ftfy's repairs only those that change ordinary text are made
# (full-width forms and Latin ligatures folded, control characters and BOMs removed, NFC). Not reproduced:
# ftfy's mojibake repair (text decoded with the wrong codec) and BeautifulSoup's handling of broken markup.
DASHES = "\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d"
CAPTION_RULES = [  # (pattern, replacement), applied in order after lower-casing
    (r"<person>", "person"),
    (r"\bhttps?:(?:/{1,3}|[a-zA-Z0-9%])|\b[a-zA-Z0-9.\-]+\.(?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b/?(?!@)", ""),  # URLs
    (r"\bwww:(?:/{1,3}|[a-zA-Z0-9%])", ""),
    (r"<[^<>]*>", ""),  # HTML tags (entities are unescaped next)
    (None, "unescape"),
    (r"@[\w\d]+\b", ""),  # @handles
    (r"[\u31c0-\u9fff]+", ""),  # CJK strokes, enclosed and compatibility forms, ideographs (not kana or Hangul)
    (f"[{DASHES}]+", "-"),
    (r"[`´«»“”¨]", '"'),
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),
    (r"\\n", " "),
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (r"\S+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),  # file names
    (r"[\"']{2,}", '"'),
    (r"\.{2,}", " "),
    (r"[#®•©™&@·º½¾¿¡§~()\[\]{}|\\/*]+", " "),
    (r"\s+\.\s+", " "),
    (None, "dashes"),
    (None, "ftfy"),
    (None, "unescape"),
    (None, "unescape"),
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # product codes: jc6640, jc6640vc, 6640vc231, ...
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),
    (r"\b\d+[a-zA-Z]+\d+\b", ""),
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes such as 1920x1080
    (r"\b\s+:\s+", ": "),
    (r"(\D[,./])\b", r"\1 "),
    (r"\s+", " "),
    (r"^[\"']([\w\W]+)[\"']$", r"\1"),  # the text is not stripped before these three, as in the original
    (r"^['_,\-:;]", ""),
    (r"['_,\-:+]$", ""),
    (r"^\.\S+$", ""),
]


def _ftfy_subset(text: str) -> str:
    text = re.sub("[\uff01-\uff5e\u3000\ufb00-\ufb06]", lambda m: unicodedata.normalize("NFKC", m[0]), text)
    return unicodedata.normalize("NFC", re.sub("[\x00-\x08\x0b\x0e-\x1f\x7f\ufeff]", "", text))


def clean_caption(text: str) -> str:
    """One pass of LlamaGen's caption cleaning (it applies two): lower-case, strip URLs, HTML,
    handles, CJK ideographs, most punctuation and web boilerplate, and collapse white space."""
    text = urllib.parse.unquote_plus(str(text)).strip().lower()
    for pattern, replacement in CAPTION_RULES:
        if replacement == "unescape":
            text = html.unescape(text)
        elif replacement == "dashes":
            if len(re.findall(r"[-_]", text)) > 3:  # this-is-a-file-name -> words
                text = re.sub(r"[-_]", " ", text)
        elif replacement == "ftfy":
            text = _ftfy_subset(text)
        else:
            text = re.sub(pattern, replacement, text)
    return text.strip()


# ---------------------------------------------------------------- CLIP: PIE-Bench's image-text similarity

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPTowerConfig:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    eps: float = 1e-5


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTowerConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(cfg.hidden, cfg.hidden) for _ in range(4))

    def forward(self, x, causal: bool):  # (B, N, C)
        B, N, C = x.shape
        q, k, v = (p(x).view(B, N, self.heads, C // self.heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(B, N, C))


class CLIPMlp(nn.Module):
    def __init__(self, cfg: CLIPTowerConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cfg.hidden, cfg.intermediate), nn.Linear(cfg.intermediate, cfg.hidden)

    def forward(self, x):
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick GELU, as OpenAI's CLIP was trained


class CLIPLayer(nn.Module):
    def __init__(self, cfg: CLIPTowerConfig):
        super().__init__()
        self.layer_norm1, self.self_attn = nn.LayerNorm(cfg.hidden, eps=cfg.eps), CLIPAttention(cfg)
        self.layer_norm2, self.mlp = nn.LayerNorm(cfg.hidden, eps=cfg.eps), CLIPMlp(cfg)

    def forward(self, x, causal: bool):
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTowerConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.layers))

    def forward(self, x, causal: bool):
        for layer in self.layers:
            x = layer(x, causal)
        return x


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, vocab: int, positions: int, dim: int):
        super().__init__()
        self.token_embedding, self.position_embedding = nn.Embedding(vocab, dim), nn.Embedding(positions, dim)


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, dim: int, patch: int, image_size: int):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.patch_embedding = nn.Conv2d(3, dim, patch, stride=patch, bias=False)
        self.position_embedding = nn.Embedding(1 + (image_size // patch) ** 2, dim)


class CLIPText(nn.Module):
    def __init__(self, cfg: CLIPTowerConfig, vocab: int, positions: int):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(vocab, positions, cfg.hidden)
        self.encoder, self.final_layer_norm = CLIPEncoder(cfg), nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, ids):  # (1, T) -> (1, C): the state of the first end-of-text token (the largest id)
        e = self.embeddings
        x = e.token_embedding(ids) + e.position_embedding.weight[:ids.shape[1]]
        x = self.final_layer_norm(self.encoder(x, causal=True))
        return x[torch.arange(len(ids)), ids.argmax(-1)]


class CLIPVision(nn.Module):
    def __init__(self, cfg: CLIPTowerConfig, patch: int, image_size: int):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg.hidden, patch, image_size)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)  # sic: the checkpoints' name
        self.encoder, self.post_layernorm = CLIPEncoder(cfg), nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, x):  # (B, 3, S, S) normalised -> (B, C): the class token
        e = self.embeddings
        x = e.patch_embedding(x).flatten(2).transpose(1, 2)
        x = torch.cat([e.class_embedding.expand(len(x), 1, -1), x], 1) + e.position_embedding.weight
        return self.post_layernorm(self.encoder(self.pre_layrnorm(x), causal=False)[:, 0])


class CLIPTokenizer:
    """CLIP's byte-level BPE (vocab.json, merges.txt): lower-cased, white space collapsed, split by CLIP's
    pattern (letters with Python's `re`: ideographs are not split one by one as transformers' basic
    tokenizer does), each piece's bytes as symbols, the last one ending in "</w>", merged by rank."""

    PATTERN = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+",
                         re.IGNORECASE)

    def __init__(self, folder: Path):
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise CheckpointError(f"{folder / name}: missing: CLIP's tokenizer files must sit in the model folder")
        self.vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
        self.ranks = {tuple(m.split()): i for i, m in enumerate(m for m in merges if m.strip())}
        keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        others = [b for b in range(256) if b not in keep]
        self.byte_symbol = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(others)}

    def bpe(self, piece: str) -> list[str]:
        word = [self.byte_symbol[b] for b in piece.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            pairs = [(self.ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(word, word[1:]))]
            rank, i = min(pairs)
            if rank == math.inf:
                break
            first, second = word[i], word[i + 1]
            merged, j = [], 0
            while j < len(word):  # every occurrence of the pair, left to right
                if j + 1 < len(word) and word[j] == first and word[j + 1] == second:
                    merged.append(first + second)
                    j += 2
                else:
                    merged.append(word[j])
                    j += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:  # [<|startoftext|>, ..., <|endoftext|>]
        text = " ".join(text.lower().split())
        tokens = [t for piece in self.PATTERN.findall(text) for t in self.bpe(piece)]
        return [self.vocab["<|startoftext|>"], *(self.vocab[t] for t in tokens), self.vocab["<|endoftext|>"]]


class CLIP(nn.Module):
    """CLIP's two towers and projections in the Hugging Face layout (openai/clip-vit-large-patch14), for
    torchmetrics' CLIPScore as PIE-Bench computes it: max(100 cos(E_I, E_C), 0)."""

    def __init__(self, config: dict, tokenizer: CLIPTokenizer):
        super().__init__()
        t, v = config.get("text_config", {}), config.get("vision_config", {})
        tower = lambda c, d: CLIPTowerConfig(c.get("hidden_size", d[0]), c.get("intermediate_size", d[1]),
                                             c.get("num_hidden_layers", 12), c.get("num_attention_heads", d[2]),
                                             c.get("layer_norm_eps", 1e-5))
        self.positions, self.image_size = t.get("max_position_embeddings", 77), v.get("image_size", 224)
        self.text_model = CLIPText(tower(t, (512, 2048, 8)), t.get("vocab_size", 49408), self.positions)
        self.vision_model = CLIPVision(tower(v, (768, 3072, 12)), v.get("patch_size", 32), self.image_size)
        dim = config.get("projection_dim", 512)
        self.visual_projection = nn.Linear(self.vision_model.post_layernorm.normalized_shape[0], dim, bias=False)
        self.text_projection = nn.Linear(self.text_model.final_layer_norm.normalized_shape[0], dim, bias=False)
        self.logit_scale = nn.Parameter(torch.zeros(()))
        self.tokenizer = tokenizer

    def preprocess(self, image):  # (3, H, W) uint8 -> (1, 3, S, S): CLIP's processor, PIL's bicubic resize
        S = self.image_size
        H, W = image.shape[1:]
        h, w = (S, int(S * W / H)) if H <= W else (int(S * H / W), S)
        pil = PIL.Image.fromarray(image.permute(1, 2, 0).numpy()).resize((w, h), PIL.Image.BICUBIC)
        x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)
        top, left = (h - S) // 2, (w - S) // 2
        x = x[:, top:top + S, left:left + S]
        return ((x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None])[None]

    @torch.no_grad()
    def score(self, image, text: str) -> float:
        """CLIPScore of one uint8 image (3, H, W) and its text; a text past 77 tokens is cut there (as torchmetrics)."""
        ids = torch.tensor([self.tokenizer.encode(text)[:self.positions]])
        dev = self.logit_scale.device
        E_I = self.visual_projection(self.vision_model(self.preprocess(image).to(dev)))
        E_C = self.text_projection(self.text_model(ids.to(dev)))
        return max(100 * F.cosine_similarity(E_I, E_C).item(), 0.0)


def load_clip(folder) -> CLIP:
    """A frozen CLIP from a Hugging Face folder (config.json, the weights, vocab.json, merges.txt)."""
    folder = Path(folder)
    sd, config = read_checkpoint(folder)
    if config.get("model_type") != "clip":
        raise CheckpointError(f"{folder}: config.json describes a {config.get('model_type')!r} model, not CLIP")
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}  # a buffer older exports stored
    model = CLIP(config, CLIPTokenizer(folder))
    check_state_dict(sd, {k: v.shape for k, v in model.state_dict().items()}, folder, "CLIP")
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.eval().requires_grad_(False)
