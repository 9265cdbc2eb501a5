"""Image tokenizers: the discrete codes Z_t that SCAR predicts.

Two tokenizers share one convolutional encoder/decoder (the taming / LDM design):
- `VQModel`, LlamaGen's single-scale VQ (VQ-16: 16x downsampling, l2-normalised codebook 16384 x 8),
  for the next-token backbone: image (B,3,H,W) <-> codes (B, H/16, W/16).
- `MultiScaleVQVAE`, VAR's multi-scale residual VQVAE (codebook 4096 x 32, scales 1..16), for the
  next-scale backbone: image <-> a list of codes (B, p, p), one per scale, coarse to fine.

Module names follow LlamaGen, so its checkpoints load as they are; VAR checkpoints are renamed on
load. Both come with what a small tokenizer needs to train: straight-through estimator, codebook
and commitment losses, reconstruction loss and codebook usage.

The toy's next-token tokenizer is `PatchVQ`: pixel centroids (a weighted k-means of the training
patches) for codes, and LlamaGen's decoder drawing the image from them in context.
"""
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CheckpointError, check_state_dict, read_checkpoint, read_meta


@dataclass
class VQConfig:
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)  # one level per entry; 2^(levels - 1) downsampling
    z_channels: int = 256
    codebook_size: int = 16384
    codebook_dim: int = 8
    num_res_blocks: int = 2  # the decoder uses one more per level, as LlamaGen and VAR do
    norm_groups: int = 32  # GroupNorm groups, 32 in LlamaGen and VAR; 0 = no normalisation (the toy)
    beta: float = 0.25  # commitment weight
    entropy_weight: float = 0.0  # codebook entropy loss (LlamaGen's entropy_loss_ratio): fights code collapse


VQ_SIZES = {
    "VQ-16": VQConfig(),
    "VQ-8": VQConfig(ch_mult=(1, 2, 2, 4)),
}


@dataclass
class MSVQConfig:
    ch: int = 160
    ch_mult: tuple = (1, 1, 2, 2, 4)
    z_channels: int = 32  # VAR's Cvae: latent and codebook width
    codebook_size: int = 4096
    patch_nums: tuple = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    num_phi: int = 4  # shared refinement convs (VAR's share_quant_resi)
    num_res_blocks: int = 2
    norm_groups: int = 32
    beta: float = 0.25
    entropy_weight: float = 0.0


MSVQ_SIZES = {
    "vae_ch160v4096z32": MSVQConfig(),
    "toy": MSVQConfig(ch=32, ch_mult=(1, 1, 2, 2), z_channels=16, codebook_size=1024,
                      patch_nums=(1, 2, 3, 4, 6, 8), num_res_blocks=1, norm_groups=0, entropy_weight=0.1),
}


def group_norm(c: int, groups: int) -> nn.Module:
    return nn.GroupNorm(groups, c, eps=1e-6) if groups else nn.Identity()


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of a feature map."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = group_norm(c, groups)
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2)[:, None] for conv in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):  # pad right and bottom only, as the official models were trained
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def level(c_in: int, c_out: int, n_res: int, attn: bool, groups: int) -> nn.Module:
    block = nn.Module()
    block.res = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(n_res))
    block.attn = nn.ModuleList(AttnBlock(c_out, groups) for _ in range(n_res if attn else 0))
    return block


def run_level(block: nn.Module, x):
    for j, res in enumerate(block.res):
        x = res(x)
        if len(block.attn):
            x = block.attn[j](x)
    return x


