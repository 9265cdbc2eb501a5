"""Tokenizers: parity with the official LlamaGen VQ and VAR VQVAE, full-size layouts, training, errors."""
import json
from dataclasses import asdict, replace

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file

from checkpoint import CheckpointError, save_checkpoint
from vq import (MSVQ_SIZES, VQ_SIZES, MSVQConfig, MultiScaleVQVAE, PatchVQ, PatchVQConfig, VQConfig, VQModel,
                farthest_points, kmeans, load_msvq, load_vq, msvq_from_state_dict, vq_from_state_dict)

LLAMAGEN, VAR = FIXTURES / "llamagen_vq", FIXTURES / "var_vqvae"
LATENT_TOL, IMAGE_TOL = dict(atol=1e-5, rtol=0), dict(atol=1e-4, rtol=0)  # the fixture READMEs' tolerances


@pytest.fixture(scope="module")
def vq():
    return load_vq(LLAMAGEN / "checkpoint.pt")


@pytest.fixture(scope="module")
def msvq():
    return load_msvq(VAR / "vae_ch32v64z8.pth", patch_nums=(1, 2, 3, 4))


def test_llamagen_vq_parity_every_reference(vq):
    ref = load_file(LLAMAGEN / "reference.safetensors")
    img = ref["image"]
    with torch.no_grad():
        torch.testing.assert_close(vq.encoder(img), ref["enc_out"], **LATENT_TOL)
        torch.testing.assert_close(vq.quant_conv(vq.encoder(img)), ref["pre_quant"], **LATENT_TOL)
        codes = vq.encode(img)
        assert codes.shape == (1, 8, 8) and codes.dtype == torch.int64
        assert torch.equal(codes.flatten(), ref["indices"])
        torch.testing.assert_close(vq.embed(codes), ref["quant"], atol=1e-6, rtol=0)
        torch.testing.assert_close(vq.decode(codes), ref["dec_from_indices"], **IMAGE_TOL)
        torch.testing.assert_close(vq.decode(codes), ref["recon"], **IMAGE_TOL)
        generated = ref["codes"].long().view(2, 8, 8)  # (B, h*w) int32 as LlamaGen's generate returns them
        torch.testing.assert_close(vq.decode(generated), ref["dec_codes"], **IMAGE_TOL)
    assert vq.decode(codes).abs().max() > 1  # raw decoder output, not clamped


def test_var_vqvae_parity_every_reference(msvq):
    ref = load_file(VAR / "reference.safetensors")
    img = ref["img"]
    with torch.no_grad():
        torch.testing.assert_close(msvq.encoder(img), ref["enc_out"], **LATENT_TOL)
        torch.testing.assert_close(msvq.latent(img), ref["f"], **LATENT_TOL)
        codes = msvq.encode(img)
        for s, c in enumerate(codes):
            assert c.dtype == torch.int64 and torch.equal(c.flatten(1), ref[f"idx_Bl.{s}"]), s
        f_hat = torch.zeros_like(ref["f"])
        for s, c in enumerate(codes):  # cumulative f_hat and its decoding after every scale
            f_hat = f_hat + msvq.scale_embedding(s, c)
            torch.testing.assert_close(f_hat, ref[f"fhat_cum.{s}"], **LATENT_TOL)
            image = msvq.decoder(msvq.post_quant_conv(f_hat)).clamp(-1, 1)
            torch.testing.assert_close(image, ref[f"img_rec_per_scale.{s}"], **IMAGE_TOL)
        torch.testing.assert_close(msvq.codes_to_fhat(codes), ref["fhat_from_idx"], **LATENT_TOL)
        torch.testing.assert_close(msvq.decode(codes), ref["img_rec_last"], **IMAGE_TOL)
        torch.testing.assert_close(msvq.teacher_forcing_input(codes), ref["x_BLCv_wo_first_l"], **LATENT_TOL)


def test_var_phi_schedule_of_the_released_scales(msvq):
    """Scale -> shared phi conv, with VAR's float64 tie-breaking (fixture README, point 3)."""
    assert msvq.phi_index == [0, 1, 2, 3]
    with torch.device("meta"):
        released = MultiScaleVQVAE(MSVQ_SIZES["vae_ch160v4096z32"])
    assert released.phi_index == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_full_size_var_layout_loads():
    keys = json.loads((VAR / "full_size_keys.json").read_text())["vae_ch160v4096z32.pth"]
    sd = {k: torch.empty(shape, device="meta") for k, (shape, _dtype) in keys.items()}
    model = msvq_from_state_dict(sd)
    assert model.cfg == MSVQ_SIZES["vae_ch160v4096z32"]
    assert sum(p.numel() for p in model.parameters()) + 10 * 4096 == 108_989_315  # + the unused ema buffer


