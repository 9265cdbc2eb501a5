"""The autoregressive backbones and SCAR on top of them.

Next-token backbone (LlamaGen layout): the sequence is a prefix followed by the image tokens,

    S = [P_s ; T_t ; Z_t]       P_s: compressed DINOv2 features of the source (SCAR only)
                                T_t: class token, caption features or instruction words
                                Z_t: target VQ codes, row-major over the target grid

and image token n is predicted from the position just before it. An official LlamaGen model is the
same with no P_s. `Prefix` carries everything the backbone needs to know about [P_s ; T_t]; the
official models and `SCAR` both build one, and training, prefill and decoding all run from it.
"""
import functools
import math
import re
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from checkpoint import CheckpointError, check_state_dict, few, read_checkpoint, read_meta
from compressor import SemanticCompressor


CAUSAL = "causal"  # attention_mask's answer for a plainly causal pattern: SDPA's own causal path, no dense mask


def attention_mask(n_image: int, text_valid, target_blocks, causal: bool = False, flex: bool = False):
    """Boolean attention mask (B, 1, L, L) for [P_s ; T_t ; Z_t]; True = may attend (with flex=True the same
    pattern as a flex_attention BlockMask). Where the pattern is plain causal attention (causal=True, one token
    per step, no padded text slot) it returns CAUSAL instead: on the CPU, SDPA would otherwise keep a float copy
    of the (L x L) mask in every layer.

    n_image prefix image tokens; text_valid (B, T) with False at padded text slots; target_blocks
    the number of target tokens (next-token: each its own step) or the list of block lengths
    (next-scale: one block per scale, p^2 tokens each). L = n_image + T + target tokens.

    The paper's mask (DESIGN.md decisions 6 and 9): the prefix [P_s ; T_t] attends bidirectionally
    within itself; a target token sees the whole prefix and every target token of its own block or
    an earlier one; padded text slots are never attended to (but attend to themselves, so no row is
    empty). With causal=True the prefix is causal too, as in LlamaGen, VAR and the released SCAR code.

    n_image = 2, T = 2 with the first text slot of this sample padded, 3 target tokens:

                  keys:  P P T T Z Z Z            causal=True:  P P T T Z Z Z
        query P          1 1 . 1 . . .                          1 . . . . . .
              P          1 1 . 1 . . .                          1 1 . . . . .
              T (pad)    1 1 1 1 . . .                          1 1 1 . . . .
              T          1 1 . 1 . . .                          1 1 . 1 . . .
              Z          1 1 . 1 1 . .                          1 1 . 1 1 . .
              Z          1 1 . 1 1 1 .                          1 1 . 1 1 1 .
              Z          1 1 . 1 1 1 1                          1 1 . 1 1 1 1

    With target_blocks = [1, 2] instead of 3, the last two Z see each other (one scale of 2 tokens).
    """
    B, T = text_valid.shape
    if causal and isinstance(target_blocks, int) and not flex and bool(text_valid.all()):
        return CAUSAL
    blocks = [1] * target_blocks if isinstance(target_blocks, int) else list(target_blocks)
    n_prefix, device = n_image + T, text_valid.device
    # Each position gets a step id; a query attends to keys whose step is not later than its own.
    prefix_steps = torch.arange(n_prefix, device=device) if causal else torch.zeros(n_prefix, dtype=torch.long, device=device)
    target_steps = n_prefix + torch.repeat_interleave(torch.arange(len(blocks), device=device),
                                                      torch.tensor(blocks, dtype=torch.long, device=device))
    steps = torch.cat([prefix_steps, target_steps])
    L = steps.numel()
    key_valid = torch.cat([text_valid.new_ones(B, n_image), text_valid, text_valid.new_ones(B, L - n_prefix)], 1).bool()
    if flex:
        def allowed(b, h, q, kv):
            return ((steps[kv] <= steps[q]) & key_valid[b, kv]) | (q == kv)
        return create_block_mask(allowed, B, None, L, L, device=device)
    mask = (steps[None, :] <= steps[:, None])[None] & key_valid[:, None, :]
    return (mask | torch.eye(L, dtype=torch.bool, device=device))[:, None]


def use_flex(x) -> bool:
    """Whether the full-sequence passes (training, teacher forcing) run flex_attention: on CUDA, where a
    dense boolean mask would push SDPA off its fused kernels (DESIGN.md). Prefill and decoding keep SDPA."""
    return x.is_cuda


@functools.cache
def compiled_flex():
    """flex_attention compiled: one fused kernel that skips fully masked blocks (called eagerly it would
    materialise the whole score matrix). Made on first use, since creating it adds seconds to every import."""
    return torch.compile(flex_attention, dynamic=False)


def attend(q, k, v, mask, scale=None, enable_gqa=False):  # q (B, H, S, d), k, v (B, H_kv, keys, d)
    """Attention under a dense boolean mask (SDPA, the reference path), CAUSAL (SDPA's causal kernel), None
    (every key) or a BlockMask (flex_attention)."""
    if isinstance(mask, BlockMask):  # flex has no autocast rule: q and k follow v's dtype
        return compiled_flex()(q.to(v.dtype), k.to(v.dtype), v, block_mask=mask, scale=scale, enable_gqa=enable_gqa)
    if isinstance(mask, str):  # CAUSAL: queries and keys are the same positions (a whole sequence, or a prefill)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)


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


