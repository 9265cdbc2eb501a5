"""Shared test setup: the repository root on sys.path and the fixture folder."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "tests" / "fixtures"


def save_tiny_frozen(folder):
    """A tiny random DINOv2 and tokenizers, saved as the toy stages export them (for train/sample tests)."""
    import torch
    from checkpoint import save_checkpoint
    from encoder import DINOv2, DINOv2Config
    from vq import MSVQConfig, MultiScaleVQVAE, VQConfig, VQModel
    torch.manual_seed(0)
    dino = DINOv2(DINOv2Config(dim=64, depth=2, heads=1, ffn_hidden=128, patch_size=8, pos_grid=4))
    save_checkpoint(folder / "dino.safetensors", dino.state_dict(), {"kind": "dinov2"})
    vq = VQModel(VQConfig(ch=32, ch_mult=(1, 1, 1), z_channels=32, codebook_size=64, codebook_dim=8, num_res_blocks=1))
    save_checkpoint(folder / "vq.safetensors", vq.state_dict(), {"kind": "vq"})
    msvq = MultiScaleVQVAE(MSVQConfig(ch=32, ch_mult=(1, 1, 1), z_channels=8, codebook_size=64, patch_nums=(1, 2, 4, 8),
                                      num_res_blocks=1))
    save_checkpoint(folder / "msvq.safetensors", msvq.state_dict(), {"kind": "msvq", "patch_nums": [1, 2, 4, 8]})
    return folder


def assert_flex_matches_sdpa(monkeypatch, scar, prefix, inputs, batch):
    """The full-sequence passes run through flex_attention (the CUDA path), forced on the CPU, give the SDPA
    path's hidden states and SCAR losses. (PyTorch has no flex backward on the CPU.)"""
    import torch
    import model

    def run():
        with torch.no_grad():
            torch.manual_seed(1)  # the same CFG drops in both runs
            return scar.backbone.hidden(prefix, inputs), scar(**batch)

    H, losses = run()
    calls, flex = [], model.compiled_flex()
    monkeypatch.setattr(model, "use_flex", lambda x: True)
    monkeypatch.setattr(model, "compiled_flex", lambda: lambda *a, **k: calls.append(1) or flex(*a, **k))
    H_flex, losses_flex = run()
    blocks = getattr(scar.backbone, "layers", None) or scar.backbone.blocks
    assert len(calls) == 2 * len(blocks)  # every block of both passes took the flex path
    torch.testing.assert_close(H_flex, H, atol=1e-5, rtol=1e-5)
    for k in losses:
        torch.testing.assert_close(losses_flex[k], losses[k], atol=1e-5, rtol=1e-5)


def seeded_weights(shapes: dict) -> dict:
    """Random weights drawn from each key's position in sorted order, for networks too large to store as a
    fixture (FID's Inception): the fixture script and the test draw the same ones. Convolutions at He scale,
    batch-norm statistics near identity, so random activations stay finite."""
    import torch
    out = {}
    for i, key in enumerate(sorted(shapes)):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(shapes[key], generator=g)
        if key.endswith("running_var"):
            x = 1 + 0.1 * x.abs()
        elif key.endswith(("bn.weight",)):
            x = 1 + 0.1 * x
        elif key.endswith(("bn.bias", "running_mean")):
            x = 0.1 * x
        elif x.ndim > 1:
            x = x * (2 / x[0].numel()) ** 0.5
        out[key] = x
    return out