def test_full_size_llamagen_vq16_layout_loads():
    """VQ-16 has 1x1 nin_shortcut convs exactly where the width changes (fixture README)."""
    with torch.device("meta"):
        sd = VQModel(VQ_SIZES["VQ-16"]).state_dict()
    shortcuts = sorted(k.rsplit(".nin_shortcut", 1)[0] for k in sd if k.endswith("nin_shortcut.weight"))
    assert shortcuts == ["decoder.conv_blocks.1.res.0", "decoder.conv_blocks.3.res.0",
                         "encoder.conv_blocks.2.res.0", "encoder.conv_blocks.4.res.0"]
    sd["quantize.codebook_used"] = torch.empty(65536, device="meta")  # in every official file, unused
    model = vq_from_state_dict(sd)
    assert model.cfg == VQ_SIZES["VQ-16"] and model.downsample == 16
    assert model.quantize.embedding.weight.shape == (16384, 8)


def scenes(n, size, generator):
    """Procedural training images in [-1, 1]: gradients with 1-3 coloured discs and squares."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for _ in range(n):
        c0, c1 = torch.rand(2, 3, 1, 1, generator=generator)
        t = xx if torch.rand(1, generator=generator) < 0.5 else yy
        img = c0 * (1 - t) + c1 * t
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            cx, cy, r = torch.rand(3, generator=generator) * torch.tensor([1, 1, 0.25]) + torch.tensor([0, 0, 0.1])
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2
            square = ((xx - cx).abs() < r) & ((yy - cy).abs() < r)
            shape = disc if torch.rand(1, generator=generator) < 0.5 else square
            img = torch.where(shape, torch.rand(3, 1, 1, generator=generator), img)
        images.append(img)
    return torch.stack(images) * 2 - 1


@pytest.mark.parametrize("model", [
    lambda: VQModel(VQConfig(ch=32, ch_mult=(1, 1), z_channels=32, codebook_size=256, codebook_dim=8, num_res_blocks=1)),
    lambda: MultiScaleVQVAE(MSVQConfig(ch=32, ch_mult=(1, 1), z_channels=8, codebook_size=256,
                                       patch_nums=(1, 2, 4, 8), num_res_blocks=1)),
], ids=["vq", "msvq"])
def test_small_tokenizer_learns_procedural_images(model):
    torch.manual_seed(0)
    model = model()
    data, held_out = torch.Generator().manual_seed(0), scenes(32, 16, torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    with torch.no_grad():
        before = model(held_out)["rec"]
    for _ in range(250):
        out = model(scenes(8, 16, data))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    with torch.no_grad():
        after = model(held_out)
    assert after["rec"] < 0.5 * before
    assert after["usage"] * 256 > 32 and after["perplexity"] > 16
    assert model.quantize.embedding.weight.grad.abs().sum() > 0  # the codebook loss reaches the codes


def test_straight_through_gradient_reaches_the_encoder():
    model = VQModel(VQConfig(ch=32, ch_mult=(1, 1), z_channels=32, codebook_size=64, codebook_dim=8, num_res_blocks=1))
    out = model(scenes(2, 16, torch.Generator().manual_seed(0)))
    out["rec"].backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_farthest_points_reach_rare_vectors():
    common = torch.tensor([1.0, 0, 0]) + 0.01 * torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    rare = torch.tensor([[0.0, 1, 0], [0, 0, 1], [0, -1, 0]])
    x = torch.cat([common[:200], rare[:1], common[200:], rare[1:]])
    picked = farthest_points(x, 4).tolist()
    assert picked[0] == 0 and sorted(picked[1:]) == [200, 501, 502]


def tiny_patch_vq(codebook_size=64):  # 4 x 4 px tokens
    torch.manual_seed(0)
    return PatchVQ(PatchVQConfig(patch=4, codebook_size=codebook_size, ch=16, ch_mult=(1, 1, 1), num_res_blocks=1))


def test_patch_vq_seeds_one_centroid_per_distinct_patch_and_starts_from_the_mosaic():
    """With no more distinct patches than codes every patch is a centroid: identical patches share a code
    wherever they are, and the untrained decoder (last conv at zero) returns the mosaic, the image itself."""
    model = tiny_patch_vq()
    colours = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, 1]])
    img = colours[:, :, None, None].expand(4, 3, 16, 16).clone()  # four flat images
    img[0, :, 4:8, 8:12] = colours[1][:, None, None]  # a green block on red, on the token grid
    model.seed(img)
    codes = model.encode(img)
    assert codes.unique().numel() == 4 and codes[0, 1, 2] == codes[1, 0, 0]
    assert torch.allclose(model.decode(codes), img, atol=1e-6)
    with pytest.raises(ValueError, match="at least one image"):
        model.seed(img[:0])


def test_patch_vq_seeding_keeps_the_most_frequent_patch_accurate():
    """More distinct patches than codes: a weighted k-means; the flat background, which occurs most, keeps a
    centroid near it (within 2 levels, against 13 for the noise), and the noise patches share the others."""
    model = tiny_patch_vq(codebook_size=8)
    img = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1  # 96 distinct noise patches
    img[:4] = torch.tensor([0.2, -0.6, 0.4])[:, None, None]  # 64 tokens of one flat colour
    model.seed(img)
    codes = model.encode(img)
    error = (model.decode(codes) - img).abs().mean((1, 2, 3)) * 127.5  # mean error in levels of 255
    assert error[:4].max() < 2 and error[4:].min() > 13
    assert codes[4:].unique().numel() >= 6 and (codes[:4] == codes[0, 0, 0]).all()


def test_kmeans_weights_rows_by_occurrence():
    """Two tight clusters and a far outlier in three centres: the rare outlier keeps one (the farthest-point
    start); with weights, a heavily used row draws its cluster's centre onto itself."""
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([1.0, 0, 0]) + 0.05 * torch.randn(50, 3, generator=g)
    b = torch.tensor([0.0, 1, 0]) + 0.05 * torch.randn(50, 3, generator=g)
    centres = kmeans(torch.cat([a, b, torch.tensor([[0.0, 0, 5]])]), torch.ones(101), 3)
    expected = torch.stack([a.mean(0), b.mean(0), torch.tensor([0.0, 0, 5])])
    assert torch.cdist(expected, centres).min(1).values.max() < 1e-5
    x = torch.cat([torch.tensor([[0.5, 0.5, 0]]), 0.01 * torch.randn(20, 3, generator=g) + 0.6, torch.tensor([[9.0, 9, 9]])])
    heavy = kmeans(x, torch.cat([torch.tensor([1000.0]), torch.ones(21)]), 2)
    plain = kmeans(x, torch.ones(22), 2)
    assert torch.cdist(x[:1], heavy).min() < 0.02 < 0.1 < torch.cdist(x[:1], plain).min()  # pulled onto the heavy row


