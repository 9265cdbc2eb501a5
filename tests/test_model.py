"""Next-token backbone and SCAR: LlamaGen parity, the mask, the KV cache, the losses."""
import pytest
import torch
from torch.nn.attention.flex_attention import create_mask
from conftest import FIXTURES, assert_flex_matches_sdpa
from safetensors.torch import load_file

import model as model_module
from checkpoint import CheckpointError
from compressor import SemanticCompressor
from model import (SCAR, GPTConfig, NextTokenTransformer, SCARConfig, apply_rope, attention_mask, encode_words,
                   gpt_config, grid_rope, llamagen_from_state_dict, load_llamagen, vocabulary)
from sample import generate_tokens

C2I, T2I = FIXTURES / "llamagen_gpt_c2i", FIXTURES / "llamagen_gpt_t2i"
LOGIT_TOL = dict(atol=1e-4, rtol=1e-4)  # the fixture READMEs' tolerance


@pytest.fixture(scope="module")
def c2i():
    return load_llamagen(C2I / "checkpoint.pt", n_head=4), load_file(C2I / "reference.safetensors")


@pytest.fixture(scope="module")
def t2i():
    return load_llamagen(T2I / "checkpoint.pt", n_head=4), load_file(T2I / "reference.safetensors")


def test_c2i_teacher_forced_logits(c2i):
    model, ref = c2i
    with torch.no_grad():
        torch.testing.assert_close(model(ref["class_labels"], ref["tokens"]), ref["logits_cond"], **LOGIT_TOL)
        null = torch.full_like(ref["class_labels"], model.cfg.num_classes)
        torch.testing.assert_close(model(null, ref["tokens"]), ref["logits_uncond"], **LOGIT_TOL)
    rope = torch.cat([torch.zeros(1, 8, 2), grid_rope(8, 8, 16, 10000.0)])  # class row zero, then the 8x8 grid
    torch.testing.assert_close(rope, ref["freqs_cis"], atol=1e-6, rtol=0)


def test_t2i_teacher_forced_logits(t2i):
    model, ref = t2i
    with torch.no_grad():
        got = model(ref["caption_embs"], ref["tokens"], ref["emb_mask"])
        torch.testing.assert_close(got, ref["logits_cond"], **LOGIT_TOL)
        null = torch.zeros_like(ref["caption_embs"]) + model.cls_embedding.uncond_embedding
        torch.testing.assert_close(model(null, ref["tokens"], ref["emb_mask"]), ref["logits_uncond"], **LOGIT_TOL)
    rope = torch.cat([torch.zeros(120, 8, 2), grid_rope(8, 8, 16, 10000.0)])
    torch.testing.assert_close(rope, ref["freqs_cis"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "recompute"])
@pytest.mark.parametrize("kind, cfg, key", [("c2i", 1.0, "gen_cfg1"), ("c2i", 4.0, "gen_cfg4"),
                                            ("t2i", 1.0, "gen_cfg1"), ("t2i", 7.5, "gen_cfg7p5")])
def test_greedy_generation_reproduces_official_grids(c2i, t2i, kind, cfg, key, use_cache):
    model, ref = c2i if kind == "c2i" else t2i
    cond, mask = (ref["class_labels"], None) if kind == "c2i" else (ref["caption_embs"], ref["emb_mask"])
    tokens = generate_tokens(model, cond, 64, cond_mask=mask, cfg=cfg, top_k=1, use_cache=use_cache)
    assert tokens.dtype == torch.int64 and torch.equal(tokens, ref[key].long())
    assert all(layer.attention.cache is None for layer in model.layers)


