"""Next-scale backbone (VAR) and SCAR on it: parity, the block mask, the KV cache, the losses."""
import json

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask
from conftest import FIXTURES, assert_flex_matches_sdpa
from safetensors.torch import load_file

from checkpoint import CheckpointError
from model import (SCAR, NextScaleTransformer, SCARConfig, attention_mask, encode_words, load_var, var_config,
                   var_from_state_dict, vocabulary)
from sample import generate_scales
from vq import MSVQConfig, MultiScaleVQVAE, load_msvq

VAR = FIXTURES / "var_transformer"
TOL = dict(atol=1e-4, rtol=1e-4)  # the fixture README's tolerance


@pytest.fixture(scope="module")
def official():
    model = load_var(VAR / "var_d2.pth")
    vae = load_msvq(FIXTURES / "var_vqvae" / "vae_ch32v64z8.pth", patch_nums=model.cfg.patch_nums)
    return model, vae, load_file(VAR / "reference.safetensors")


def test_teacher_forced_logits_and_block_outputs(official):
    model, _, ref = official
    with torch.no_grad():
        torch.testing.assert_close(model(ref["label_B"], ref["x_BLCv_wo_first_l"]), ref["logits_BLV"], **TOL)
        c = model.prefix(ref["label_B"]).cond
        x = model.scale_tokens(c, ref["x_BLCv_wo_first_l"], 0, 30)
        torch.testing.assert_close(x, ref["x_BLC_in"], **TOL)
        mask = attention_mask(0, torch.ones(2, 0, dtype=torch.bool), model.blocks_of_scales, causal=True)
        for i, block in enumerate(model.blocks):
            x = block(x, c, mask)
            torch.testing.assert_close(x, ref[f"h_block.{i}"], **TOL)


@pytest.mark.parametrize("cfg, key", [(1.0, "ar_cfg1"), (4.0, "ar_cfg4")])
def test_greedy_generation_reproduces_official_indices(official, cfg, key):
    model, vae, ref = official
    codes = generate_scales(model, vae, ref["label_B"], cfg=cfg, top_k=1, generator=torch.Generator().manual_seed(0))
    for s, c in enumerate(codes):
        assert c.dtype == torch.int64 and torch.equal(c.flatten(1), ref[f"{key}.idx_Bl.{s}"]), s
    torch.testing.assert_close(vae.codes_to_fhat(codes), ref[f"{key}.f_hat"], **TOL)
    torch.testing.assert_close((vae.decode(codes) + 1) / 2, ref[f"{key}.img"], atol=1e-4, rtol=0)
    assert all(block.attn.cache is None for block in model.blocks)


@pytest.mark.parametrize("key", ["ar_cfg1", "ar_cfg4"])
def test_cached_scale_steps_give_the_official_raw_logits(official, key):
    """Each decode step's (2B, p^2, V) logits, before guidance, against the official run."""
    model, vae, ref = official
    labels = ref["label_B"]
    prefix = model.prefix(labels).cat(model.prefix(labels, drop_text=torch.ones(2, dtype=torch.bool)))
    codes = [ref[f"{key}.idx_Bl.{s}"].view(2, p, p) for s, p in enumerate(model.cfg.patch_nums)]
    inputs = vae.teacher_forcing_input(codes).repeat(2, 1, 1)
    with torch.no_grad():
        model.prefill(prefix)
        first = 0
        for s, n in enumerate(model.blocks_of_scales):
            step = model.decode(s, inputs[:, first - 1:first - 1 + n] if s else None)
            torch.testing.assert_close(step, ref[f"{key}.logits_raw.{s}"], **TOL)
            first += n
        model.reset_cache()


@pytest.mark.parametrize("name", ["var_d16.pth", "var_d20.pth", "var_d24.pth", "var_d30.pth"])
def test_full_size_layouts_load(name):
    keys = json.loads((VAR / "full_size_keys.json").read_text())[name]
    patch_nums = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    sd = {k: torch.empty(shape, device="meta") for k, (shape, _dtype) in keys.items()}
    sd["lvl_1L"] = torch.cat([torch.full((p * p,), i) for i, p in enumerate(patch_nums)])[None]  # read for patch_nums
    model = var_from_state_dict(sd)
    assert model.cfg == var_config(f"d{name[5:7]}")
    assert model.cfg.patch_nums == patch_nums and model.cfg.num_classes == 1000


def test_shared_adaln_layout_round_trips():
    torch.manual_seed(0)
    model = NextScaleTransformer(var_config("toy", shared_aln=True, num_classes=5, vae_dim=8, vocab_size=32,
                                            patch_nums=(1, 2, 3)))
    sd = dict(model.state_dict(), lvl_1L=model.lvl_1L)
    loaded = var_from_state_dict(sd)
    assert loaded.cfg.shared_aln and loaded.cfg == model.cfg
    x = torch.randn(2, 13, 8)
    torch.testing.assert_close(loaded(torch.tensor([1, 4]), x), model.eval()(torch.tensor([1, 4]), x))


def test_foreign_checkpoint_is_refused():
    with pytest.raises(CheckpointError, match="VAR transformer layout: missing keys class_emb.weight"):
        load_var(FIXTURES / "llamagen_gpt_c2i" / "checkpoint.pt")