def test_patch_vq_trains_and_its_export_loads(tmp_path):
    model = tiny_patch_vq(codebook_size=16)
    img = scenes(8, 16, torch.Generator().manual_seed(0))
    model.seed(img)
    out = model(img)
    out["loss"].backward()
    assert set(out) >= {"loss", "rec", "recon", "codes"} and model.decoder.conv_out.weight.grad.abs().sum() > 0
    assert model.centroids.grad is None  # the centroids are fixed after seeding
    save_checkpoint(tmp_path / "vq.safetensors", model.state_dict(), {"kind": "vq", "config": asdict(model.cfg)})
    loaded = load_vq(tmp_path / "vq.safetensors")
    assert isinstance(loaded, PatchVQ) and loaded.cfg == model.cfg and loaded.downsample == 4
    assert torch.equal(loaded.decode(loaded.encode(img)), model.decode(model.encode(img)))


def test_patch_vq_codes_depend_on_their_own_patch_only():
    """An edit in one place leaves every other token's code as it was (LlamaGen's encoder, whose attention
    is global, changes them all)."""
    model = tiny_patch_vq()
    x = scenes(1, 16, torch.Generator().manual_seed(0))
    model.seed(torch.cat([x, scenes(3, 16, torch.Generator().manual_seed(1))]))
    y = x.clone()
    y[:, :, 4:8, 8:12] = 0.3  # one 4 x 4 patch: token (1, 2)
    assert (model.encode(x) != model.encode(y))[0].nonzero().tolist() == [[1, 2]]
    llamagen = VQModel(VQConfig(ch=32, ch_mult=(1, 1, 1), z_channels=32, codebook_size=64, codebook_dim=8,
                                num_res_blocks=1, norm_groups=0))
    with torch.no_grad():
        assert ((llamagen.latent(x) - llamagen.latent(y)).abs().amax(1) > 1e-6).all()


def test_named_sizes_build():
    assert PatchVQ(PatchVQConfig()).downsample == 8
    assert MultiScaleVQVAE(MSVQ_SIZES["toy"]).downsample == 8


@pytest.mark.parametrize("bad, message", [
    (lambda: torch.rand(1, 3, 32, 32) * 255, r"\[-1, 1\]"),
    (lambda: torch.zeros(1, 32, 32), r"\(B, 3, H, W\)"),
    (lambda: torch.zeros(1, 3, 30, 32), "multiples of 4"),
    (lambda: torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "float tensor"),
])
def test_vq_rejects_bad_images(vq, bad, message):
    with pytest.raises(ValueError, match=message):
        vq.encode(bad())


def test_bad_codes_and_sizes(vq, msvq):
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        vq.decode(torch.full((1, 8, 8), 512))
    with pytest.raises(ValueError, match="integer"):
        vq.decode(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="64 px square"):
        msvq.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="4 scales"):
        msvq.decode([torch.zeros(1, 1, 1, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"scale 1 must be \(B, 1, 1\)"):
        msvq.decode([torch.zeros(1, p + 1, p + 1, dtype=torch.long) for p in (1, 2, 3, 4)])


def test_foreign_and_broken_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not a tokenizer|missing keys"):
        load_vq(FIXTURES / "dinov2_hub" / "dinov2_vit48d4h3_pretrain.pth")
    with pytest.raises(CheckpointError, match="no such file"):
        load_msvq(tmp_path / "vae.pth")
    data = (VAR / "vae_ch32v64z8.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        load_msvq(tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="VAR multi-scale VQVAE, not a LlamaGen VQ"):
        load_vq(VAR / "vae_ch32v64z8.pth")
    with pytest.raises(CheckpointError, match="not a VAR VQVAE"):
        load_msvq(LLAMAGEN / "checkpoint.pt")
