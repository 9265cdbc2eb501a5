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
