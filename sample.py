"""Decoding loops for the official backbones and for SCAR models.

Both prefill [P_s ; T_t] once into the KV cache and then decode: one image token per step
(next-token) or one whole scale per step (next-scale). Classifier-free guidance runs on a doubled
batch [cond ; uncond] (EditAR eq. 5), where the unconditional half drops the text (or class) and
keeps the image prefix.
"""
import torch
import torch.nn.functional as F


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


def sample_logits(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):  # (B, V) -> (B,) int64
    logits = filter_logits(logits / max(temperature, 1e-5), top_k, top_p)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


def guide(logits, cfg: float):  # (2B, V) [cond ; uncond] -> (B, V)
    cond, uncond = logits.chunk(2)
    return uncond + cfg * (cond - uncond)


@torch.no_grad()
def generate_tokens(model, cond, n_tokens, cond_mask=None, cfg=1.0, temperature=1.0, top_k=0, top_p=1.0,
                    generator=None, use_cache=True):
    """Sample (B, n_tokens) int64 image tokens, as LlamaGen's `generate`.

    `model` is an official `NextTokenTransformer` (cond: class ids or caption features with
    `cond_mask`) or a `SCAR` model (cond: (F_s, text)). For cfg > 1 the unconditional half is built
    here from the conditional batch. `use_cache=False` recomputes the whole sequence every step
    and gives the same tokens. No cache is left on the model afterwards.
    """
    backbone = getattr(model, "backbone", model)
    prefix = model.prefix(cond, cond_mask)
    B = prefix.h.shape[0]
    guided = cfg > 1.0
    if guided:
        prefix = prefix.cat(model.prefix(cond, cond_mask, drop_text=torch.ones(B, dtype=torch.bool, device=prefix.h.device)))
    tokens = torch.zeros(B, n_tokens, dtype=torch.long, device=prefix.h.device)
    try:
        logits = backbone.prefill(prefix, n_tokens) if use_cache else None
        for i in range(n_tokens):
            if not use_cache:  # the last column is a placeholder that is never read
                seen = tokens[:, :i + 1].repeat(2 if guided else 1, 1)
                logits = backbone.logits(prefix, seen, n_tokens)[:, i]
            nxt = sample_logits(guide(logits, cfg) if guided else logits, temperature, top_k, top_p, generator)
            tokens[:, i] = nxt
            if use_cache and i + 1 < n_tokens:
                logits = backbone.decode(nxt.repeat(2) if guided else nxt, i)
    finally:
        backbone.reset_cache()
    return tokens


@torch.no_grad()
def generate_scales(model, vqvae, labels, cfg=1.0, temperature=1.0, top_k=0, top_p=0.0, generator=None):
    """Sample the codes of every scale, [(B, p, p) int64], as VAR's `autoregressive_infer_cfg`.

    `model` is an official `NextScaleTransformer` (labels: class ids) or a next-scale `SCAR` model
    (labels: (F_s, text)). The batch is always doubled and the guidance ramps linearly over the
    scales: at scale s, guided = (1 + t) cond - t uncond with t = cfg * s / (S - 1), so cfg = 1
    still guides the last scale. top_p = 0.0 is off (VAR's convention); temperature divides the
    guided logits. The image is `vqvae.decode(codes)`.
    """
    backbone = getattr(model, "backbone", model)
    prefix = model.prefix(labels)
    B = prefix.h.shape[0]
    prefix = prefix.cat(model.prefix(labels, drop_text=torch.ones(B, dtype=torch.bool, device=prefix.h.device)))
    patch_nums = backbone.cfg.patch_nums
    K, S = patch_nums[-1], len(patch_nums)
    f_hat = prefix.h.new_zeros(B, vqvae.cfg.z_channels, K, K, dtype=torch.float32)
    codes, inputs = [], None
    try:
        backbone.prefill(prefix)
        for s, p in enumerate(patch_nums):
            logits = backbone.decode(s, inputs)  # (2B, p^2, V)
            t = cfg * s / (S - 1)
            guided = (1 + t) * logits[:B] - t * logits[B:]
            idx = sample_logits(guided.flatten(0, 1), temperature, top_k, top_p or 1.0, generator)
            codes.append(idx.view(B, p, p))
            f_hat = f_hat + vqvae.scale_embedding(s, codes[-1])
            if s + 1 < S:
                inputs = vqvae.next_input(f_hat, s).repeat(2, 1, 1)
    finally:
        backbone.reset_cache()
    return codes