def call_block(block, checkpointing: bool, *inputs):
    """One transformer block; with `checkpointing`, while gradients are recorded, its activations are not kept
    but recomputed in backward (the same dropout masks: the RNG state is replayed)."""
    if checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False)
    return block(*inputs)


class Prefix(NamedTuple):
    """[P_s ; T_t] as a backbone reads it."""
    h: torch.Tensor  # (B, P, D) embeddings
    valid: torch.Tensor  # (B, P) bool, False at padded text slots
    n_image: int  # the first n_image positions are P_s
    causal: bool  # mask mode, see attention_mask
    rope: torch.Tensor | None = None  # next-token: (P, head_dim / 2, 2); text and class tokens: GPTConfig.text_rope
    cond: torch.Tensor | None = None  # next-scale: (B, D) AdaLN condition (class or pooled text embedding)

    def cat(self, other: "Prefix") -> "Prefix":  # along the batch, e.g. [cond ; uncond] for CFG
        cond = None if self.cond is None else torch.cat([self.cond, other.cond])
        return self._replace(h=torch.cat([self.h, other.h]), valid=torch.cat([self.valid, other.valid]), cond=cond)


def update_cache(cache, k, v, pos):
    """Write k, v (B, H, S, d) at positions pos.. of a preallocated (k, v) cache; return the filled part.

    With pos a 0-dim tensor (the compiled decoder) the write is in place at a position the graph does not
    specialise on, and the whole cache is returned: every step has the same shapes, the caller masks the rest."""
    if isinstance(pos, torch.Tensor):
        index = pos + torch.arange(k.shape[2], device=k.device)
        return cache[0].index_copy_(2, index, k), cache[1].index_copy_(2, index, v)
    end = pos + k.shape[2]
    cache[0][:, :, pos:end] = k
    cache[1][:, :, pos:end] = v
    return cache[0][:, :, :end], cache[1][:, :, :end]


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
    cond: str = "caption"  # "class" (c2i), "caption" (t2i: T5 features), "words" (WordEmbedder: the toy)
    num_classes: int = 1000
    caption_dim: int = 2048
    words: tuple = ()  # cond="words": the vocabulary, stored with the model
    text_len: int = 120  # caption or word slots (1 for a class)
    block_size: int | None = None  # image tokens; None: the number of tokens of each call
    rope_base: float = 10000.0
    # Rotary rows of text and class tokens: "zero" as LlamaGen (their q and k are then zero, so every query gives
    # every text key the same logit; official weights need it), or "identity" (unrotated: text keys get logits
    # that depend on the text), an ablation for backbones trained from scratch.
    text_rope: str = "zero"
    norm_eps: float = 1e-5
    dropout: float = 0.0  # while training, on the input tokens, the attention and feed-forward outputs (LlamaGen: 0.1)


GPT_SIZES = {"GPT-B": (768, 12, 12), "GPT-L": (1024, 24, 16), "GPT-XL": (1280, 36, 20),
             "GPT-XXL": (1536, 48, 24), "toy": (128, 6, 2)}


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
            k, v = update_cache(self.cache, k, v, cache_pos)
        y = attend(q, k, v, mask, enable_gqa=self.n_kv_head != self.n_head)
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
        self.dropout = cfg.dropout

    def forward(self, x, rope, mask, cache_pos: int = 0):
        x = x + F.dropout(self.attention(self.attention_norm(x), rope, mask, cache_pos), self.dropout, self.training)
        return x + F.dropout(self.feed_forward(self.ffn_norm(x)), self.dropout, self.training)


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


class WordEmbedder(nn.Module):
    """Word ids (B, T) of a closed vocabulary -> (B, T, D) with a learned position per slot: T_t where no
    pretrained text encoder is used (the toy).

    One token per word, as T5's tokenizer gives the toy's words, so "green" is the same token wherever it
    stands. (Reading UTF-8 bytes, the toy model painted "make the triangle green" red and edited at most
    82.5 % of the held-out edits; reading words, all of them: docs/toy.md, words, not bytes.) Text tokens get no rotary
    position (as LlamaGen's caption tokens), so the order of the words lives in the embedding itself.
    Dropping the text replaces every word by a null id (the vocabulary's size).
    """

    def __init__(self, n_words: int, dim: int, text_len: int):
        super().__init__()
        self.null = n_words
        self.embedding = nn.Embedding(n_words + 1, dim)
        self.position = nn.Parameter(torch.randn(text_len, dim) * 0.02)

    def forward(self, ids, drop=None):
        if drop is not None:
            ids = torch.where(drop[:, None], self.null, ids)
        return self.embedding(ids) + self.position[-ids.shape[1]:]


def words_of(text: str) -> list[str]:
    """The words of a text: lower-cased runs of letters (case, digits and punctuation carry no meaning here)."""
    return re.findall(r"[^\W\d_]+", text.lower())


def vocabulary(texts) -> tuple[str, ...]:
    """The sorted words of the training texts: the ids a WordEmbedder reads."""
    return tuple(sorted({w for text in texts for w in words_of(text)}))


