"""DINOv2 parity with the official torch-hub code and with transformers, loading, and errors."""
import json
import shutil

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file

from checkpoint import CheckpointError
from encoder import dinov2_config, dinov2_from_state_dict, load_dinov2

HUB, HF = FIXTURES / "dinov2_hub", FIXTURES / "dinov2_hf"
HUB_MODELS = {"dinov2_vit48d4h3": 3, "dinov2_vit40d4h4_swiglu_reg4": 4}  # name -> heads
HF_MODELS = ["dinov2-vit48d4h3", "dinov2-with-registers-vit40d4h4-swiglu"]
SAME_WEIGHTS = dict(zip(HF_MODELS, HUB_MODELS))
TOL = dict(atol=5e-5, rtol=1e-4)  # the fixture READMEs' tolerance


def inputs(folder):
    """x_a, x_b, img_odd and the large x_c / x_d rebuilt from their factored form."""
    raw = load_file(folder / "inputs.safetensors")
    xs = {"x_a": raw["x_a"].float(), "x_b": raw["x_b"], "img_odd": raw["img_odd"].float()}
    for name in ("x_c", "x_d"):
        coarse, fine = raw[f"{name}.coarse"], raw[f"{name}.fine"]
        h, w = coarse.shape[-2:]
        xs[name] = coarse.repeat_interleave(14, 2).repeat_interleave(14, 3) + fine.repeat(1, 1, h, w)
    return xs


def reduce(t, how):
    return {"sub": lambda: t[:, ::11], "mean": lambda: t.mean(1), None: lambda: t}[how]()


def hub_output(model, xs, key):
    """Recompute one reference tensor of the hub fixture, following the README's 'exact call' column."""
    if key == "features.img_odd":
        return model.features(xs["img_odd"])
    name, call = key.split(".", 1)
    x = xs[name]
    how = call.rsplit(".", 1)[1] if call.endswith((".sub", ".mean")) else None
    call = call.removesuffix(f".{how}") if how else call
    if call.startswith("ff."):
        return reduce(model.forward_features(x)[call[3:]], how)
    if call == "forward":
        return model(x)
    if call == "pos_embed_interp":
        return reduce(model.interpolate_pos_encoding(*x.shape[-2:]), how)
    kind, *idx = call.split(".")
    if kind == "gil_list_nonorm":
        return model.get_intermediate_layers(x, [0, 2, 3], norm=False)[int(idx[0])]
    if kind == "gil_list_norm":
        return model.get_intermediate_layers(x, [0, 2, 3])[int(idx[0])]
    if kind == "gil_n1":
        return model.get_intermediate_layers(x, 1)[0]
    if kind == "gil_n2_reshape_cls":
        pairs = model.get_intermediate_layers(x, 2, reshape=True, return_class_token=True)
        return pairs[int(idx[0])][0 if idx[1] == "patch" else 1]
    raise KeyError(key)


def hf_output(model, xs, key):
    """Recompute one reference tensor of the transformers fixture."""
    R = model.cfg.registers
    if key == "features.img_odd":
        return model.features(xs["img_odd"])
    name, call = key.split(".", 1)
    x = xs[name]
    if call.startswith("hidden_states."):
        i = int(call.split(".")[1])
        return model.prepare_tokens(x) if i == 0 else model.block_outputs(x, [i - 1])[0]
    if call.startswith("pos_embed_interp"):
        return reduce(model.interpolate_pos_encoding(*x.shape[-2:]), "sub" if call.endswith("sub") else None)
    ff = model.forward_features(x)
    last = torch.cat([ff["x_norm_clstoken"][:, None], ff["x_norm_regtokens"], ff["x_norm_patchtokens"]], 1)
    outputs = {"last_hidden_state": lambda: last, "pooler_output": lambda: last[:, 0],
               "register_tokens_out": lambda: last[:, 1:1 + R],
               "patch_tokens.sub": lambda: last[:, 1 + R:][:, ::11],
               "patch_tokens.mean": lambda: last[:, 1 + R:].mean(1)}
    return outputs[call]()