class ConvEncoder(nn.Module):
    """(B, 3, H, W) -> (B, z_channels, H / 2^(L-1), W / 2^(L-1)); attention at the lowest resolution."""

    def __init__(self, ch: int, ch_mult: tuple, z_channels: int, num_res_blocks: int, groups: int):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        for i, c in enumerate(widths):
            last = i == len(widths) - 1
            block = level(widths[i - 1] if i else ch, c, num_res_blocks, last, groups)
            if not last:
                block.downsample = Downsample(c)
            self.conv_blocks.append(block)
        c = widths[-1]
        self.mid = nn.ModuleList([ResnetBlock(c, c, groups), AttnBlock(c, groups), ResnetBlock(c, c, groups)])
        self.norm_out, self.conv_out = group_norm(c, groups), nn.Conv2d(c, z_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.conv_blocks:
            x = run_level(block, x)
            if hasattr(block, "downsample"):
                x = block.downsample(x)
        for layer in self.mid:
            x = layer(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class ConvDecoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, H, W); conv_blocks[0] is the lowest resolution."""

    def __init__(self, ch: int, ch_mult: tuple, z_channels: int, num_res_blocks: int, groups: int):
        super().__init__()
        widths = [ch * m for m in reversed(ch_mult)]
        c = widths[0]
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(c, c, groups), AttnBlock(c, groups), ResnetBlock(c, c, groups)])
        self.conv_blocks = nn.ModuleList()
        for k, c in enumerate(widths):
            block = level(widths[k - 1] if k else widths[0], c, num_res_blocks + 1, k == 0, groups)
            if k != len(widths) - 1:
                block.upsample = Upsample(c)
            self.conv_blocks.append(block)
        self.norm_out, self.conv_out = group_norm(widths[-1], groups), nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, z):
        x = self.conv_in(z)
        for layer in self.mid:
            x = layer(x)
        for block in self.conv_blocks:
            x = run_level(block, x)
            if hasattr(block, "upsample"):
                x = block.upsample(x)
        return self.conv_out(F.silu(self.norm_out(x)))


def code_distances(z, codebook):  # (N, C), (V, C) -> squared L2 distances (N, V)
    return z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * z @ codebook.t()


def entropy_loss(d, temperature: float = 0.01):
    """LlamaGen's codebook entropy loss on distances d (N, V): each vector's soft assignment
    softmax(-d / T) should be confident (low entropy) while the batch as a whole spreads over the
    codebook (high entropy of the mean assignment)."""
    logp = (-d / temperature).log_softmax(-1)
    p = logp.exp()
    mean = p.mean(0)
    return -(p * logp).sum(-1).mean() + (mean * (mean + 1e-8).log()).sum()


def codebook_usage(codes, codebook_size: int) -> dict[str, torch.Tensor]:
    """Fraction of the codebook used by `codes` and the perplexity of their histogram."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}


def check_images(img, multiple: int) -> None:
    """A clear error for images that are not (B, 3, H, W) in [-1, 1] with sides multiples of `multiple`."""
    if not torch.is_tensor(img) or not img.is_floating_point() or img.ndim != 4 or img.shape[1] != 3:
        shape = tuple(img.shape) if torch.is_tensor(img) else type(img).__name__
        raise ValueError(f"images must be a float tensor (B, 3, H, W), got {shape}")
    if img.shape[2] % multiple or img.shape[3] % multiple:
        raise ValueError(f"image sides must be multiples of {multiple}, got {img.shape[2]}x{img.shape[3]}")
    lo, hi = img.aminmax()
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"images must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")


def check_codes(codes, codebook_size: int, shape=None, name="codes") -> None:
    if not torch.is_tensor(codes) or codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
    if shape is not None and tuple(codes.shape[1:]) != tuple(shape):
        raise ValueError(f"{name} must be (B, {', '.join(map(str, shape))}), got {tuple(codes.shape)}")
    if codes.numel() and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"{name} must lie in [0, {codebook_size}), got [{codes.min()}, {codes.max()}]")


