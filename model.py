"""The autoregressive backbones and SCAR on top of them.

Next-token backbone (LlamaGen layout): the sequence is a prefix followed by the image tokens,

    S = [P_s ; T_t ; Z_t]       P_s: compressed DINOv2 features of the source (SCAR only)
                                T_t: class token, caption features or instruction bytes
                                Z_t: target VQ codes, row-major over the target grid

and image token n is predicted from the position just before it. An official LlamaGen model is the
same with no P_s. `Prefix` carries everything the backbone needs to know about [P_s ; T_t]; the
official models and `SCAR` both build one, and training, prefill and decoding all run from it.
"""
import math
import re
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CheckpointError, check_state_dict, read_checkpoint
from compressor import SemanticCompressor


def attention_mask(n_image: int, text_valid, n_target: int, causal: bool = False):
    """Boolean attention mask (B, 1, L, L) for [P_s ; T_t ; Z_t]; True = may attend.

    n_image prefix image tokens, text_valid (B, T) with False at padded text slots, n_target
    target tokens, L = n_image + T + n_target. The paper's mask (DESIGN.md decision 6): the prefix
    [P_s ; T_t] attends bidirectionally within itself, Z_t causally to everything before it; padded
    text slots are never attended to (but attend to themselves, so no row is empty). With
    causal=True every token sees only itself and earlier tokens (LlamaGen, the released SCAR code).

    n_image = 2, T = 2 with the first text slot of this sample padded, n_target = 3:

                  keys:  P P T T Z Z Z            causal=True:  P P T T Z Z Z
        query P          1 1 . 1 . . .                          1 . . . . . .
              P          1 1 . 1 . . .                          1 1 . . . . .
              T (pad)    1 1 1 1 . . .                          1 1 1 . . . .
              T          1 1 . 1 . . .                          1 1 . 1 . . .
              Z          1 1 . 1 1 . .                          1 1 . 1 1 . .
              Z          1 1 . 1 1 1 .                          1 1 . 1 1 1 .
              Z          1 1 . 1 1 1 1                          1 1 . 1 1 1 1
    """
    B, T = text_valid.shape
    n_prefix, L = n_image + T, n_image + T + n_target
    device = text_valid.device
    i = torch.arange(L, device=device)
    allowed = i[None, :] <= i[:, None]  # causal (L, L)
    if not causal:
        allowed = allowed | ((i[:, None] < n_prefix) & (i[None, :] < n_prefix))
    key_valid = torch.cat([text_valid.new_ones(B, n_image), text_valid, text_valid.new_ones(B, n_target)], 1).bool()
    mask = allowed[None] & key_valid[:, None, :]
    return (mask | torch.eye(L, dtype=torch.bool, device=device))[:, None]