@pytest.mark.parametrize("name", HUB_MODELS)
def test_hub_parity_every_reference(name):
    model = load_dinov2(HUB / f"{name}_pretrain.pth", num_heads=HUB_MODELS[name])
    xs, ref = inputs(HUB), load_file(HUB / f"{name}.reference.safetensors")
    assert len(ref) >= 36
    with torch.no_grad():
        for key, expected in ref.items():
            torch.testing.assert_close(hub_output(model, xs, key), expected, **TOL, msg=key)


@pytest.mark.parametrize("folder", HF_MODELS)
def test_hf_parity_every_reference(folder):
    model = load_dinov2(HF / folder)
    xs, ref = inputs(HF), load_file(HF / folder / "reference.safetensors")
    assert len(ref) >= 24
    with torch.no_grad():
        for key, expected in ref.items():
            torch.testing.assert_close(hf_output(model, xs, key), expected, **TOL, msg=key)


@pytest.mark.parametrize("folder", HF_MODELS)
def test_hub_file_and_hf_folder_give_same_weights(folder):
    hub_name = SAME_WEIGHTS[folder]
    hub = load_dinov2(HUB / f"{hub_name}_pretrain.pth", num_heads=HUB_MODELS[hub_name]).state_dict()
    hf = load_dinov2(HF / folder).state_dict()
    assert hub.keys() == hf.keys()
    for key in hub:
        assert torch.equal(hub[key], hf[key]), key


def test_plain_hub_and_hf_models_interpolate_differently():
    """Same weights, two rules: the official 0.1 offset vs transformers' size=(h, w) (fixture README)."""
    hub = load_dinov2(HUB / "dinov2_vit48d4h3_pretrain.pth", num_heads=3)
    hf = load_dinov2(HF / "dinov2-vit48d4h3")
    assert (hub.interpolate_pos_encoding(98, 126) - hf.interpolate_pos_encoding(98, 126)).abs().max() > 0.1
    torch.testing.assert_close(hub.interpolate_pos_encoding(518, 518), hf.interpolate_pos_encoding(518, 518))


def meta_state_dict(keys):
    return {k: torch.empty(shape, device="meta") for k, shape in keys.items()}


@pytest.mark.parametrize("name", json.loads((HUB / "full_size_keys.json").read_text()))
def test_full_size_hub_layouts_load(name):
    entry = json.loads((HUB / "full_size_keys.json").read_text())[name]
    model = dinov2_from_state_dict(meta_state_dict(entry["keys"]))
    assert model.cfg == dinov2_config(name.removeprefix("dinov2_"))
    c = entry["constructor"]
    assert (model.cfg.dim, model.cfg.depth, model.cfg.heads, model.cfg.registers) == \
           (c["embed_dim"], c["depth"], c["num_heads"], c["num_register_tokens"])
    assert (model.cfg.interpolate_offset, model.cfg.interpolate_antialias) == \
           (c["interpolate_offset"], c["interpolate_antialias"])
    assert sum(p.numel() for p in model.parameters()) == entry["n_params"]


@pytest.mark.parametrize("name", json.loads((HF / "full_size_keys.json").read_text()))
def test_full_size_hf_layouts_load(name):
    entry = json.loads((HF / "full_size_keys.json").read_text())[name]
    config = dict(entry["config"], model_type="dinov2_with_registers" if "registers" in name else "dinov2")
    model = dinov2_from_state_dict(meta_state_dict(entry["keys_on_disk"]), config)
    hub = dinov2_config(entry["hub_equivalent"].removeprefix("dinov2_"))
    assert model.cfg.dim == hub.dim and model.cfg.depth == hub.depth and model.cfg.heads == hub.heads
    assert (model.cfg.ffn, model.cfg.ffn_hidden, model.cfg.registers) == (hub.ffn, hub.ffn_hidden, hub.registers)
    assert model.cfg.interpolate_offset == 0.0 and model.cfg.interpolate_antialias == (hub.registers > 0)
    assert sum(p.numel() for p in model.parameters()) == entry["n_params"]


@pytest.fixture(scope="module")
def reg_model():
    return load_dinov2(HF / "dinov2-with-registers-vit40d4h4-swiglu")