class VQModel(nn.Module):
    """LlamaGen's VQ: encoder -> 1x1 quant_conv -> nearest l2-normalised code -> 1x1 post_quant_conv -> decoder."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ConvEncoder(cfg.ch, cfg.ch_mult, cfg.z_channels, cfg.num_res_blocks, cfg.norm_groups)
        self.decoder = ConvDecoder(cfg.ch, cfg.ch_mult, cfg.z_channels, cfg.num_res_blocks, cfg.norm_groups)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.cfg.ch_mult) - 1)

    def codebook(self):  # (V, C), l2-normalised on every use: the stored rows are not unit length
        return F.normalize(self.quantize.embedding.weight, dim=-1)

    def latent(self, img):  # (B, 3, H, W) -> continuous z (B, C, H/d, W/d), before the unit length
        return self.quant_conv(self.encoder(img))

    def quantize_latent(self, z):
        """(B, C, h, w) continuous -> codes (B, h, w) (the closest code, first on ties), unit-length z
        (B, C, h, w), and the distances (B h w, V) that picked them (the entropy loss reuses them)."""
        z = F.normalize(z, dim=1)
        B, C, h, w = z.shape
        d = code_distances(z.permute(0, 2, 3, 1).reshape(-1, C), self.codebook())
        return d.argmin(1).view(B, h, w), z, d

    def embed(self, codes):  # (B, h, w) -> z_q (B, C, h, w)
        return self.codebook()[codes].permute(0, 3, 1, 2)

    @torch.no_grad()
    def encode(self, img):  # (B, 3, H, W) in [-1, 1] -> codes (B, H/16, W/16) int64
        check_images(img, self.downsample)
        return self.quantize_latent(self.latent(img))[0]

    @torch.no_grad()
    def decode(self, codes):  # (B, h, w) -> raw decoder output (B, 3, H, W), not clamped (as LlamaGen)
        check_codes(codes, self.cfg.codebook_size)
        if codes.ndim != 3:
            raise ValueError(f"codes must be (B, h, w), got {tuple(codes.shape)}")
        return self.decoder(self.post_quant_conv(self.embed(codes)))

    def forward(self, img) -> dict[str, torch.Tensor]:
        """Training step: reconstruction through the straight-through estimator, and the losses.

        codebook = |sg(z) - z_q|^2 moves the codes, commit = beta |z - sg(z_q)|^2 holds the encoder
        near them, rec = |img - recon|^2, and with entropy_weight the entropy loss; "loss" is their sum.
        """
        codes, z, d = self.quantize_latent(self.latent(img))
        z_q = self.embed(codes)
        recon = self.decoder(self.post_quant_conv(z + (z_q - z).detach()))
        losses = {"rec": F.mse_loss(recon, img), "codebook": F.mse_loss(z_q, z.detach()),
                  "commit": self.cfg.beta * F.mse_loss(z, z_q.detach())}
        if self.cfg.entropy_weight:
            losses["entropy"] = self.cfg.entropy_weight * entropy_loss(d)
        return {"recon": recon, "codes": codes, "loss": sum(losses.values()), **losses,
                **codebook_usage(codes, self.cfg.codebook_size)}


def nearest(x, centres):  # (N, C), (K, C) -> (N,) index of each row's nearest centre
    return torch.cat([torch.cdist(chunk, centres).argmin(1) for chunk in x.split(4096)])


def kmeans(x, weights, k: int, iters: int = 10):  # (N, C), (N,) -> (k, C) centres
    """Lloyd's iterations from a farthest-point start (so rare rows, a triangle's corner, start with centres
    too), row i counting weights[i] times: the centres that minimise the average error over every
    occurrence. A centre left without rows stays where it is."""
    centres = x[farthest_points(x, k)]
    for _ in range(iters):
        cluster = nearest(x, centres)
        mass = torch.zeros(k).index_add_(0, cluster, weights)[:, None]
        sums = torch.zeros_like(centres).index_add_(0, cluster, x * weights[:, None])
        centres = torch.where(mass > 0, sums / mass.clamp(min=1e-12), centres)
    return centres


def farthest_points(x, n: int):  # (N, C) -> (n,) indices
    """Greedy farthest-point sampling: start at row 0, then always take the row farthest from all taken."""
    sq = x.pow(2).sum(1)  # |x - c|^2 = |x|^2 - 2 x.c + |c|^2: a matrix-vector product per pick, no (N, C) temporary
    picked, dist = [0], (x - x[0]).pow(2).sum(1)
    for _ in range(n - 1):
        picked.append(int(dist.argmax()))
        dist = torch.minimum(dist, sq - 2 * (x @ x[picked[-1]]) + sq[picked[-1]])
    return torch.tensor(picked, device=x.device)


@dataclass
class PatchVQConfig:
    """The toy's next-token tokenizer (PatchVQ); the defaults are the toy's."""
    patch: int = 8  # pixels per token side: 64 px -> 8 x 8 codes
    codebook_size: int = 16384  # as LlamaGen's VQ-16; 4096 pixel centroids leave shapes notched (docs/toy.md)
    ch: int = 32  # the decoder, as VQConfig's (no normalisation)
    ch_mult: tuple = (1, 1, 2, 2)  # len - 1 = log2(patch) upsamplings
    num_res_blocks: int = 1


class PatchVQ(nn.Module):
    """The toy's next-token tokenizer: a token's code is the pixel centroid nearest to its patch, and the
    image is the mosaic of the codes' centroids plus a correction that a convolutional decoder draws from
    the centroids in context (LlamaGen's decoder, reading 3 p^2 channels; its last conv starts at zero, so
    training starts from the mosaic).

    Why not LlamaGen's learned encoder: in the toy world of anti-aliased shapes anywhere (23 000 distinct
    8 x 8 patches in 2048 scenes) the encoder trained for minutes on a CPU grouped patches badly (a green
    triangle's edge shared a code with a purple disc's; 27.6 dB, edge sharpness 0.41 held out), while the
    centroids alone, a k-means of the patches' pixels weighted by occurrence, give 31.0 dB and 0.77 (see
    docs/toy.md). Identical patches get identical codes wherever they are, so an edit leaves the codes of
    everything it does not touch unchanged. Only the decoder trains; `seed` sets the centroids first.
    """

    def __init__(self, cfg: PatchVQConfig):
        super().__init__()
        if 2 ** (len(cfg.ch_mult) - 1) != cfg.patch:
            raise ValueError(f"ch_mult {cfg.ch_mult} upsamples {2 ** (len(cfg.ch_mult) - 1)}x, not the patch {cfg.patch}")
        self.cfg = cfg
        self.register_buffer("centroids", torch.zeros(cfg.codebook_size, 3 * cfg.patch ** 2))  # (V, 3 p p) in [-1, 1]
        self.decoder = ConvDecoder(cfg.ch, cfg.ch_mult, 3 * cfg.patch ** 2, cfg.num_res_blocks, 0)
        nn.init.zeros_(self.decoder.conv_out.weight)
        nn.init.zeros_(self.decoder.conv_out.bias)

    @property
    def downsample(self) -> int:
        return self.cfg.patch

    def patches(self, img):  # (B, 3, H, W) -> (B, h, w, 3 p p)
        p = self.cfg.patch
        return img.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).flatten(3)

    @torch.no_grad()
    def encode(self, img):  # (B, 3, H, W) in [-1, 1] -> codes (B, H/p, W/p) int64
        check_images(img, self.downsample)
        x = self.patches(img)
        return nearest(x.flatten(0, 2), self.centroids).view(x.shape[:3])

    def draw(self, codes):  # (B, h, w) -> (B, 3, H, W): the mosaic plus the decoder's correction
        B, h, w = codes.shape
        p = self.cfg.patch
        c = self.centroids[codes]  # (B, h, w, 3 p p)
        mosaic = c.view(B, h, w, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, 3, h * p, w * p)
        return mosaic + self.decoder(c.permute(0, 3, 1, 2))

    @torch.no_grad()
    def decode(self, codes):  # (B, h, w) -> raw output (B, 3, H, W), not clamped (as LlamaGen)
        check_codes(codes, self.cfg.codebook_size)
        if codes.ndim != 3:
            raise ValueError(f"codes must be (B, h, w), got {tuple(codes.shape)}")
        return self.draw(codes)

    def forward(self, img) -> dict[str, torch.Tensor]:
        """Training step: the decoder's reconstruction of the encoded image; "loss" is the MSE."""
        codes = self.encode(img)
        recon = self.draw(codes)
        rec = F.mse_loss(recon, img)
        return {"recon": recon, "codes": codes, "loss": rec, "rec": rec, **codebook_usage(codes, self.cfg.codebook_size)}

    @torch.no_grad()
    def seed(self, img):
        """Set the centroids from `img` (B, 3, H, W) in [-1, 1]: each distinct patch its own centroid if
        there are no more of them than codes (spare rows repeat the first ones and are never picked: the
        nearest search keeps the first of equal rows), else the means of a k-means of the distinct
        patches, each weighted by how often it occurs (the average token error, what PSNR measures): a flat
        background, the most frequent patch, gets a centroid that is nearly its own."""
        if len(img) == 0:
            raise ValueError("seeding the codebook needs at least one image")
        pixels = ((self.patches(img).flatten(0, 2) + 1) * 127.5).round()  # (N, 3 p p) on the 0-255 grid
        distinct, counts = torch.unique(pixels, dim=0, return_counts=True)
        V = self.cfg.codebook_size
        rows = kmeans(distinct, counts.float(), V) if len(distinct) > V else distinct[torch.arange(V) % len(distinct)]
        self.centroids.copy_(rows.to(self.centroids) / 127.5 - 1)


