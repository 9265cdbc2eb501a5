"""Compressed Semantic Prefilling: the learnable compressor P_k and its reconstruction head U_k.

    F_s (B, h, w, C) --P_k--> F_c (B, h/k, w/k, C)      k per side: k^2 x fewer prefix tokens
    L_pres = |F_s - U_k(F_c)|^2                           U_k is used in training only

Variants (the paper's Table 4), by name:
    "conv+resize"  F_c = C_k(F_s) + R_k(F_s): strided 3x3 conv plus bilinear resize (the default)
    "resize"       F_c = R_k(F_s)
    "unshuffle"    F_c = Linear(C k^2 -> C)(pixel_unshuffle_k(F_s))

U_k, by name:
    "released"     3x3 conv C -> C k^2, pixel shuffle k, 3x3 conv C -> C (the released code's; at DINOv2-L's
                   C = 1024 its first conv alone has 38 M parameters at k = 2 and 151 M at k = 4)
    "lean"         log2(k) stages of a 1x1 conv C -> 4C and a pixel shuffle 2 (4.2 M at k = 2, 8.4 M at k = 4)
"""
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("conv+resize", "resize", "unshuffle")
HEADS = ("released", "lean")


def reconstruction_head(C: int, k: int, head: str) -> nn.Sequential:  # U_k: (B, C, h/k, w/k) -> (B, C, h, w)
    if head == "released":
        return nn.Sequential(nn.Conv2d(C, C * k * k, 3, padding=1), nn.PixelShuffle(k), nn.Conv2d(C, C, 3, padding=1))
    stages = []
    for _ in range(k.bit_length() - 1):
        stages += [nn.Conv2d(C, 4 * C, 1), nn.PixelShuffle(2)]
    return nn.Sequential(*stages)


class SemanticCompressor(nn.Module):
    def __init__(self, C: int, k: int = 2, kind: str = "conv+resize", reconstruct: bool = True, head: str = "released"):
        """reconstruct=False builds no U_k (the ablation without L_pres: pres_loss is then 0)."""
        super().__init__()
        if k not in (1, 2, 4):
            raise ValueError(f"compression k must be 1, 2 or 4 per side, got {k}")
        if kind not in KINDS:
            raise ValueError(f"compressor kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if head not in HEADS:
            raise ValueError(f"reconstruction head must be one of {', '.join(HEADS)}, got {head!r}")
        self.k, self.kind = k, kind
        if k == 1:
            return  # no compression: F_c = F_s, no parameters, L_pres = 0
        if kind == "conv+resize":
            self.conv = nn.Conv2d(C, C, 3, stride=k, padding=1)  # C_k
        if kind == "unshuffle":
            self.fold = nn.Linear(C * k * k, C)
        if reconstruct:
            self.up = reconstruction_head(C, k, head)  # U_k

    def forward(self, F_s):  # (B, h, w, C) -> F_c (B, h/k, w/k, C)
        k = self.k
        if k == 1:
            return F_s
        B, h, w, C = F_s.shape
        if h % k or w % k:
            raise ValueError(f"the feature grid {h}x{w} must be divisible by the compression k = {k}")
        x = F_s.permute(0, 3, 1, 2)  # (B, C, h, w)
        if self.kind == "unshuffle":
            return self.fold(F.pixel_unshuffle(x, k).permute(0, 2, 3, 1))
        F_c = F.interpolate(x, size=(h // k, w // k), mode="bilinear", align_corners=False)  # R_k
        if self.kind == "conv+resize":
            F_c = F_c + self.conv(x)
        return F_c.permute(0, 2, 3, 1)

    def pres_loss(self, F_s, F_c):
        """L_pres = MSE(U_k(F_c), F_s): what the compression drops must stay recoverable."""
        if not hasattr(self, "up"):
            return F_s.new_zeros(())
        rebuilt = self.up(F_c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return F.mse_loss(rebuilt.float(), F_s.float())