def test_features_quarters_match_transformers_hidden_states(reg_model):
    """quarters = LayerNorm (no affine) of blocks d/4, d/2, 3d/4, d concatenated (DESIGN.md decision 2)."""
    ref = load_file(HF / "dinov2-with-registers-vit40d4h4-swiglu" / "reference.safetensors")
    blocks = torch.cat([ref[f"x_b.hidden_states.{i}"][:, 5:] for i in (1, 2, 3, 4)], -1)  # 4 blocks, R = 4
    expected = torch.nn.functional.layer_norm(blocks, (160,), eps=1e-6).reshape(1, 7, 9, 160)
    img = inputs(HF)["img_odd"]
    torch.testing.assert_close(reg_model.features(img, layers="quarters"), expected, **TOL)


def test_features_resize_to_scar_grid(reg_model):
    """512 px images at size=448 give the paper's 32 x 32 grid; non-square inputs keep their aspect."""
    img = torch.rand(2, 3, 512, 512) * 2 - 1
    assert reg_model.features(img, size=448).shape == (2, 32, 32, 40)
    assert reg_model.features(img[..., :300], size=(224, 126)).shape == (2, 16, 9, 40)
    assert reg_model.features(img[..., :300]).shape == (2, 36, 21, 40)  # lower multiples of 14


def test_features_frozen_under_bf16_autocast(reg_model):
    assert not reg_model.training and not any(p.requires_grad for p in reg_model.parameters())
    img = (torch.rand(1, 3, 112, 112) * 2 - 1).requires_grad_()
    full = reg_model.features(img)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = reg_model.features(img)
    assert not full.requires_grad and not half.requires_grad
    assert half.dtype in (torch.bfloat16, torch.float32) and half.shape == full.shape
    cos = torch.nn.functional.cosine_similarity(half.float().flatten(1), full.flatten(1))
    assert cos.min() > 0.99
    assert (half.float() - full).abs().max() > 0  # it really ran in bf16


@pytest.mark.parametrize("bad, message", [
    (lambda: torch.rand(1, 3, 64, 64) * 255, r"\[-1, 1\]"),
    (lambda: torch.zeros(1, 64, 64), r"\(B, 3, H, W\)"),
])
def test_features_reject_bad_images(reg_model, bad, message):
    with pytest.raises(ValueError, match=message):
        reg_model.features(bad())


def test_bad_sizes_and_layers_are_refused(reg_model):
    img = torch.zeros(1, 3, 112, 112)
    with pytest.raises(ValueError, match="multiples of 14"):
        reg_model.features(img, size=100)
    with pytest.raises(ValueError, match="multiples of 14"):
        reg_model.forward_features(torch.zeros(1, 3, 100, 112))
    with pytest.raises(ValueError, match="'last' or 'quarters'"):
        reg_model.features(img, layers="middle")
    with pytest.raises(ValueError, match="0..3"):
        reg_model.get_intermediate_layers(img, [4])


def test_state_dict_of_another_model_names_the_keys(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 7, 7), "fc.bias": torch.zeros(10)}, path)
    with pytest.raises(CheckpointError, match=r"resnet\.pth.*missing keys cls_token.*unexpected keys conv1\.weight"):
        load_dinov2(path)


def test_missing_key_and_wrong_shape_are_named(tmp_path):
    sd = torch.load(HUB / "dinov2_vit48d4h3_pretrain.pth", weights_only=True)
    del sd["blocks.2.ls1.gamma"]
    sd["norm.bias"] = torch.zeros(7)
    sd["head.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as err:
        load_dinov2(tmp_path / "broken.pth", num_heads=3)
    msg = str(err.value)
    assert "missing keys blocks.2.ls1.gamma" in msg and "unexpected keys head.weight" in msg
    assert "norm.bias (7,) (expected (48,))" in msg and "\n" not in msg


def test_hf_folder_of_another_model(tmp_path):
    folder = tmp_path / "flan-t5"
    shutil.copytree(HF / "dinov2-vit48d4h3", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, model_type="t5")))
    with pytest.raises(CheckpointError, match="'t5' model, not DINOv2"):
        load_dinov2(folder)


def test_head_count_is_needed_for_narrow_models():
    with pytest.raises(CheckpointError, match="pass num_heads"):
        load_dinov2(HUB / "dinov2_vit48d4h3_pretrain.pth")