def official_layout(dim, n_layer, vocab, cond, heads=None, n_kv=None):
    """Key -> shape of a released LlamaGen GPT, written from the fixture README's state-dict table."""
    head_dim = dim // (heads or dim // 64)
    hidden = {768: 2048, 1024: 2816, 1280: 3584, 1536: 4096}[dim]
    qkv = ((heads or dim // 64) + 2 * (n_kv or heads or dim // 64)) * head_dim
    keys = {"cls_embedding.embedding_table.weight": (1001, dim)} if cond == "class" else {
        "cls_embedding.uncond_embedding": (120, 2048), "cls_embedding.cap_proj.fc1.weight": (dim, 2048),
        "cls_embedding.cap_proj.fc2.weight": (dim, dim)}
    keys["tok_embeddings.weight"] = (vocab, dim)
    for i in range(n_layer):
        keys.update({f"layers.{i}.attention.wqkv.weight": (qkv, dim), f"layers.{i}.attention.wo.weight": (dim, dim),
                     f"layers.{i}.feed_forward.w1.weight": (hidden, dim), f"layers.{i}.feed_forward.w3.weight": (hidden, dim),
                     f"layers.{i}.feed_forward.w2.weight": (dim, hidden), f"layers.{i}.attention_norm.weight": (dim,),
                     f"layers.{i}.ffn_norm.weight": (dim,)})
    keys.update({"norm.weight": (dim,), "output.weight": (vocab, dim)})
    return {k: torch.empty(s, device="meta") for k, s in keys.items()}


@pytest.mark.parametrize("name, cond", [("GPT-B", "class"), ("GPT-L", "class"), ("GPT-XL", "class"),
                                        ("GPT-XXL", "class"), ("GPT-XL", "caption")])
def test_full_size_layouts_load(name, cond):
    expected = gpt_config(name, cond=cond, num_classes=1000, text_len=1 if cond == "class" else 120)
    sd = official_layout(expected.dim, expected.n_layer, 16384, cond)
    model = llamagen_from_state_dict(sd)
    assert model.cfg == expected


def test_grouped_query_layout_is_inferred():
    model = llamagen_from_state_dict(official_layout(1024, 2, 16384, "class", heads=16, n_kv=4))
    assert (model.cfg.n_head, model.cfg.n_kv_head) == (16, 4)


def test_stray_freqs_cis_and_training_container(tmp_path):
    sd = torch.load(C2I / "checkpoint.pt", weights_only=True)["model"]
    torch.save({"model": dict(sd, freqs_cis=torch.zeros(65, 8, 2)), "steps": 5}, tmp_path / "c2i.pt")
    assert load_llamagen(tmp_path / "c2i.pt", n_head=4).cfg.num_classes == 10


def test_foreign_checkpoint_is_refused():
    with pytest.raises(CheckpointError, match="LlamaGen GPT layout: missing keys tok_embeddings"):
        load_llamagen(FIXTURES / "llamagen_vq" / "checkpoint.pt")


def test_mask_pattern_of_the_docstring():
    text_valid = torch.tensor([[False, True], [True, True]])
    expected_padded = torch.tensor([
        [1, 1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 1, 0, 0],
        [1, 1, 0, 1, 1, 1, 0],
        [1, 1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    expected_full = torch.tensor([
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = attention_mask(2, text_valid, 3)
    assert mask.shape == (2, 1, 7, 7)
    assert torch.equal(mask[0, 0], expected_padded) and torch.equal(mask[1, 0], expected_full)
    causal = attention_mask(2, text_valid, 3, causal=True)
    expected_causal = torch.tril(torch.ones(7, 7, dtype=torch.bool))
    expected_causal[:, 2] = False
    expected_causal[2, 2] = True
    assert torch.equal(causal[0, 0], expected_causal)
    assert torch.equal(causal[1, 0], torch.tril(torch.ones(7, 7, dtype=torch.bool)))


def test_plain_causal_pattern_takes_sdpas_causal_path_with_the_same_result(monkeypatch):
    """No padded text and the causal flag: no dense (L x L) mask, SDPA's is_causal instead; a class-conditional
    model's hidden states and its KV-cache decoding (whose steps then need no mask) equal the dense mask's."""
    assert attention_mask(2, torch.ones(2, 2, dtype=torch.bool), 3, causal=True) == model_module.CAUSAL
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 7, 8, generator=g) for _ in range(3))
    dense = torch.tril(torch.ones(7, 7, dtype=torch.bool))
    assert torch.allclose(model_module.attend(q, k, v, model_module.CAUSAL), model_module.attend(q, k, v, dense), atol=1e-6)

    torch.manual_seed(0)
    gpt = NextTokenTransformer(GPTConfig(dim=32, n_layer=2, n_head=2, ffn_hidden=64, vocab_size=16, cond="class",
                                         num_classes=4, block_size=16)).eval()
    labels, tokens = torch.tensor([1, 3]), torch.randint(0, 16, (2, 16))
    prefix = gpt.prefix(labels)
    fast = gpt.hidden(prefix, tokens)
    original = model_module.attention_mask

    def dense_mask(n_image, text_valid, target_blocks, causal=False, flex=False):
        padded = torch.cat([text_valid, torch.zeros_like(text_valid[:, :1])], 1)  # one padded slot: the dense path
        full = original(n_image, padded, target_blocks, causal, flex)
        keep = [i for i in range(full.shape[-1]) if i != n_image + text_valid.shape[1]]
        return full[:, :, keep][:, :, :, keep]
    monkeypatch.setattr(model_module, "attention_mask", dense_mask)
    assert torch.allclose(fast, gpt.hidden(prefix, tokens), atol=1e-5)
    monkeypatch.undo()
    runs = [generate_tokens(gpt, labels, 16, cfg=1.0, generator=torch.Generator().manual_seed(0), use_cache=c)
            for c in (True, False)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("causal", [False, True])
def test_flex_block_mask_has_the_dense_pattern(causal):
    text_valid = torch.tensor([[False, True], [True, True]])
    block = attention_mask(2, text_valid, 3, causal, flex=True)
    assert torch.equal(create_mask(block.mask_mod, 2, 1, 7, 7), attention_mask(2, text_valid, 3, causal))


def test_flex_attention_path_equals_sdpa(monkeypatch):  # grouped-query heads, the second text padded
    model = tiny_scar()
    nn_init_output(model)
    b = batch()
    assert_flex_matches_sdpa(monkeypatch, model, model.prefix((b["F_s"], b["text"]), b["text_mask"]), b["codes"], b)


def test_mask_of_the_official_t2i_prefix(t2i):
    """No image prefix + causal flag = LlamaGen's t2i mask (tril, padded caption keys off, diagonal on)."""
    _, ref = t2i
    valid = ref["emb_mask"].bool()
    mask = attention_mask(0, valid, 63, causal=True)
    for b in range(2):
        m = torch.tril(torch.ones(183, 183))
        m[:, :120] *= valid[b]
        m = m * (1 - torch.eye(183)) + torch.eye(183)
        assert torch.equal(mask[b, 0], m.bool())


WORDS = vocabulary(["make it blue", "remove", "paint it red", "add a disc"])


def tiny_scar(causal=False, stop_grad=False, k=2, vocab=64, n_kv=2, dropout=0.0, pres_weight=1.0, text_rope="zero",
              prefix="semantic", pres_head="released"):
    torch.manual_seed(0)
    backbone = NextTokenTransformer(GPTConfig(dim=64, n_layer=2, n_head=4, n_kv_head=n_kv, ffn_hidden=128,
                                              vocab_size=vocab, cond="words", words=WORDS, text_len=12, dropout=dropout,
                                              text_rope=text_rope))
    cfg = SCARConfig(feature_dim=16, k=k, causal=causal, stop_grad_target=stop_grad, pres_weight=pres_weight, prefix=prefix,
                     pres_head=pres_head)
    return SCAR(cfg, backbone)


def batch(B=2, seed=0, vocab=64):
    g = torch.Generator().manual_seed(seed)
    ids, mask = encode_words(["make it blue", "remove"][:B] * (B // 2 or 1), WORDS, 12)
    return dict(F_s=torch.randn(B, 4, 4, 16, generator=g), F_t=torch.randn(B, 4, 4, 16, generator=g),
                text=ids, text_mask=mask, codes=torch.randint(0, vocab, (B, 16), generator=g))


@pytest.mark.parametrize("kind", ["semantic", "vq"])
def test_kv_cache_decoding_equals_full_recomputation_with_scar_prefix_and_cfg(kind):
    """SCAR's prefix, and the EditAR baseline's (the source's codes, embedded by the backbone)."""
    model = tiny_scar(prefix=kind).eval()
    nn_init_output(model)
    b = batch()
    source = b["F_s"] if kind == "semantic" else b["codes"].view(2, 4, 4)
    cond = (source, b["text"])
    with torch.no_grad():
        prefix = model.prefix(cond, b["text_mask"])
        null = model.prefix(cond, b["text_mask"], drop_text=torch.ones(2, dtype=torch.bool))
        prefix = prefix.cat(null)  # CFG-doubled batch: [cond ; uncond]
        codes = b["codes"].repeat(2, 1)
        full = model.backbone.logits(prefix, codes)  # (4, 16, V)
        steps = [model.backbone.prefill(prefix, 16)]
        steps += [model.backbone.decode(codes[:, i], i) for i in range(15)]
        model.backbone.reset_cache()
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=0)
    assert not torch.allclose(full[:2], full[2:], atol=1e-3)  # the two halves really differ


def nn_init_output(model):  # the zero-initialised head would make every logit equal
    torch.nn.init.normal_(model.backbone.output.weight, std=0.5)
    return model


def test_sampled_generation_is_reproducible_and_cache_independent():
    model = tiny_scar().eval()
    nn_init_output(model)
    b = batch()
    cond = (b["F_s"], b["text"])
    runs = [generate_tokens(model, cond, 16, b["text_mask"], cfg=3.0, top_k=20, top_p=0.9, temperature=1.2,
                            generator=torch.Generator().manual_seed(7), use_cache=c) for c in (True, False, True)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    assert runs[0].shape == (2, 16) and runs[0].unique().numel() > 3


def test_dropout_acts_while_training_only():
    plain, dropped = (nn_init_output(tiny_scar(dropout=p)) for p in (0.0, 0.3))  # the same weights
    b = batch()
    logits = lambda m: m.backbone.logits(m.prefix((b["F_s"], b["text"]), b["text_mask"]), b["codes"])
    with torch.no_grad():
        reference = logits(plain.eval())
        torch.testing.assert_close(logits(dropped.eval()), reference, atol=0, rtol=0)
        first, second = logits(dropped.train()), logits(dropped)
    assert not torch.allclose(first, second, atol=1e-3) and not torch.allclose(first, reference, atol=1e-3)


def test_tiny_scar_overfits_a_small_batch():
    model = tiny_scar()
    model.cfg.drop_text = model.cfg.drop_image = model.cfg.drop_both = 0.0
    b = batch(B=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        losses = model(**b)
        first = first or {k: v.item() for k, v in losses.items()}
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert losses["ce"].item() < 0.05 * first["ce"]
    assert losses["loss"].item() < 0.1 * first["loss"]
    assert losses["pres"].item() < first["pres"] and losses["align"].item() < first["align"]


@pytest.mark.parametrize("stop_grad", [False, True])
def test_align_loss_reaches_the_target_path_unless_stopped(stop_grad):
    model = tiny_scar(stop_grad=stop_grad).eval()
    b = batch()
    b["F_t"].requires_grad_(True)
    model(**b)["align"].backward()
    reached = b["F_t"].grad is not None and b["F_t"].grad.abs().sum() > 0
    assert reached != stop_grad
    assert model.compressor.conv.weight.grad.abs().sum() > 0  # the source path always trains it


@pytest.mark.parametrize("causal", [False, True])
def test_prefix_hidden_states_see_the_text_only_with_the_papers_mask(causal):
    model = tiny_scar(causal=causal).eval()
    b = batch()
    other, other_mask = encode_words(["paint it red", "add a disc"], WORDS, 12)
    with torch.no_grad():
        H = [model.backbone.hidden(model.prefix((b["F_s"], t), m), b["codes"])[:, :4]
             for t, m in ((b["text"], b["text_mask"]), (other, other_mask))]
    assert torch.allclose(H[0], H[1]) == causal


def test_pres_is_zero_without_compression_and_shapes_of_every_variant():
    F_s = torch.randn(2, 8, 8, 16)
    identity = SemanticCompressor(16, 1)
    assert torch.equal(identity(F_s), F_s) and identity.pres_loss(F_s, identity(F_s)) == 0
    assert not list(identity.parameters())
    for kind in ("conv+resize", "resize", "unshuffle"):
        for k in (2, 4):
            comp = SemanticCompressor(16, k, kind)
            F_c = comp(F_s)
            assert F_c.shape == (2, 8 // k, 8 // k, 16)
            assert comp.pres_loss(F_s, F_c) > 0
    model = tiny_scar(k=1)
    assert model(**batch())["pres"] == 0
    with pytest.raises(ValueError, match="divisible"):
        SemanticCompressor(16, 4)(torch.randn(1, 6, 6, 16))


def test_pres_weight_zero_builds_no_reconstruction_head():
    """Table 4's "w/o L_pres": no U_k parameters, pres = 0, and the loss is L_CE + delta L_align alone."""
    with_pres, without = tiny_scar(), tiny_scar(pres_weight=0.0)
    assert not hasattr(without.compressor, "up") and hasattr(with_pres.compressor, "up")
    params = lambda m: sum(p.numel() for p in m.parameters())
    assert params(with_pres) - params(without) == sum(p.numel() for p in with_pres.compressor.up.parameters()) > 0
    losses = without(**batch())
    assert losses["pres"] == 0
    torch.testing.assert_close(losses["loss"], losses["ce"] + 0.5 * losses["align"])
    half = tiny_scar(pres_weight=0.5)(**batch())
    torch.testing.assert_close(half["loss"], half["ce"] + 0.5 * half["pres"] + 0.5 * half["align"])


@pytest.mark.parametrize("k", [2, 4])
def test_lean_reconstruction_head_rebuilds_the_grid_with_far_fewer_parameters(k):
    """U_k "lean" (1x1 conv and pixel shuffle per 2x) against the released 3x3 head: the same output grid, a
    fraction of the parameters at DINOv2-L's width, and L_pres that training lowers."""
    params = lambda head: sum(p.numel() for p in SemanticCompressor(1024, k, head=head).up.parameters())
    assert params("lean") < params("released") / 10
    torch.manual_seed(0)
    comp = SemanticCompressor(16, k, head="lean")
    F_s = torch.randn(4, 8, 8, 16)
    assert comp.up(comp(F_s).permute(0, 3, 1, 2)).shape == (4, 16, 8, 8)
    opt = torch.optim.Adam(comp.parameters(), lr=1e-2)
    first = comp.pres_loss(F_s, comp(F_s)).item()
    for _ in range(30):
        opt.zero_grad()
        comp.pres_loss(F_s, comp(F_s)).backward()
        opt.step()
    assert comp.pres_loss(F_s, comp(F_s)).item() < 0.8 * first
    assert tiny_scar(pres_head="lean")(**batch())["pres"] > 0
    with pytest.raises(ValueError, match="reconstruction head"):
        SemanticCompressor(16, 2, head="big")


def text_key_logits(model, text, mask):  # first block's attention logits (B, heads, prefix, text keys), pre-mask
    backbone = model.backbone
    with torch.no_grad():
        prefix = model.prefix((torch.randn(text.shape[0], 4, 4, 16, generator=torch.Generator().manual_seed(1)), text), mask)
        attention = backbone.layers[0].attention
        x = backbone.layers[0].attention_norm(prefix.h)
        B, S, D = x.shape
        kv = attention.n_kv_head * attention.head_dim
        q, k, _ = attention.wqkv(x).split([D, kv, kv], dim=-1)
        q = apply_rope(q.view(B, S, attention.n_head, -1), prefix.rope).transpose(1, 2)
        k = apply_rope(k.view(B, S, attention.n_kv_head, -1), prefix.rope).transpose(1, 2)
        k = k.repeat_interleave(attention.n_head // attention.n_kv_head, 1)
    return (q @ k.transpose(-1, -2))[..., prefix.n_image:]


def test_text_rope_identity_gives_text_keys_logits_that_depend_on_the_text():
    """LlamaGen's zero rows make every text key's q.k zero; identity rows leave the text's own keys."""
    ids, mask = encode_words(["make it blue", "paint it red"], WORDS, 12)
    zero = text_key_logits(tiny_scar(), ids, mask)
    assert torch.all(zero == 0)
    logits = text_key_logits(tiny_scar(text_rope="identity"), ids, mask)
    words = logits[..., -3:]  # the three words (left-padded)
    assert words.abs().min() > 0 and not torch.allclose(words[0], words[1])
    assert not torch.allclose(words[..., 0], words[..., 2])  # a query tells words apart
    with pytest.raises(ValueError, match="text_rope"):
        tiny_scar(text_rope="learned")


def test_cfg_dropout_rates():
    model = tiny_scar()
    torch.manual_seed(0)
    text, image = model.cfg_dropout(200_000, "cpu")
    rates = [(text & ~image).float().mean(), (image & ~text).float().mean(), (text & image).float().mean()]
    assert all(abs(r - 0.05) < 0.003 for r in rates)


def test_scar_from_official_backbone_reports_new_parameters(t2i):
    backbone, ref = t2i
    model = SCAR(SCARConfig(feature_dim=16), backbone)
    assert sorted(model.new_parameter_names()) == ["compressor.conv.bias", "compressor.conv.weight",
                                                   "compressor.up.0.bias", "compressor.up.0.weight",
                                                   "compressor.up.2.bias", "compressor.up.2.weight",
                                                   "null_prefix", "proj.weight"]
    F_s = torch.randn(2, 4, 4, 16)
    losses = model(F_s, F_s, ref["caption_embs"], ref["tokens"], ref["emb_mask"])
    assert set(losses) == {"ce", "pres", "align", "loss"} and torch.isfinite(losses["loss"])


def test_encode_words_pads_left_ignores_case_and_punctuation_refuses_unknown_and_long_text():
    assert WORDS == ("a", "add", "blue", "disc", "it", "make", "paint", "red", "remove")
    ids, mask = encode_words(["Paint it RED!", "remove.", "  "], WORDS, 4)
    assert ids.tolist() == [[0, 6, 4, 7], [0, 0, 0, 8], [0, 0, 0, 0]]
    assert mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="unknown word 'crimson'"):
        encode_words(["paint it crimson"], WORDS, 4)
    with pytest.raises(ValueError, match="at most 4"):
        encode_words(["add a red disc a"], WORDS, 4)