class Phi(nn.Conv2d):
    """VAR's refinement of an upsampled scale: h -> (1 - r) h + r conv(h), r = 0.5."""

    def __init__(self, c: int):
        super().__init__(c, c, 3, padding=1)

    def forward(self, h):
        return 0.5 * h + 0.5 * super().forward(h)


class MultiScaleVQVAE(nn.Module):
    """VAR's VQVAE: the latent f is quantised as a sum of residual scales, coarse to fine.

    Scale s takes the residual r = f - f_hat, area-downsamples it to p_s x p_s, picks the nearest codes,
    embeds them, upsamples bicubically to the latent size, refines with phi and adds to f_hat.
    """

    def __init__(self, cfg: MSVQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ConvEncoder(cfg.ch, cfg.ch_mult, cfg.z_channels, cfg.num_res_blocks, cfg.norm_groups)
        self.decoder = ConvDecoder(cfg.ch, cfg.ch_mult, cfg.z_channels, cfg.num_res_blocks, cfg.norm_groups)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(cfg.codebook_size, cfg.z_channels)
        # Start every code near the zero latent so that, trained from scratch, the small residuals of the
        # fine scales still find many codes close by (with N(0, 1) rows most codes are never picked).
        nn.init.uniform_(self.quantize.embedding.weight, -1 / cfg.codebook_size, 1 / cfg.codebook_size)
        self.quantize.quant_resi = nn.Module()
        self.quantize.quant_resi.qresi_ls = nn.ModuleList(Phi(cfg.z_channels) for _ in range(cfg.num_phi))
        # Scale s uses the phi whose tick in linspace(1/12, 11/12, K) is nearest s / (S - 1); float64
        # as VAR computes it, since some scales sit exactly between two ticks.
        ticks, S = np.linspace(1 / 12, 11 / 12, cfg.num_phi), len(cfg.patch_nums)
        self.phi_index = [int(np.argmin(np.abs(ticks - s / (S - 1)))) for s in range(S)]

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.cfg.ch_mult) - 1)

    def scale_embedding(self, s: int, codes):  # codes (B, p, p) of scale s -> phi_s(up(e(codes))) (B, C, p_K, p_K)
        h = self.quantize.embedding(codes).permute(0, 3, 1, 2)
        K = self.cfg.patch_nums[-1]
        if h.shape[-1] != K:
            h = F.interpolate(h, size=(K, K), mode="bicubic")
        return self.quantize.quant_resi.qresi_ls[self.phi_index[s]](h)

    def quantize_latent(self, f):
        """(B, C, H, W) -> codes per scale, f_hat (differentiable in the codebook and phi), and each
        scale's distances (N_s, V) of its residuals to the codes."""
        f_rest, f_hat, codes, dists = f.detach(), torch.zeros_like(f), [], []
        for s, p in enumerate(self.cfg.patch_nums):
            r = F.interpolate(f_rest, size=(p, p), mode="area") if p != f.shape[-1] else f_rest
            B, C = r.shape[:2]
            dists.append(code_distances(r.permute(0, 2, 3, 1).reshape(-1, C), self.quantize.embedding.weight))
            codes.append(dists[-1].argmin(1).view(B, p, p))
            h = self.scale_embedding(s, codes[-1])
            f_rest, f_hat = f_rest - h.detach(), f_hat + h
        return codes, f_hat, dists

    def latent(self, img):  # (B, 3, H, W) -> f (B, C, p_K, p_K)
        check_images(img, self.downsample)
        side = (img.shape[2] // self.downsample, img.shape[3] // self.downsample)
        if side != (self.cfg.patch_nums[-1],) * 2:
            raise ValueError(f"this VQVAE takes {self.cfg.patch_nums[-1] * self.downsample} px square images "
                             f"(last scale {self.cfg.patch_nums[-1]}), got {img.shape[2]}x{img.shape[3]}")
        return self.quant_conv(self.encoder(img))

    @torch.no_grad()
    def encode(self, img) -> list[torch.Tensor]:  # (B, 3, H, W) in [-1, 1] -> [(B, p, p) int64 per scale]
        return self.quantize_latent(self.latent(img))[0]

    def codes_to_fhat(self, codes):  # [(B, p, p)] -> f_hat (B, C, p_K, p_K)
        self._check_scales(codes)
        K = self.cfg.patch_nums[-1]
        f_hat = self.quantize.embedding.weight.new_zeros(codes[0].shape[0], self.cfg.z_channels, K, K)
        for s, c in enumerate(codes):
            f_hat = f_hat + self.scale_embedding(s, c)
        return f_hat

    @torch.no_grad()
    def decode(self, codes):  # [(B, p, p)] -> images (B, 3, H, W) clamped to [-1, 1] (VAR's fhat_to_img)
        return self.decoder(self.post_quant_conv(self.codes_to_fhat(codes))).clamp(-1, 1)

    def teacher_forcing_input(self, codes):  # [(B, p, p)] -> (B, L - p_1^2, C)
        """What the next-scale transformer reads for scales 2..K: f_hat of the scales so far, area-resized to
        the next scale and flattened row-major (the first scale reads the class/start token instead)."""
        self._check_scales(codes)
        K, (B, _, _) = self.cfg.patch_nums[-1], codes[0].shape
        f_hat = self.quantize.embedding.weight.new_zeros(B, self.cfg.z_channels, K, K)
        inputs = []
        for s in range(len(codes) - 1):
            f_hat = f_hat + self.scale_embedding(s, codes[s])
            inputs.append(self.next_input(f_hat, s))
        return torch.cat(inputs, 1)

    def next_input(self, f_hat, s: int):  # f_hat after scales <= s -> input of scale s + 1 (B, p_{s+1}^2, C)
        p = self.cfg.patch_nums[s + 1]
        return F.interpolate(f_hat, size=(p, p), mode="area").flatten(2).transpose(1, 2)

    def forward(self, img) -> dict[str, torch.Tensor]:
        """Training step, as VAR's quantiser: codebook |f_hat - sg(f)|^2 and commit beta |sg(f_hat) - f|^2
        (on the final f_hat), straight-through reconstruction loss |img - recon|^2."""
        f = self.latent(img)
        codes, f_hat, d = self.quantize_latent(f)
        recon = self.decoder(self.post_quant_conv(f + (f_hat - f).detach()))
        losses = {"rec": F.mse_loss(recon, img), "codebook": F.mse_loss(f_hat, f.detach()),
                  "commit": self.cfg.beta * F.mse_loss(f, f_hat.detach())}
        if self.cfg.entropy_weight:
            losses["entropy"] = self.cfg.entropy_weight * entropy_loss(torch.cat(d))
        flat = torch.cat([c.flatten() for c in codes])
        return {"recon": recon, "codes": codes, "loss": sum(losses.values()), **losses,
                **codebook_usage(flat, self.cfg.codebook_size)}

    def _check_scales(self, codes) -> None:
        if len(codes) != len(self.cfg.patch_nums):
            raise ValueError(f"expected codes for {len(self.cfg.patch_nums)} scales {self.cfg.patch_nums}, got {len(codes)}")
        for s, (c, p) in enumerate(zip(codes, self.cfg.patch_nums)):
            check_codes(c, self.cfg.codebook_size, (p, p), name=f"codes of scale {s + 1}")


@torch.no_grad()
def prefix_codes(vq, x):
    """The source x (B, 3, H, W) as the EditAR baseline's prefix reads it: its codes (B, h, w), or, from VAR's
    multi-scale VQVAE, its f_hat (B, h, w, Cvae): the sum of every scale, what the decoder draws from."""
    if isinstance(vq, MultiScaleVQVAE):
        return vq.codes_to_fhat(vq.encode(x)).permute(0, 2, 3, 1)
    return vq.encode(x)


# VAR's VQVAE key names -> the LlamaGen-style names used here (decoder levels are renumbered).
VAR_RENAMES = [
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.conv_blocks.\1.res."),
    (r"^encoder\.down\.(\d+)\.", r"encoder.conv_blocks.\1."),
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid.0."),
    (r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid.1."),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid.2."),
]
UNUSED_BUFFERS = ("quantize.codebook_used", "quantize.ema_vocab_hit_SV")  # training statistics only


def _rename_var(sd: dict) -> dict:
    levels = 1 + max((int(m[1]) for k in sd if (m := re.match(r"decoder\.up\.(\d+)\.", k))), default=-1)
    out = {}
    for key, value in sd.items():
        for pattern, repl in VAR_RENAMES:
            key = re.sub(pattern, repl, key)
        m = re.match(r"^decoder\.up\.(\d+)\.(block\.)?(.*)$", key)
        if m:  # VAR runs up.{L-1} first; here conv_blocks.0 runs first
            key = f"decoder.conv_blocks.{levels - 1 - int(m[1])}.{'res.' if m[2] else ''}{m[3]}"
        m = re.match(r"^(.*attn\.\d+|.*mid\.1)\.qkv\.(weight|bias)$", key)
        if m:  # one fused 1x1 conv [q | k | v] -> three
            for name, part in zip("qkv", value.chunk(3)):
                out[f"{m[1]}.{name}.{m[2]}"] = part
            continue
        out[key] = value
    return out


def _infer_conv_config(sd: dict, path) -> dict:
    core = ("encoder.conv_in.weight", "encoder.conv_out.weight", "quantize.embedding.weight")
    if any(k not in sd for k in core):
        check_state_dict(sd, {k: sd[k].shape if k in sd else () for k in core}, path, "tokenizer")
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = 1 + max((int(m[1]) for k in sd if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k))), default=-1)
    res = 1 + max((int(m[1]) for k in sd if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k))), default=-1)
    if levels < 1 or res < 1:
        raise CheckpointError(f"{path}: no encoder.conv_blocks.* levels: not a tokenizer checkpoint")
    ch_mult = tuple(sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch
                    if f"encoder.conv_blocks.{i}.res.0.conv1.weight" in sd else 1 for i in range(levels))
    V, C = sd["quantize.embedding.weight"].shape
    return dict(ch=ch, ch_mult=ch_mult, z_channels=sd["encoder.conv_out.weight"].shape[0], codebook_size=V,
                num_res_blocks=res), C