def encode_words(texts: list[str], words: tuple[str, ...], text_len: int):
    """Word ids, left-padded to text_len as LlamaGen pads captions -> (ids (B, T) int64, mask (B, T) bool)."""
    index = {w: i for i, w in enumerate(words)}
    ids, mask = torch.zeros(len(texts), text_len, dtype=torch.long), torch.zeros(len(texts), text_len, dtype=torch.bool)
    for b, text in enumerate(texts):
        found = words_of(text)
        unknown = [w for w in found if w not in index]
        if unknown:
            raise ValueError(f"unknown word {unknown[0]!r}: this model knows {len(words)} words: {' '.join(words)}")
        if len(found) > text_len:
            raise ValueError(f"text is {len(found)} words long; this model reads at most {text_len}: {text[:40]!r}...")
        if found:
            ids[b, -len(found):] = torch.tensor([index[w] for w in found])
            mask[b, -len(found):] = True
    return ids, mask


class NextTokenTransformer(nn.Module):
    """LlamaGen's GPT: pre-norm blocks with RMSNorm, fused-qkv attention with 2D RoPE, SwiGLU."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.checkpointing = False  # recompute each block in backward (train.py --checkpointing)
        if cfg.cond == "class":
            self.cls_embedding = ClassEmbedder(cfg.num_classes, cfg.dim)
        elif cfg.cond == "caption":
            self.cls_embedding = CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.text_len)
        elif cfg.cond == "words":
            self.cls_embedding = WordEmbedder(len(cfg.words), cfg.dim, cfg.text_len)
        else:
            raise ValueError(f"cond must be 'class', 'caption' or 'words', got {cfg.cond!r}")
        if cfg.text_rope not in ("zero", "identity"):
            raise ValueError(f"text_rope must be 'zero' or 'identity', got {cfg.text_rope!r}")
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

    def text_rope(self, n: int) -> torch.Tensor:  # (n, head_dim / 2, 2) rotary rows of n text tokens
        rows = torch.zeros(n, self.head_dim // 2, 2)
        if self.cfg.text_rope == "identity":
            rows[..., 0] = 1  # cos 1, sin 0
        return rows

    def prefix(self, cond, cond_mask=None, drop_text=None) -> Prefix:
        """The official prefix: the condition alone, text rotary rows, plain causal attention."""
        h, valid = self.text_prefix(cond, cond_mask, drop_text)
        return Prefix(h, valid, 0, True, rope=self.text_rope(h.shape[1]).to(h.device))

    def image_text_prefix(self, P_s, grid, text, cond_mask, drop_text, causal) -> Prefix:
        """[P_s ; T_t] for SCAR: P_s (B, h*w, D) on its own h x w rotary grid at rows and columns
        -max(h, w) .. (before the target grid, which starts at 0, so no cell coincides), T_t with text rows."""
        (h, w), B = grid, P_s.shape[0]
        T_t, text_valid = self.text_prefix(text, cond_mask, drop_text)
        rope = torch.cat([grid_rope(h, w, self.head_dim, self.cfg.rope_base, offset=-max(h, w)),
                          self.text_rope(T_t.shape[1])]).to(P_s.device)
        valid = torch.cat([text_valid.new_ones(B, h * w), text_valid], 1)
        return Prefix(torch.cat([P_s, T_t.to(P_s.dtype)], 1), valid, h * w, causal, rope=rope)

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
        x = F.dropout(x, self.cfg.dropout, self.training)
        index = torch.arange(N - 1, device=tokens.device)
        rope = torch.cat([prefix.rope.to(tokens.device), self.target_rope(n_tokens or N, index)])
        mask = attention_mask(prefix.n_image, prefix.valid[:, prefix.n_image:], N - 1, prefix.causal, use_flex(x))
        for layer in self.layers:
            x = call_block(layer, self.checkpointing, x, rope, mask)
        return self.norm(x)

    def predict(self, H, prefix: Prefix):  # hidden states -> logits (B, N, V) of the N target tokens only
        return self.output(H[:, prefix.h.shape[1] - 1:]).float()

    def logits(self, prefix: Prefix, tokens, n_tokens: int | None = None):  # (B, N, V) teacher-forced
        return self.predict(self.hidden(prefix, tokens, n_tokens), prefix)

    def prefill(self, prefix: Prefix, n_tokens: int):
        """Allocate the KV cache, run the prefix once; logits (B, V) of the first image token."""
        B, P, _ = prefix.h.shape
        shape = (B, self.layers[0].attention.n_kv_head, P + n_tokens, self.head_dim)
        for layer in self.layers:
            layer.attention.cache = (prefix.h.new_zeros(shape), prefix.h.new_zeros(shape))
        key_valid = None if prefix.valid.all() else torch.cat([prefix.valid, prefix.valid.new_ones(B, n_tokens)], 1)
        self._decoding = (key_valid, P, n_tokens)  # nothing padded: a decode step attends to every filled key
        x = prefix.h
        mask = attention_mask(prefix.n_image, prefix.valid[:, prefix.n_image:], 0, prefix.causal)
        for layer in self.layers:
            x = layer(x, prefix.rope.to(x.device), mask)
        return self.output(self.norm(x[:, -1])).float()

    def decode(self, tokens, index):
        """Feed image token `index` (B,) through the cache; logits (B, V) of token index + 1.

        index an int: attend to the filled part of the cache only (the eager path: no work on empty slots).
        index a 0-dim tensor: attend to the whole preallocated cache under a mask of the filled part, so that every
        step has the same shapes and one compiled graph serves them all (generate_tokens(compile=True))."""
        key_valid, P, n_tokens = self._decoding
        pos = P + index
        x = self.tok_embeddings(tokens)[:, None].to(self.layers[0].attention.cache[0].dtype)
        if isinstance(index, torch.Tensor):
            rope = self.target_rope(n_tokens, index.view(1))
            mask = (torch.arange(P + n_tokens, device=tokens.device) <= pos)[None, None, None]  # (1, 1, 1, keys)
            mask = mask if key_valid is None else mask & key_valid[:, None, None]
        else:
            rope = self.target_rope(n_tokens, torch.tensor([index], device=tokens.device))
            mask = None if key_valid is None else key_valid[:, None, None, :pos + 1]
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
class VARConfig:
    depth: int = 16
    dim: int = 1024
    n_head: int = 16
    vocab_size: int = 4096
    vae_dim: int = 32  # Cvae: width of the VQVAE latents the word embedding reads
    patch_nums: tuple = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    cond: str = "class"  # "class" (VAR), or "caption" / "words": AdaLN reads the pooled text embedding
    num_classes: int = 1000
    caption_dim: int = 2048
    words: tuple = ()
    text_len: int = 120
    mlp_ratio: float = 4.0
    shared_aln: bool = False  # one AdaLN projection for all blocks plus a learned offset per block
    norm_eps: float = 1e-6


VAR_SIZES = {f"d{d}": d for d in (12, 16, 20, 24, 30)}


def var_config(name: str, **overrides) -> VARConfig:
    """VAR-d{12..30}: width 64 d, d heads, d blocks; "toy" is a 6-block, width-128 model with 2 heads."""
    if name == "toy":
        return VARConfig(**{"depth": 6, "dim": 128, "n_head": 2, **overrides})
    if name not in VAR_SIZES:
        raise ValueError(f"unknown VAR size {name!r}; choose from {', '.join(VAR_SIZES)}, toy")
    d = VAR_SIZES[name]
    return VARConfig(depth=d, dim=64 * d, n_head=d, **overrides)


MAX_SCALE_MUL = float(torch.tensor(100.0).log())  # VAR clamps the learned attention scale at 100 (float32)


class ScaleAttention(nn.Module):
    """VAR's attention: l2-normalised q and k, q scaled by a learned per-head factor, no k bias."""

    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.n_head, self.head_dim = n_head, dim // n_head
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, n_head, 1, 1), 4.0).log())
        self.proj = nn.Linear(dim, dim)
        self.cache = None

    def forward(self, x, mask, cache_pos: int = 0):  # x (B, S, C), mask (B, 1, S, keys)
        B, S, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(x, self.mat_qkv.weight, bias).view(B, S, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()
        k = F.normalize(k, dim=-1)
        if self.cache is not None:
            k, v = update_cache(self.cache, k, v, cache_pos)
        y = attend(q, k, v, mask, scale=1.0)
        return self.proj(y.transpose(1, 2).reshape(B, S, C))


class AdaLNBlock(nn.Module):
    """x += gamma1 attn(LN(x)(1 + scale1) + shift1); x += gamma2 ffn(LN(x)(1 + scale2) + shift2)."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        C = cfg.dim
        self.attn = ScaleAttention(C, cfg.n_head)
        self.ffn = nn.Module()
        self.ffn.fc1, self.ffn.fc2 = nn.Linear(C, round(C * cfg.mlp_ratio)), nn.Linear(round(C * cfg.mlp_ratio), C)
        self.ln = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(self, x, cond, mask, cache_pos: int = 0):  # cond (B, D), or (B, 1, 6, C) when shared
        C = x.shape[-1]
        ada = cond + self.ada_gss if hasattr(self, "ada_gss") else self.ada_lin(cond).view(-1, 1, 6, C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)
        x = x + self.attn(self.ln(x) * (1 + scale1) + shift1, mask, cache_pos) * gamma1
        h = self.ln(x) * (1 + scale2) + shift2
        return x + self.ffn.fc2(F.gelu(self.ffn.fc1(h), approximate="tanh")) * gamma2


class NextScaleTransformer(nn.Module):
    """VAR: predicts every token of scale s at once from the (area-resized) image so far.

    Sequence [prefix ; sos ; inputs of scales 2..K]: sos = c + pos_start, the input of scale s the
    word-embedded f_hat of scales < s resized to p_s x p_s; every scale token adds its level
    embedding and its learned absolute position. The AdaLN condition c is the class embedding
    (VAR), or for text the mean of the valid text embeddings. Position l predicts token l itself.
    """

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.checkpointing = False  # recompute each block in backward (train.py --checkpointing)
        self.cfg = cfg
        C, L = cfg.dim, sum(p * p for p in cfg.patch_nums)
        if cfg.cond == "class":
            self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # last row: the null class for CFG
        elif cfg.cond == "caption":
            self.text_embedding = CaptionEmbedder(cfg.caption_dim, C, cfg.text_len)
        elif cfg.cond == "words":
            self.text_embedding = WordEmbedder(len(cfg.words), C, cfg.text_len)
        else:
            raise ValueError(f"cond must be 'class', 'caption' or 'words', got {cfg.cond!r}")
        self.word_embed = nn.Linear(cfg.vae_dim, C)
        self.pos_start = nn.Parameter(torch.randn(1, 1, C) * 0.02)
        self.pos_1LC = nn.Parameter(torch.randn(1, L, C) * 0.02)
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), C)
        levels = torch.cat([torch.full((p * p,), i) for i, p in enumerate(cfg.patch_nums)])
        self.register_buffer("lvl_1L", levels[None], persistent=False)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.blocks = nn.ModuleList(AdaLNBlock(cfg) for _ in range(cfg.depth))
        self.head_nm = nn.Module()
        self.head_nm.ln = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.head_nm.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))
        self.head = nn.Linear(C, cfg.vocab_size)
        self._decoding = None
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():  # AdaLN-zero: every block starts as the identity
            if isinstance(m, AdaLNBlock) and hasattr(m, "ada_lin"):
                nn.init.zeros_(m.ada_lin[1].weight)
                nn.init.zeros_(m.ada_lin[1].bias)

    @property
    def blocks_of_scales(self) -> list[int]:
        return [p * p for p in self.cfg.patch_nums]

    def text_prefix(self, cond, cond_mask=None, drop=None):
        """T_t (B, T, C) with validity, and the AdaLN condition c (B, C)."""
        if self.cfg.cond == "class":
            labels = cond if drop is None else torch.where(drop, self.cfg.num_classes, cond)
            c = self.class_emb(labels)
            return c.new_zeros(c.shape[0], 0, c.shape[1]), torch.ones(c.shape[0], 0, dtype=torch.bool, device=c.device), c
        T_t = self.text_embedding(cond, drop)
        valid = torch.ones(T_t.shape[:2], dtype=torch.bool, device=T_t.device) if cond_mask is None else cond_mask.bool()
        w = valid.to(T_t.dtype)[..., None]
        return T_t, valid, (T_t * w).sum(1) / w.sum(1).clamp(min=1)

    def prefix(self, cond, cond_mask=None, drop_text=None) -> Prefix:
        """The official prefix: no tokens before sos (a class conditions through AdaLN and sos only)."""
        T_t, valid, c = self.text_prefix(cond, cond_mask, drop_text)
        return Prefix(T_t, valid, 0, True, cond=c)

    def image_text_prefix(self, P_s, grid, text, cond_mask, drop_text, causal) -> Prefix:
        """[P_s ; T_t] for SCAR; P_s already carries its learned positions."""
        T_t, text_valid, c = self.text_prefix(text, cond_mask, drop_text)
        valid = torch.cat([text_valid.new_ones(P_s.shape[:2]), text_valid], 1)
        return Prefix(torch.cat([P_s, T_t.to(P_s.dtype)], 1), valid, P_s.shape[1], causal, cond=c)

    def scale_tokens(self, c, inputs, first: int, n: int):
        """Embedded scale tokens [first, first + n) of the L; inputs (B, n or n - 1, Cvae) without sos."""
        B = c.shape[0]
        parts = [(c[:, None] + self.pos_start)] if first == 0 else []
        if inputs is not None and inputs.shape[1]:
            parts.append(self.word_embed(inputs.to(self.word_embed.weight.dtype)))
        x = torch.cat(parts, 1)
        lvl = self.lvl_1L[:, first:first + n].expand(B, -1)
        return x + self.lvl_embed(lvl) + self.pos_1LC[:, first:first + n]

    def _blocks(self, x, c, mask, cache_pos: int = 0):
        cond = self.shared_ada_lin(c).view(-1, 1, 6, self.cfg.dim) if self.cfg.shared_aln else c
        for block in self.blocks:
            x = call_block(block, self.checkpointing, x, cond, mask, cache_pos)
        return x

    def head_norm(self, x, c):  # the AdaLN before the head: what the head reads (and what H_s is)
        scale, shift = self.head_nm.ada_lin(c).view(-1, 1, 2, self.cfg.dim).unbind(2)
        return self.head_nm.ln(x) * (1 + scale) + shift

    def hidden(self, prefix: Prefix, inputs):
        """Head-normed hidden states (B, P + L, C) of [prefix ; sos ; inputs], inputs = (B, L - 1, Cvae)."""
        L = sum(self.blocks_of_scales)
        x = torch.cat([prefix.h, self.scale_tokens(prefix.cond, inputs, 0, L).to(prefix.h.dtype)], 1)
        mask = attention_mask(prefix.n_image, prefix.valid[:, prefix.n_image:], self.blocks_of_scales, prefix.causal,
                              use_flex(x))
        return self.head_norm(self._blocks(x, prefix.cond, mask), prefix.cond)

    def predict(self, H, prefix: Prefix):  # -> logits (B, L, V) of the scale tokens
        return self.head(H[:, prefix.h.shape[1]:]).float()

    def logits(self, prefix: Prefix, inputs):  # (B, L, V) teacher-forced
        return self.predict(self.hidden(prefix, inputs), prefix)

    def forward(self, labels, teacher_forcing_input):
        """VAR's forward (never drops labels): logits (B, L, V) for every scale."""
        return self.logits(self.prefix(labels), teacher_forcing_input)

    def prefill(self, prefix: Prefix):
        """Allocate the KV cache for prefix + all scales and run the prefix once."""
        B, P, _ = prefix.h.shape
        L = sum(self.blocks_of_scales)
        shape = (B, self.cfg.n_head, P + L, self.cfg.dim // self.cfg.n_head)
        for block in self.blocks:
            block.attn.cache = (prefix.h.new_zeros(shape), prefix.h.new_zeros(shape))
        self._decoding = (torch.cat([prefix.valid, prefix.valid.new_ones(B, L)], 1), P, prefix.cond)
        if P:
            self._blocks(prefix.h, prefix.cond, attention_mask(prefix.n_image, prefix.valid[:, prefix.n_image:], 0, prefix.causal))

    def decode(self, s: int, inputs=None):
        """Run scale s through the cache; inputs (B, p_s^2, Cvae) for s > 0 -> logits (B, p_s^2, V)."""
        key_valid, P, c = self._decoding
        first = sum(self.blocks_of_scales[:s])
        pos, n = P + first, self.blocks_of_scales[s]
        x = self.scale_tokens(c, inputs, first, n).to(self.blocks[0].attn.cache[0].dtype)
        mask = key_valid[:, None, None, :pos + n]
        return self.head(self.head_norm(self._blocks(x, c, mask, pos), c)).float()

    def reset_cache(self):
        for block in self.blocks:
            block.attn.cache = None
        self._decoding = None


def load_var(path, **overrides) -> NextScaleTransformer:
    """An official VAR transformer from `var_d{16,20,24,30}.pth`, in eval mode.

    Heads come from `scale_mul_1H11`, patch_nums from the `lvl_1L` buffer, classes from `class_emb`.
    The persistent buffers `attn_bias_for_masking`, `lvl_1L` and the zero `zero_k_bias` are checked
    and then rebuilt from patch_nums rather than stored.
    """
    sd, _ = read_checkpoint(path)
    return var_from_state_dict(sd, source=path, **overrides)


def var_from_state_dict(sd, source="state dict", **overrides) -> NextScaleTransformer:
    core = ("class_emb.weight", "pos_1LC", "lvl_1L", "word_embed.weight", "head.weight", "blocks.0.attn.scale_mul_1H11")
    if any(k not in sd for k in core):
        check_state_dict(sd, {k: sd[k].shape if k in sd else () for k in core}, source, "VAR transformer")
    patch_nums = tuple(math.isqrt(n) for n in torch.bincount(sd["lvl_1L"].flatten().long()).tolist())
    V, C = sd["head.weight"].shape
    cfg = VARConfig(depth=1 + max(int(m[1]) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), dim=C,
                    n_head=sd["blocks.0.attn.scale_mul_1H11"].shape[1], vocab_size=V,
                    vae_dim=sd["word_embed.weight"].shape[1], patch_nums=patch_nums,
                    num_classes=sd["class_emb.weight"].shape[0] - 1, shared_aln="shared_ada_lin.1.weight" in sd,
                    mlp_ratio=sd["blocks.0.ffn.fc1.weight"].shape[0] / C if "blocks.0.ffn.fc1.weight" in sd else 4.0)
    cfg = replace(cfg, **overrides)
    derived = ("lvl_1L", "attn_bias_for_masking")
    sd = {k: v for k, v in sd.items() if k not in derived and not k.endswith("attn.zero_k_bias")}
    with torch.device("meta"):
        model = NextScaleTransformer(cfg)
    check_state_dict(sd, {k: v.shape for k, v in model.state_dict().items()}, source, "VAR transformer")
    model.load_state_dict({k: v.to(torch.float32, copy=True) for k, v in sd.items()}, assign=True)
    model.lvl_1L = torch.cat([torch.full((p * p,), i) for i, p in enumerate(cfg.patch_nums)])[None]
    return model.eval()


@dataclass
class SCARConfig:
    feature_dim: int = 768  # C of the DINOv2 features F_s (768 for ViT-B)
    feature_grid: int = 32  # side of F_s; the next-scale backbone learns a position per prefix cell
    k: int = 2  # compression per side: k^2 x fewer prefix tokens (paper: 4x)
    compressor: str = "conv+resize"
    delta: float = 0.5  # weight of L_align
    pres_weight: float = 1.0  # weight of L_pres; 0 builds no U_k (the paper's Table 4, "w/o L_pres")
    pres_head: str = "released"  # U_k: the released code's 3x3 convolutions, or "lean" (compressor.py)
    # The EditAR baseline: "vq" makes the prefix the source's own codes, embedded by the backbone (next-scale: its
    # f_hat through word_embed), compressed by the same compressor; distill > 0 adds EditAR's L_distill.
    prefix: str = "semantic"
    distill: float = 0.0  # weight lambda of L_distill (EditAR: 0.5); 0 = off
    stop_grad_target: bool = False  # detach P_t (the released code lets gradients into it)
    causal: bool = False  # plain causal attention instead of the paper's bidirectional prefix
    drop_text: float = 0.05  # CFG dropouts (EditAR): text only, image prefix only, both
    drop_image: float = 0.05
    drop_both: float = 0.05


class SCAR(nn.Module):
    """SCAR on a next-token or next-scale backbone.

    Training (`forward`):
        F_c = P_k(F_s)                      compressed source features (B, h/k, w/k, C)
        P_s = W F_c,  P_t = W P_k(F_t)      one Linear(C, D) shared by source and target
        H = backbone([P_s ; T_t ; targets]) under attention_mask
        L_CE on the targets,  L_pres = |F_s - U_k(F_c)|^2,  L_align = |H_s - P_t|^2, H_s = H at P_s
        loss = L_CE + pres_weight * L_pres + delta * L_align

    Next-token: P_s tokens carry 2D rotary positions on their own grid (image_text_prefix), H is the
    final-RMSNormed output. Next-scale: P_s tokens carry learned positions (`prefix_pos`), the
    AdaLN is conditioned by the class embedding or the pooled text embedding, and H is the output
    of the AdaLN before the head; P_s and T_t come before the sos token of the first scale.
    `cond` for `prefix` and generation is the pair (S, text), S the source as `source_grid` reads it.

    The EditAR baseline (prefix="vq", EditAR section 3): S is the source's codes (B, h, w), embedded by the
    backbone's token embedding (next-scale: the source's f_hat (B, h, w, Cvae) through word_embed, the
    whole representation its decoder draws from, where one scale's codes are only a residual), then
    compressed as F_s would be and used as P_s without W; there is no L_align (P_t has no VQ counterpart).
    distill > 0 adds EditAR's eq. 3-4:
        L_distill = |A(H_t) - F_t|^2        H_t: the hidden states that predict the target tokens, on their
                                            grid (next-scale: the finest scale's); A: one 1x1 convolution
        loss += distill * L_distill
    """

    def __init__(self, cfg: SCARConfig, backbone: nn.Module):
        super().__init__()
        self.cfg, self.backbone = cfg, backbone
        D = backbone.cfg.dim
        if cfg.prefix not in ("semantic", "vq"):
            raise ValueError(f"prefix must be 'semantic' or 'vq', got {cfg.prefix!r}")
        semantic = cfg.prefix == "semantic"
        width = cfg.feature_dim if semantic else D  # of the grid the compressor reads
        self.compressor = SemanticCompressor(width, cfg.k, cfg.compressor, reconstruct=cfg.pres_weight > 0, head=cfg.pres_head)
        self.proj = nn.Linear(cfg.feature_dim, D, bias=False) if semantic else nn.Identity()
        self.null_prefix = nn.Parameter(torch.randn(D) * 0.02)  # replaces P_s when the image is dropped
        if cfg.distill:
            self.distill_head = nn.Conv2d(D, cfg.feature_dim, 1)  # A
        if isinstance(backbone, NextScaleTransformer):
            grid = cfg.feature_grid if semantic else backbone.cfg.patch_nums[-1]
            self.prefix_pos = nn.Parameter(torch.randn((grid // cfg.k) ** 2, D) * 0.02)

    def new_parameter_names(self) -> list[str]:
        """What an official backbone checkpoint does not initialise."""
        return [n for n, _ in self.named_parameters() if not n.startswith("backbone.")]

    def source_grid(self, S):  # the source as the grid the compressor reads: (B, h, w, C) or, vq, (B, h, w, D)
        """SCAR: S = F_s, DINOv2's features. EditAR: S = the source's codes (B, h, w), or its f_hat (B, h, w, Cvae)."""
        if self.cfg.prefix == "semantic":
            return S
        if isinstance(self.backbone, NextScaleTransformer):
            return self.backbone.word_embed(S)
        return self.backbone.tok_embeddings(S)

    def prefix(self, cond, cond_mask=None, drop_text=None, drop_image=None) -> Prefix:
        """[P_s ; T_t] from cond = (S, text) with per-sample drop flags (B,) bool."""
        S, text = cond
        return self._prefix(self.compressor(self.source_grid(S)), text, cond_mask, drop_text, drop_image)

    def _prefix(self, F_c, text, cond_mask, drop_text, drop_image) -> Prefix:
        B, h, w, _ = F_c.shape
        P_s = self.proj(F_c.flatten(1, 2))  # (B, L_c, D)
        if drop_image is not None:
            P_s = torch.where(drop_image[:, None, None], self.null_prefix.to(P_s.dtype), P_s)
        if hasattr(self, "prefix_pos"):
            if self.prefix_pos.shape[0] != h * w:
                raise ValueError(f"this model was built for a {self.prefix_pos.shape[0]}-token prefix, "
                                 f"the features give {h}x{w}")
            P_s = P_s + self.prefix_pos
        return self.backbone.image_text_prefix(P_s, (h, w), text, cond_mask, drop_text, self.cfg.causal)

    def cfg_dropout(self, B: int, device):
        """Per-sample (drop_text, drop_image) flags: text only, image only, or both, each with its probability."""
        u = torch.rand(B, device=device)
        c = self.cfg
        text_only, image_only = u < c.drop_text, (u >= c.drop_text) & (u < c.drop_text + c.drop_image)
        both = (u >= c.drop_text + c.drop_image) & (u < c.drop_text + c.drop_image + c.drop_both)
        return text_only | both, image_only | both

    def forward(self, F_s, F_t, text, codes, text_mask=None, inputs=None) -> dict[str, torch.Tensor]:
        """The losses for a batch. F_s: the source as `source_grid` reads it (SCAR: DINOv2 features
        (B, h, w, C)); F_t (B, h, w, C): DINOv2 features of the target; text: class ids, caption features or
        word ids, with text_mask; codes Z_t (B, N) int64 (next-scale: all scales flattened) and, next-scale
        only, inputs = the VQVAE's teacher_forcing_input."""
        drop_text = drop_image = None
        if self.training:
            drop_text, drop_image = self.cfg_dropout(codes.shape[0], codes.device)
        grid = self.source_grid(F_s)
        F_c = self.compressor(grid)
        pres = self.compressor.pres_loss(grid.detach(), F_c)  # a target: it must not pull the vq prefix's embedding
        prefix = self._prefix(F_c, text, text_mask, drop_text, drop_image)
        H = self.backbone.hidden(prefix, codes if inputs is None else inputs)
        logits = self.backbone.predict(H, prefix)
        ce = F.cross_entropy(logits.flatten(0, 1), codes.flatten())
        align = ce.new_zeros(())
        if self.cfg.prefix == "semantic":
            P_t = self.proj(self.compressor(F_t).flatten(1, 2))
            if self.cfg.stop_grad_target:
                P_t = P_t.detach()
            align = self.align_loss(H[:, :prefix.n_image], P_t, drop_image)
        losses = {"ce": ce, "pres": pres, "align": align}
        loss = ce + self.cfg.pres_weight * pres + self.cfg.delta * align
        if self.cfg.distill:
            losses["distill"] = self.distill_loss(H, prefix, F_t)
            loss = loss + self.cfg.distill * losses["distill"]
        return {**losses, "loss": loss}

    def distill_loss(self, H, prefix: Prefix, F_t):
        """EditAR's L_distill = MSE(A(H_t), F_t): H_t the states that predict the target tokens (next-scale:
        the finest scale's), on their grid, mapped by A and resized (bilinear) to the DINOv2 grid if it differs."""
        n = prefix.h.shape[1]
        if isinstance(self.backbone, NextScaleTransformer):
            g = self.backbone.cfg.patch_nums[-1]
            H_t = H[:, H.shape[1] - g * g:]
        else:
            H_t = H[:, n - 1:]  # state i predicts token i
            g = math.isqrt(H_t.shape[1])
        x = self.distill_head(H_t.transpose(1, 2).unflatten(2, (g, g)).to(self.distill_head.weight.dtype))  # (B, C, g, g)
        if x.shape[-2:] != F_t.shape[1:3]:
            x = F.interpolate(x, size=F_t.shape[1:3], mode="bilinear", align_corners=False)
        return F.mse_loss(x.permute(0, 2, 3, 1).float(), F_t.float())

    @staticmethod
    def align_loss(H_s, P_t, drop_image=None):
        """L_align = MSE(H_s, P_t), over the samples whose image prefix was kept (a dropped prefix has no
        source to reason about)."""
        err = (H_s.float() - P_t.float()).pow(2).mean(dim=(1, 2))  # (B,)
        if drop_image is None:
            return err.mean()
        keep = (~drop_image).float()
        return (err * keep).sum() / keep.sum().clamp(min=1)


# What train.py records in a SCAR checkpoint's config, and sample.py / eval.py read.
SCAR_META = {"task": str, "arch": str, "backbone": dict, "scar": dict, "dino": dict, "vq": dict, "image_size": int,
             "text": dict}


def build_scar(meta: dict) -> SCAR:
    """A fresh SCAR from the "arch", "backbone" and "scar" entries of a checkpoint's config."""
    if meta.get("kind") != "scar":
        raise CheckpointError(f"not a SCAR checkpoint (its config says kind={meta.get('kind')!r})")
    wrong = [k for k, kind in SCAR_META.items() if not isinstance(meta.get(k), kind)]
    wrong += [f"{k}.path" for k in ("dino", "vq") if not isinstance(meta.get(k, {}).get("path"), str)]
    if wrong or not isinstance(meta["text"].get("kind"), str):
        raise CheckpointError(f"its config lacks or misstates {', '.join(wrong) or 'text.kind'}")
    b = {**meta["backbone"], "words": tuple(meta["backbone"].get("words", ()))}
    if meta["arch"] == "next-scale":
        backbone = NextScaleTransformer(VARConfig(**{**b, "patch_nums": tuple(b["patch_nums"])}))
    else:
        backbone = NextTokenTransformer(GPTConfig(**b))
    return SCAR(SCARConfig(**meta["scar"]), backbone)


def load_scar(path) -> tuple[SCAR, dict]:
    """A SCAR model (eval mode) and its config from a checkpoint written by train.py."""
    meta = read_meta(path)
    try:
        with torch.device("meta"):
            model = build_scar(meta)
    except (CheckpointError, TypeError, ValueError, KeyError, AttributeError) as e:  # a foreign or older config
        raise CheckpointError(f"{path}: {e}") from None
    sd, _ = read_checkpoint(path)
    if any(k.startswith("model.") for k in sd):  # a training checkpoint: weights next to optimiser state
        sd = {k[6:]: v for k, v in sd.items() if k.startswith("model.")}
    expected = model.state_dict()
    check_state_dict(sd, {k: v.shape for k, v in expected.items()}, path, "SCAR")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: non-finite weights in {few(bad)} (a diverged run?)")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, assign=True)
    if isinstance(model.backbone, NextScaleTransformer):  # a non-persistent buffer: rebuilt, not loaded
        model.backbone.lvl_1L = torch.cat([torch.full((p * p,), i) for i, p in enumerate(model.backbone.cfg.patch_nums)])[None]
    return model.eval(), meta