def rope_table(rows, cols, head_dim: int, base: float = 10000.0):
    """2D rotary table (N, head_dim / 2, 2) of (cos, sin) for tokens at grid positions (rows, cols).

    As LlamaGen: pair j < head_dim/4 rotates by row * theta_j, pair head_dim/4 + j by col * theta_j,
    theta_j = base^(-4j / head_dim), in float32.
    """
    quarter = head_dim // 4
    theta = 1.0 / (base ** (torch.arange(0, 2 * quarter, 2, device=rows.device)[:quarter].float() / (2 * quarter)))
    angles = torch.cat([rows.float()[:, None] * theta, cols.float()[:, None] * theta], dim=1)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def grid_rope(h: int, w: int, head_dim: int, base: float, offset: int = 0):
    """Rotary table of an h x w grid, row-major, its top-left cell at (offset, offset)."""
    r = torch.arange(h * w)
    return rope_table(r // w + offset, r % w + offset, head_dim, base)


def apply_rope(x, rope):  # x (B, S, H, d), rope (S, d/2, 2) -> rotated x; zero rows give zero
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.flatten(3).type_as(x)


class Prefix(NamedTuple):
    """[P_s ; T_t] as the backbone reads it."""
    h: torch.Tensor  # (B, P, D) embeddings
    valid: torch.Tensor  # (B, P) bool, False at padded text slots
    rope: torch.Tensor  # (P, head_dim / 2, 2); zero rows for text and class tokens
    n_image: int  # the first n_image positions are P_s
    causal: bool  # mask mode, see attention_mask

    def cat(self, other: "Prefix") -> "Prefix":  # along the batch, e.g. [cond ; uncond] for CFG
        return self._replace(h=torch.cat([self.h, other.h]), valid=torch.cat([self.valid, other.valid]))


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def llamagen_ffn_hidden(dim: int) -> int:
    """2/3 of 4 * dim rounded up to a multiple of 256, as LlamaGen sizes its SwiGLU."""
    return find_multiple(int(2 * 4 * dim / 3), 256)


@dataclass
class GPTConfig:
    dim: int = 1280
    n_layer: int = 36
    n_head: int = 20
    n_kv_head: int | None = None  # None: no grouped-query attention
    ffn_hidden: int = 3584
    vocab_size: int = 16384
    cond: str = "caption"  # "class" (c2i), "caption" (t2i: T5 features), "bytes" (the toy's UTF-8 text)
    num_classes: int = 1000
    caption_dim: int = 2048
    text_len: int = 120  # caption or byte slots (1 for a class)
    block_size: int | None = None  # image tokens; None: the number of tokens of each call
    rope_base: float = 10000.0
    norm_eps: float = 1e-5


GPT_SIZES = {"GPT-B": (768, 12, 12), "GPT-L": (1024, 24, 16), "GPT-XL": (1280, 36, 20),
             "GPT-XXL": (1536, 48, 24), "toy": (256, 6, 4)}


def gpt_config(name: str, **overrides) -> GPTConfig:
    if name not in GPT_SIZES:
        raise ValueError(f"unknown GPT size {name!r}; choose from {', '.join(GPT_SIZES)}")
    dim, n_layer, n_head = GPT_SIZES[name]
    return GPTConfig(dim=dim, n_layer=n_layer, n_head=n_head, ffn_hidden=llamagen_ffn_hidden(dim), **overrides)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalised in float32, as LlamaGen
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.dim // cfg.n_head
        self.wqkv = nn.Linear(cfg.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.cache = None  # (k, v) each (B, n_kv_head, max_len, head_dim) while decoding

    def forward(self, x, rope, mask, cache_pos: int = 0):  # x (B, S, D), mask (B, 1, S, keys)
        B, S, D = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([D, kv, kv], dim=-1)
        q = apply_rope(q.view(B, S, self.n_head, self.head_dim), rope).transpose(1, 2)
        k = apply_rope(k.view(B, S, self.n_kv_head, self.head_dim), rope).transpose(1, 2)
        v = v.view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.cache is not None:  # write this step, attend over the filled part only
            end = cache_pos + S
            self.cache[0][:, :, cache_pos:end] = k
            self.cache[1][:, :, cache_pos:end] = v
            k, v = self.cache[0][:, :, :end], self.cache[1][:, :, :end]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_head != self.n_head)
        return self.wo(y.transpose(1, 2).reshape(B, S, D))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention_norm, self.attention = RMSNorm(cfg.dim, cfg.norm_eps), Attention(cfg)
        self.ffn_norm, self.feed_forward = RMSNorm(cfg.dim, cfg.norm_eps), FeedForward(cfg.dim, cfg.ffn_hidden)

    def forward(self, x, rope, mask, cache_pos: int = 0):
        x = x + self.attention(self.attention_norm(x), rope, mask, cache_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class ClassEmbedder(nn.Module):
    """Class id -> one token; the extra last row is the null class used for CFG."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels, drop=None):  # (B,) -> (B, 1, D)
        if drop is not None:
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)[:, None]


class CaptionEmbedder(nn.Module):
    """Caption features (B, T, caption_dim) -> (B, T, D) by a 2-layer MLP; the null caption is a fixed buffer."""

    def __init__(self, caption_dim: int, dim: int, text_len: int):
        super().__init__()
        self.cap_proj = nn.Module()
        self.cap_proj.fc1, self.cap_proj.fc2 = nn.Linear(caption_dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.register_buffer("uncond_embedding", torch.randn(text_len, caption_dim) / caption_dim ** 0.5)

    def forward(self, caption, drop=None):
        if drop is not None:  # the padding mask is kept, as LlamaGen trains and samples
            caption = torch.where(drop[:, None, None], self.uncond_embedding.to(caption.dtype), caption)
        return self.cap_proj.fc2(F.gelu(self.cap_proj.fc1(caption), approximate="tanh"))


class ByteEmbedder(nn.Module):
    """UTF-8 bytes (B, T) -> (B, T, D) with a learned position per slot, for the toy's instructions.

    Text tokens get no rotary position (as LlamaGen's caption tokens), so the order of the bytes
    must live in the embedding itself. Dropping the text replaces every byte by a null id (256).
    """

    def __init__(self, dim: int, text_len: int):
        super().__init__()
        self.embedding = nn.Embedding(257, dim)
        self.position = nn.Parameter(torch.randn(text_len, dim) * 0.02)

    def forward(self, ids, drop=None):
        if drop is not None:
            ids = torch.where(drop[:, None], 256, ids)
        return self.embedding(ids) + self.position[-ids.shape[1]:]


def encode_bytes(texts: list[str], text_len: int):
    """UTF-8 bytes, left-padded to text_len as LlamaGen pads captions -> (ids (B, T) int64, mask (B, T) bool)."""
    ids, mask = torch.zeros(len(texts), text_len, dtype=torch.long), torch.zeros(len(texts), text_len, dtype=torch.bool)
    for b, text in enumerate(texts):
        data = text.encode("utf-8")
        if len(data) > text_len:
            raise ValueError(f"text is {len(data)} bytes long; this model reads at most {text_len}: {text[:40]!r}...")
        if data:
            ids[b, -len(data):] = torch.tensor(list(data))
            mask[b, -len(data):] = True
    return ids, mask


class NextTokenTransformer(nn.Module):
    """LlamaGen's GPT: pre-norm blocks with RMSNorm, fused-qkv attention with 2D RoPE, SwiGLU."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.cond == "class":
            self.cls_embedding = ClassEmbedder(cfg.num_classes, cfg.dim)
        elif cfg.cond == "caption":
            self.cls_embedding = CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.text_len)
        elif cfg.cond == "bytes":
            self.cls_embedding = ByteEmbedder(cfg.dim, cfg.text_len)
        else:
            raise ValueError(f"cond must be 'class', 'caption' or 'bytes', got {cfg.cond!r}")
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.head_dim = cfg.dim // cfg.n_head
        self._decoding = None  # (key validity, prefix length, image tokens) while a KV cache is set up
        self.apply(self._init_weights)
        nn.init.zeros_(self.output.weight)  # as LlamaGen: training starts from uniform predictions

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def text_prefix(self, cond, cond_mask=None, drop=None) -> tuple[torch.Tensor, torch.Tensor]:
        """T_t (B, T, D) and its validity (B, T) bool from class ids, caption features or byte ids."""
        h = self.cls_embedding(cond, drop)
        valid = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if cond_mask is None else cond_mask.bool()
        if valid.shape != h.shape[:2]:
            raise ValueError(f"cond_mask must be (B, T) = {tuple(h.shape[:2])}, got {tuple(valid.shape)}")
        return h, valid

    def prefix(self, cond, cond_mask=None, drop_text=None) -> Prefix:
        """The official prefix: the condition alone, zero rotary rows, plain causal attention."""
        h, valid = self.text_prefix(cond, cond_mask, drop_text)
        return Prefix(h, valid, h.new_zeros(h.shape[1], self.head_dim // 2, 2, dtype=torch.float32), 0, True)

    def forward(self, cond, tokens, cond_mask=None):
        """Teacher-forced logits (B, N, V): logits[:, i] is the distribution of tokens[:, i] given cond and tokens[:, :i]."""
        return self.logits(self.prefix(cond, cond_mask), tokens)

    def grid(self, n_tokens: int) -> int:
        side = math.isqrt(self.cfg.block_size or n_tokens)
        if side * side != (self.cfg.block_size or n_tokens):
            raise ValueError(f"{self.cfg.block_size or n_tokens} image tokens do not form a square grid")
        return side

    def target_rope(self, n_tokens: int, index) -> torch.Tensor:  # rotary rows of target tokens `index`
        g = self.grid(n_tokens)
        return rope_table(index // g, index % g, self.head_dim, self.cfg.rope_base)

    def hidden(self, prefix: Prefix, tokens, n_tokens: int | None = None):
        """Final-normed hidden states (B, P + N - 1, D) of [prefix ; tokens[:, :-1]] under the prefix's mask.

        The target grid is that of `n_tokens` image tokens (default N), so a partial sequence can be run.
        """
        N = tokens.shape[1]
        x = torch.cat([prefix.h, self.tok_embeddings(tokens[:, :-1]).to(prefix.h.dtype)], 1)
        index = torch.arange(N - 1, device=tokens.device)
        rope = torch.cat([prefix.rope.to(tokens.device), self.target_rope(n_tokens or N, index)])
        mask = attention_mask(prefix.n_image, prefix.valid[:, prefix.n_image:], N - 1, prefix.causal)
        for layer in self.layers:
            x = layer(x, rope, mask)
        return self.norm(x)

    def logits(self, prefix: Prefix, tokens, n_tokens: int | None = None):  # (B, N, V), head on the N predicting positions
        P = prefix.h.shape[1]
        return self.output(self.hidden(prefix, tokens, n_tokens)[:, P - 1:]).float()

    def prefill(self, prefix: Prefix, n_tokens: int):
        """Allocate the KV cache, run the prefix once; logits (B, V) of the first image token."""
        B, P, _ = prefix.h.shape
        shape = (B, self.layers[0].attention.n_kv_head, P + n_tokens, self.head_dim)
        for layer in self.layers:
            layer.attention.cache = (prefix.h.new_zeros(shape), prefix.h.new_zeros(shape))
        self._decoding = (torch.cat([prefix.valid, prefix.valid.new_ones(B, n_tokens)], 1), P, n_tokens)
        x = prefix.h
        mask = attention_mask(prefix.n_image, prefix.valid[:, prefix.n_image:], 0, prefix.causal)
        for layer in self.layers:
            x = layer(x, prefix.rope.to(x.device), mask)
        return self.output(self.norm(x[:, -1])).float()

    def decode(self, tokens, index: int):
        """Feed image token `index` (B,) through the cache; logits (B, V) of token index + 1."""
        key_valid, P, n_tokens = self._decoding
        pos = P + index
        x = self.tok_embeddings(tokens)[:, None].to(self.layers[0].attention.cache[0].dtype)
        rope = self.target_rope(n_tokens, torch.tensor([index], device=tokens.device))
        mask = key_valid[:, None, None, :pos + 1]
        for layer in self.layers:
            x = layer(x, rope, mask, cache_pos=pos)
        return self.output(self.norm(x[:, -1])).float()

    def reset_cache(self):
        for layer in self.layers:
            layer.attention.cache = None
        self._decoding = None


def load_llamagen(path, n_head=None, block_size=None, **overrides) -> NextTokenTransformer:
    """An official LlamaGen GPT (c2i or t2i) from its `.pt` file, in eval mode.

    Width, depth, vocabulary, GQA and the condition kind come from the shapes; the head count is
    `n_head`, else width / 64 (every released model). A stray `freqs_cis` key is ignored.
    """
    sd, _ = read_checkpoint(path)
    sd = {k: v for k, v in sd.items() if k != "freqs_cis"}
    return llamagen_from_state_dict(sd, n_head, block_size, source=path, **overrides)


def llamagen_from_state_dict(sd, n_head=None, block_size=None, source="state dict", **overrides):
    core = ("tok_embeddings.weight", "layers.0.attention.wqkv.weight", "output.weight")
    if any(k not in sd for k in core):
        check_state_dict(sd, {k: sd[k].shape if k in sd else () for k in core}, source, "LlamaGen GPT")
    V, dim = sd["tok_embeddings.weight"].shape
    heads = n_head or dim // 64
    if heads < 1 or dim % heads:
        raise CheckpointError(f"{source}: cannot split width {dim} into {heads} heads; pass n_head")
    qkv_rows = sd["layers.0.attention.wqkv.weight"].shape[0]
    n_kv = (qkv_rows // (dim // heads) - heads) // 2
    if "cls_embedding.embedding_table.weight" in sd:
        cond = dict(cond="class", num_classes=sd["cls_embedding.embedding_table.weight"].shape[0] - 1, text_len=1)
    elif "cls_embedding.uncond_embedding" in sd:
        text_len, caption_dim = sd["cls_embedding.uncond_embedding"].shape
        cond = dict(cond="caption", caption_dim=caption_dim, text_len=text_len)
    else:
        raise CheckpointError(f"{source}: no cls_embedding.embedding_table or cls_embedding.uncond_embedding: "
                              "not a LlamaGen c2i or t2i GPT")
    cfg = GPTConfig(dim=dim, n_head=heads, n_kv_head=None if n_kv == heads else n_kv, vocab_size=V,
                    n_layer=1 + max(int(m[1]) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))),
                    ffn_hidden=sd["layers.0.feed_forward.w1.weight"].shape[0] if "layers.0.feed_forward.w1.weight" in sd else 0,
                    block_size=block_size, **cond)
    cfg = replace(cfg, **overrides)
    with torch.device("meta"):
        model = NextTokenTransformer(cfg)
    check_state_dict(sd, {k: v.shape for k, v in model.state_dict().items()}, source, "LlamaGen GPT")
    model.load_state_dict({k: v.to(torch.float32, copy=True) for k, v in sd.items()}, assign=True)
    return model.eval()


@dataclass
class SCARConfig:
    feature_dim: int = 768  # C of the DINOv2 features F_s (768 for ViT-B)
    k: int = 2  # compression per side: k^2 x fewer prefix tokens (paper: 4x)
    compressor: str = "conv+resize"
    delta: float = 0.5  # weight of L_align
    stop_grad_target: bool = False  # detach P_t (the released code lets gradients into it)
    causal: bool = False  # plain causal attention instead of the paper's bidirectional prefix
    drop_text: float = 0.05  # CFG dropouts (EditAR): text only, image prefix only, both
    drop_image: float = 0.05
    drop_both: float = 0.05


class SCAR(nn.Module):
    """SCAR on a next-token backbone.

    Training (`forward`):
        F_c = P_k(F_s)                      compressed source features (B, h/k, w/k, C)
        P_s = W F_c,  P_t = W P_k(F_t)      one Linear(C, D) shared by source and target
        H = backbone([P_s ; T_t ; Z_t])     under attention_mask
        L_CE on Z_t,  L_pres = |F_s - U_k(F_c)|^2,  L_align = |H_s - P_t|^2 with H_s = H at P_s
        loss = L_CE + L_pres + delta * L_align

    P_s tokens get 2D rotary positions on their own h/k x w/k grid, placed at rows and columns
    -h/k .. -1 (before the target grid, which starts at 0) so that no prefix position coincides
    with a target position. `cond` for prefix / generation is the pair (F_s, text).
    """

    def __init__(self, cfg: SCARConfig, backbone: NextTokenTransformer):
        super().__init__()
        self.cfg, self.backbone = cfg, backbone
        D = backbone.cfg.dim
        self.compressor = SemanticCompressor(cfg.feature_dim, cfg.k, cfg.compressor)
        self.proj = nn.Linear(cfg.feature_dim, D, bias=False)
        self.null_prefix = nn.Parameter(torch.randn(D) * 0.02)  # replaces P_s when the image is dropped

    def new_parameter_names(self) -> list[str]:
        """What an official backbone checkpoint does not initialise."""
        return [n for n, _ in self.named_parameters() if not n.startswith("backbone.")]

    def prefix(self, cond, cond_mask=None, drop_text=None, drop_image=None) -> Prefix:
        """[P_s ; T_t] from cond = (F_s (B, h, w, C), text) with per-sample drop flags (B,) bool."""
        F_s, text = cond
        return self._prefix(self.compressor(F_s), text, cond_mask, drop_text, drop_image)

    def _prefix(self, F_c, text, cond_mask, drop_text, drop_image) -> Prefix:
        B, h, w, _ = F_c.shape
        P_s = self.proj(F_c.flatten(1, 2))  # (B, L_c, D)
        if drop_image is not None:
            P_s = torch.where(drop_image[:, None, None], self.null_prefix.to(P_s.dtype), P_s)
        T_t, text_valid = self.backbone.text_prefix(text, cond_mask, drop_text)
        bb = self.backbone
        rope = torch.cat([grid_rope(h, w, bb.head_dim, bb.cfg.rope_base, offset=-max(h, w)),
                          torch.zeros(T_t.shape[1], bb.head_dim // 2, 2)]).to(P_s.device)
        valid = torch.cat([text_valid.new_ones(B, h * w), text_valid], 1)
        return Prefix(torch.cat([P_s, T_t.to(P_s.dtype)], 1), valid, rope, h * w, self.cfg.causal)

    def logits(self, cond, tokens, cond_mask=None):  # (B, N, V) teacher-forced, no dropout
        return self.backbone.logits(self.prefix(cond, cond_mask), tokens)

    def cfg_dropout(self, B: int, device):
        """Per-sample (drop_text, drop_image) flags: text only, image only, or both, each with its probability."""
        u = torch.rand(B, device=device)
        c = self.cfg
        text_only, image_only = u < c.drop_text, (u >= c.drop_text) & (u < c.drop_text + c.drop_image)
        both = (u >= c.drop_text + c.drop_image) & (u < c.drop_text + c.drop_image + c.drop_both)
        return text_only | both, image_only | both

    def forward(self, F_s, F_t, text, codes, text_mask=None) -> dict[str, torch.Tensor]:
        """The three losses for a batch: F_s, F_t (B, h, w, C) DINOv2 features of source and target,
        text (class ids, caption features or byte ids) with its mask, codes Z_t (B, N) int64."""
        drop_text = drop_image = None
        if self.training:
            drop_text, drop_image = self.cfg_dropout(codes.shape[0], codes.device)
        F_c = self.compressor(F_s)
        pres = self.compressor.pres_loss(F_s, F_c)
        prefix = self._prefix(F_c, text, text_mask, drop_text, drop_image)
        H = self.backbone.hidden(prefix, codes)
        P, L_c = prefix.h.shape[1], prefix.n_image
        logits = self.backbone.output(H[:, P - 1:]).float()
        ce = F.cross_entropy(logits.flatten(0, 1), codes.flatten())
        P_t = self.proj(self.compressor(F_t).flatten(1, 2))
        if self.cfg.stop_grad_target:
            P_t = P_t.detach()
        align = self.align_loss(H[:, :L_c], P_t, drop_image)
        return {"ce": ce, "pres": pres, "align": align, "loss": ce + pres + self.cfg.delta * align}

    @staticmethod
    def align_loss(H_s, P_t, drop_image=None):
        """L_align = MSE(H_s, P_t), over the samples whose image prefix was kept (a dropped prefix has no
        source to reason about)."""
        err = (H_s.float() - P_t.float()).pow(2).mean(dim=(1, 2))  # (B,)
        if drop_image is None:
            return err.mean()
        keep = (~drop_image).float()
        return (err * keep).sum() / keep.sum().clamp(min=1)