def _build(cls, cfg, sd: dict, source, what: str):
    with torch.device("meta"):
        model = cls(cfg)
    check_state_dict(sd, {k: v.shape for k, v in model.state_dict().items()}, source, what)
    # Own float32 copies: files may hold bf16, or tensors that are views of one shared storage.
    model.load_state_dict({k: v.to(torch.float32, copy=True) for k, v in sd.items()}, assign=True)
    return model.eval().requires_grad_(False)


def recorded_config(path) -> dict:
    """The config our exports record in their metadata, for what the shapes do not show (GroupNorm groups,
    the toy's PatchVQ); {} for official files, which have the official values."""
    own = str(path).endswith(".safetensors") and Path(path).is_file()
    return read_meta(path).get("config", {}) if own else {}


def load_vq(path) -> VQModel | PatchVQ:
    """LlamaGen VQ from `vq_ds16_c2i.pt` / `vq_ds16_t2i.pt` style files (the architecture comes from the
    shapes), or the toy's PatchVQ from its export."""
    cfg = recorded_config(path)
    if cfg.get("patch"):
        cfg = PatchVQConfig(**{**cfg, "ch_mult": tuple(cfg["ch_mult"])})
        return _build(PatchVQ, cfg, read_checkpoint(path)[0], path, "toy tokenizer")
    return vq_from_state_dict(read_checkpoint(path)[0], source=path, norm_groups=cfg.get("norm_groups", 32))