def test_mask_with_a_prefix_and_three_scales():
    """P_s (2) and one text slot: the prefix is bidirectional, scale s sees the prefix and scales <= s."""
    mask = attention_mask(2, torch.tensor([[True]]), [1, 2, 3])[0, 0]
    expected = torch.tensor([
        # P  P  T  s1 s2 s2 s3 s3 s3
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    causal = attention_mask(2, torch.tensor([[True]]), [1, 2, 3], causal=True)[0, 0]
    expected[:3, :3] = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    assert torch.equal(causal, expected)


PATCH_NUMS = (1, 2, 4)
WORDS = vocabulary(["make it blue", "remove", "paint it red", "add a disc"])


def tiny(causal=False):
    torch.manual_seed(0)
    backbone = NextScaleTransformer(var_config("toy", dim=64, depth=2, n_head=4, cond="words", words=WORDS, text_len=12,
                                               vae_dim=8, vocab_size=32, patch_nums=PATCH_NUMS))
    vae = MultiScaleVQVAE(MSVQConfig(ch=32, ch_mult=(1, 1), z_channels=8, codebook_size=32, patch_nums=PATCH_NUMS,
                                     num_res_blocks=1)).eval()
    return SCAR(SCARConfig(feature_dim=16, feature_grid=4, k=2, causal=causal), backbone), vae


def batch(vae, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, mask = encode_words(["make it blue", "remove"] * (B // 2), WORDS, 12)
    codes = [torch.randint(0, 32, (B, p, p), generator=g) for p in PATCH_NUMS]
    return dict(F_s=torch.randn(B, 4, 4, 16, generator=g), F_t=torch.randn(B, 4, 4, 16, generator=g), text=ids,
                text_mask=mask, codes=torch.cat([c.flatten(1) for c in codes], 1),
                inputs=vae.teacher_forcing_input(codes).detach()), codes


def randomise_adaln(model):  # AdaLN-zero makes a fresh model's blocks the identity
    for p in model.backbone.parameters():
        if p.ndim == 2:
            torch.nn.init.normal_(p, std=0.2)


def test_flex_attention_path_equals_sdpa(monkeypatch):
    block = attention_mask(2, torch.tensor([[True]]), [1, 2, 3], flex=True)
    assert torch.equal(create_mask(block.mask_mod, 1, 1, 9, 9), attention_mask(2, torch.tensor([[True]]), [1, 2, 3]))
    model, vae = tiny()
    randomise_adaln(model)
    b, _ = batch(vae)
    assert_flex_matches_sdpa(monkeypatch, model, model.prefix((b["F_s"], b["text"]), b["text_mask"]), b["inputs"], b)


def test_kv_cache_scale_by_scale_equals_full_recomputation_with_scar_prefix_and_cfg():
    model, vae = tiny()
    randomise_adaln(model)
    b, codes = batch(vae)
    cond = (b["F_s"], b["text"])
    with torch.no_grad():
        prefix = model.prefix(cond, b["text_mask"])
        prefix = prefix.cat(model.prefix(cond, b["text_mask"], drop_text=torch.ones(2, dtype=torch.bool)))
        inputs = b["inputs"].repeat(2, 1, 1)
        full = model.backbone.logits(prefix, inputs)  # (4, 21, V)
        model.backbone.prefill(prefix)
        steps, first = [], 0
        for s, n in enumerate(model.backbone.blocks_of_scales):
            steps.append(model.backbone.decode(s, inputs[:, first - 1:first - 1 + n] if s else None))
            first += n
        model.backbone.reset_cache()
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert not torch.allclose(full[:2], full[2:], atol=1e-3)


def test_scar_generation_on_the_next_scale_backbone():
    model, vae = tiny()
    randomise_adaln(model)
    b, _ = batch(vae)
    codes = generate_scales(model.eval(), vae, (b["F_s"], b["text"]), cfg=2.0, top_k=5,
                            generator=torch.Generator().manual_seed(0))
    assert [c.shape for c in codes] == [(2, p, p) for p in PATCH_NUMS]
    assert vae.decode(codes).shape == (2, 3, 8, 8)  # latent 4 x 4, downsampling 2


def test_tiny_next_scale_scar_overfits_and_align_reaches_the_compressor():
    model, vae = tiny()
    model.cfg.drop_text = model.cfg.drop_image = model.cfg.drop_both = 0.0
    b, _ = batch(vae, B=4)
    losses = model(**b)
    losses["align"].backward()
    assert model.compressor.conv.weight.grad.abs().sum() > 0 and model.prefix_pos.grad.abs().sum() > 0
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = {k: v.item() for k, v in losses.items()}
    for _ in range(150):
        losses = model(**b)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert losses["ce"].item() < 0.1 * first["ce"] and losses["loss"].item() < 0.2 * first["loss"]


@pytest.mark.parametrize("causal", [False, True])
def test_prefix_states_see_the_text_only_with_the_papers_mask(causal):
    model, vae = tiny(causal)
    randomise_adaln(model)
    b, _ = batch(vae)
    other, other_mask = encode_words(["paint it red", "add a disc"], WORDS, 12)
    with torch.no_grad():
        # the AdaLN condition (pooled text) reaches every position, so compare before the final AdaLN
        H = []
        for text, mask in ((b["text"], b["text_mask"]), (other, other_mask)):
            prefix = model.prefix((b["F_s"], text), mask)
            prefix = prefix._replace(cond=torch.ones_like(prefix.cond))
            H.append(model.backbone.hidden(prefix, b["inputs"])[:, :4])
    assert torch.allclose(H[0], H[1]) == causal