def vq_from_state_dict(sd: dict, source="state dict", norm_groups=32) -> VQModel:
    if any(k.startswith("encoder.down.") for k in sd):
        raise CheckpointError(f"{source}: a VAR multi-scale VQVAE, not a LlamaGen VQ (read it with load_msvq)")
    sd = {k: v for k, v in sd.items() if k not in UNUSED_BUFFERS}
    kw, dim = _infer_conv_config(sd, source)
    cfg = VQConfig(**kw, codebook_dim=dim, norm_groups=norm_groups)
    return _build(VQModel, cfg, sd, source, "LlamaGen VQ")


def load_msvq(path, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)) -> MultiScaleVQVAE:
    """VAR's multi-scale VQVAE from `vae_ch160v4096z32.pth` style files (plain state dicts)."""
    groups = recorded_config(path).get("norm_groups", 32)
    return msvq_from_state_dict(read_checkpoint(path)[0], patch_nums, source=path, norm_groups=groups)


def msvq_from_state_dict(sd: dict, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), source="state dict",
                         norm_groups=32) -> MultiScaleVQVAE:
    sd = _rename_var({k: v for k, v in sd.items() if k not in UNUSED_BUFFERS})
    kw, dim = _infer_conv_config(sd, source)
    if dim != kw["z_channels"]:
        raise CheckpointError(f"{source}: codebook width {dim} differs from the latent width {kw['z_channels']}: "
                              "not a VAR VQVAE (a LlamaGen VQ? read it with load_vq)")
    num_phi = sum(1 for k in sd if re.match(r"quantize\.quant_resi\.qresi_ls\.\d+\.weight$", k))
    cfg = MSVQConfig(**kw, patch_nums=tuple(patch_nums), num_phi=num_phi or 4, norm_groups=norm_groups)
    return _build(MultiScaleVQVAE, cfg, sd, source, "VAR VQVAE")
