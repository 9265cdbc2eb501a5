"""Benchmarks: SCAR's cost claims, measured side by side in one run and printed as ratios.

    python bench.py                                                    # the toy sizes, on this machine
    python bench.py --model GPT-XL --feature-dim 768 --grid 32 --batch 4 --device cuda --precision bf16

prefix  one training step (forward + backward) of next-token SCAR at k = 1, 2, 4 (1x, 4x and 16x fewer
        prefix tokens P_s): time and, on CUDA, peak memory, each relative to k = 1. The paper (Fig. 1c,
        LlamaGen-XL at 512 px, with the optimiser): 4x compression takes 23.9 % less GPU memory and
        trains 1.42x faster than 1x.
decode  sampling grid^2 target tokens Z_t (k = 2, CFG) with the KV cache, against recomputing the
        whole sequence at every step; both must give the same tokens.
compile the same sampling with each decode step compiled (generate_tokens(compile=True)) against the eager
        cached one: tokens/s of each (compilation excluded, its time reported apart) and whether the
        tokens are the same. GPT-B at 256 and 1024 tokens, CFG 4 as LlamaGen's class-conditional models:
        --model GPT-B --feature-dim 768 --vocab 16384 --grid 16 (or 32) --cfg 4 --batch 1

paper   (--paper) the whole SCAR training step (compressor, U_k, P_t path, backbone, losses, AdamW step) at
        LlamaGen's GPT-XL width (1280, 20 heads, 16 384 codes, 120 T5 caption slots), DINOv2-B's 32 x 32 x 768
        features and 1024 target tokens, for k = 1, 2, 4 (released and lean U_k) and EditAR's layout (the
        source's 1024 codes as the prefix, L_distill): timed at --depths layers and extrapolated to the full
        depth as fixed cost + depth x per-layer cost; memory counted, not sampled: weights, gradients and
        AdamW's moments (float32) plus the tensors autograd keeps for backward at a per-GPU batch of
        --memory-batch (counted at 1 and 2 images, linear in the batch); FLOPs counted (FlopCounterMode);
        SCAR's own cost (compressor on F_s and F_t, U_k and L_pres, W, their AdamW step) timed apart; on
        CUDA also max_memory_allocated. The paper (Fig. 1c, 8 GPUs, batch 64): k = 2 trains 1.42x faster
        than k = 1 with 23.9 % less memory. Then the per-rank memory of FSDP against DDP over --gpus
        processes for GPT-XXL-size layers, extrapolated the same way.

Random features, codes and words stand in for DINOv2, the tokenizer and the instruction: only the
shapes matter for cost. Absolute times depend on the machine and its load; the ratios compare rows
of the same run.
"""
import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from data import toy_vocabulary
from model import GPT_SIZES, SCAR, NextTokenTransformer, SCARConfig, gpt_config
from sample import generate_tokens

KS = (1, 2, 4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=["prefix", "decode", "compile", "all"], default="all", help="which benchmark to run")
    p.add_argument("--model", choices=list(GPT_SIZES), help="next-token backbone size (default toy; --paper: GPT-XL)")
    p.add_argument("--feature-dim", type=int, help="C of the DINOv2 features (default 128; --paper: 768, ViT-B)")
    p.add_argument("--grid", type=int, help="side of F_s and of the target grid, a multiple of 4 (default 8; --paper: 32)")
    p.add_argument("--text-len", type=int, help="text slots T_t: toy words (default 16), or --paper T5 captions (120)")
    p.add_argument("--vocab", type=int, help="codebook size (default 1024; --paper: 16384, LlamaGen's)")
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--iters", type=int, default=5, help="timed repetitions (the mean is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    p.add_argument("--cfg", type=float, default=3.0, help="guidance scale of the decode benchmarks")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 autocast or fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--paper", action="store_true", help="the training step at the paper's geometry (GPT-XL width, "
                   "1024 DINOv2 and target tokens) instead of --what; times at --batch images")
    p.add_argument("--depths", type=int, nargs=2, default=(1, 3), help="--paper: the two depths measured")
    p.add_argument("--full-depth", type=int, default=36, help="--paper: the depth extrapolated to (GPT-XL: 36)")
    p.add_argument("--memory-batch", type=int, default=8, help="--paper: per-GPU batch of the memory count")
    p.add_argument("--gpus", type=int, default=8, help="--paper: processes FSDP shards over")
    args = p.parse_args(argv)
    for flag, toy, paper in (("model", "toy", "GPT-XL"), ("feature_dim", 128, 768), ("grid", 8, 32), ("text_len", 16, 120),
                             ("vocab", 1024, 16384)):
        if getattr(args, flag) is None:
            setattr(args, flag, paper if args.paper else toy)
    if args.grid % max(KS):
        p.error(f"--grid {args.grid}: must be a multiple of {max(KS)} (the largest k)")
    return args


def scar(args, k: int) -> SCAR:
    backbone = NextTokenTransformer(gpt_config(args.model, cond="words", words=toy_vocabulary(), text_len=args.text_len,
                                               vocab_size=args.vocab))
    return SCAR(SCARConfig(feature_dim=args.feature_dim, feature_grid=args.grid, k=k), backbone).to(args.device)


def inputs(args):
    """F_s, F_t (B, g, g, C), word ids and mask (B, T), codes Z_t (B, g^2)."""
    g, B, dev = torch.Generator().manual_seed(0), args.batch, args.device
    F_s, F_t = (torch.randn(B, args.grid, args.grid, args.feature_dim, generator=g).to(dev) for _ in range(2))
    text = torch.randint(len(toy_vocabulary()), (B, args.text_len), generator=g).to(dev)
    codes = torch.randint(args.vocab, (B, args.grid ** 2), generator=g).to(dev)
    return F_s, F_t, text, torch.ones(B, args.text_len, dtype=torch.bool, device=dev), codes


def autocast(args):
    return torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=args.precision == "bf16")


def timed(fn, args) -> tuple[float, float | None]:
    """Mean seconds per call, and peak GiB allocated during the timed calls (CUDA only)."""
    cuda = torch.device(args.device).type == "cuda"
    for _ in range(args.warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.iters):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / args.iters, torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None


def bench_prefix(args) -> list[dict]:
    F_s, F_t, text, mask, codes = inputs(args)
    rows = []
    for k in KS:
        model = scar(args, k).train()

        def step():
            with autocast(args):
                loss = model(F_s, F_t, text, codes, mask)["loss"]
            loss.backward()
            model.zero_grad(set_to_none=True)

        seconds, peak = timed(step, args)
        with torch.no_grad():
            n_image = model.prefix((F_s, text), mask).n_image  # what the model built, not (grid / k)^2 assumed
        rows.append({"bench": "prefix", "k": k, "prefix_tokens": n_image, "step_s": round(seconds, 4),
                     "peak_gib": None if peak is None else round(peak, 3)})
        del model
    for row in rows:
        row["time_vs_k1"] = round(row["step_s"] / rows[0]["step_s"], 3)
        row["memory_vs_k1"] = None if row["peak_gib"] is None else round(row["peak_gib"] / rows[0]["peak_gib"], 3)
    return rows


def sampler(args):
    """generate_tokens of the k = 2 model on fixed inputs: run(**flags) -> (B, grid^2) tokens, the same seed each call."""
    F_s, _, text, mask, _ = inputs(args)
    model = scar(args, 2).eval()

    @torch.no_grad()
    def run(**flags):
        with autocast(args):
            return generate_tokens(model, (F_s, text), args.grid ** 2, mask, cfg=args.cfg,
                                   generator=torch.Generator(args.device).manual_seed(0), **flags)
    return run


def bench_decode(args) -> list[dict]:
    run = sampler(args)
    cached, recomputed = (timed(lambda: run(use_cache=c), args)[0] for c in (True, False))
    return [{"bench": "decode", "tokens": args.grid ** 2, "cached_s": round(cached, 4), "recomputed_s": round(recomputed, 4),
             "speedup": round(recomputed / cached, 2), "same_tokens": torch.equal(run(), run(use_cache=False))}]


def bench_compile(args) -> list[dict]:
    run = sampler(args)
    start = time.perf_counter()
    compiled_tokens = run(compile=True)  # compiles
    first = time.perf_counter() - start
    eager, compiled = (timed(lambda: run(compile=c), args)[0] for c in (False, True))
    n = args.batch * args.grid ** 2
    return [{"bench": "compile", "tokens": args.grid ** 2, "batch": args.batch, "cfg": args.cfg,
             "eager_tokens_per_s": round(n / eager, 1), "compiled_tokens_per_s": round(n / compiled, 1),
             "speedup": round(eager / compiled, 2), "first_compiled_call_s": round(first, 1),
             "same_tokens": torch.equal(run(), compiled_tokens)}]


# --------------------------------------------------------------- the paper's geometry

PAPER_LAYOUTS = {"k=1": dict(k=1), "k=2": dict(k=2), "k=4": dict(k=4), "k=2 lean U_k": dict(k=2, pres_head="lean"),
                 "k=4 lean U_k": dict(k=4, pres_head="lean"), "EditAR": dict(k=1, prefix="vq", distill=0.5)}
# FlopCounterMode knows the CUDA attention kernels but not the CPU one (it counts 0): the same dense formulas.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *_, out_shape=None, **__: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *_, out_shape=None, **__: sdpa_backward_flop_count(grad, q, k, v),
}
PAPER_K2 = {"time_vs_k1": round(1 / 1.42, 3), "memory_vs_k1": 1 - 0.239}  # Fig. 1c: 1.42x faster, 23.9 % less


def paper_scar(args, layout: str, depth: int, size=None) -> SCAR:
    """A caption-conditioned (T5 features) backbone of `depth` blocks with SCAR in `layout`."""
    cfg = replace(gpt_config(size or args.model, vocab_size=args.vocab, text_len=args.text_len), n_layer=depth)
    backbone = NextTokenTransformer(cfg)
    scar_cfg = SCARConfig(feature_dim=args.feature_dim, feature_grid=args.grid, **PAPER_LAYOUTS[layout])
    return SCAR(scar_cfg, backbone).to(args.device)


def paper_batch(args, layout: str, B: int) -> dict:
    """F_s (EditAR: the source's codes), F_t, T5 caption features (every slot used) and Z_t for B images."""
    g, side = torch.Generator().manual_seed(0), args.grid
    F_t = torch.randn(B, side, side, args.feature_dim, generator=g)
    F_s = torch.randint(args.vocab, (B, side, side), generator=g) if layout == "EditAR" else torch.randn(F_t.shape, generator=g)
    caption = torch.randn(B, args.text_len, 2048, generator=g)
    codes = torch.randint(args.vocab, (B, side * side), generator=g)
    return {k: v.to(args.device) for k, v in dict(F_s=F_s, F_t=F_t, text=caption, codes=codes).items()}


def saved_bytes(model, batch) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward, each storage counted once."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return sum(storages.values())


def measure_layout(args, layout: str, depth: int) -> dict:
    """One layout at one depth: step seconds, counted GiB at --memory-batch, FLOPs of a batch-1 step, own cost."""
    model = paper_scar(args, layout, depth).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = paper_batch(args, layout, args.batch)

    def step():
        with autocast(args):
            loss = model(**batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds, peak = timed(step, args)
    static = 16 * sum(p.numel() for p in model.parameters())  # fp32 weights, gradients, AdamW's two moments
    with autocast(args):
        one, two = (saved_bytes(model, paper_batch(args, layout, n)) for n in (1, 2))
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as flops:
        with autocast(args):
            model(**paper_batch(args, layout, 1))["loss"].backward()
    model.zero_grad(set_to_none=True)
    row = {"step_s": seconds, "memory_gib": (static + one + (args.memory_batch - 1) * (two - one)) / 2 ** 30,
           "gflop": flops.get_total_flops() / 1e9, "peak_gib": peak}
    if layout != "EditAR":
        row["own_s"] = timed(own_step(model, batch, args), args)[0]
    return row


def own_step(model, batch, args):
    """SCAR's own work in a step, as a function: the compressor on F_s and F_t, U_k and L_pres, W on both, and
    their AdamW step."""
    opt = torch.optim.AdamW([*model.compressor.parameters(), *model.proj.parameters()], lr=1e-4)

    def step():
        with autocast(args):
            F_c = model.compressor(batch["F_s"])
            P_s, P_t = model.proj(F_c.flatten(1, 2)), model.proj(model.compressor(batch["F_t"]).flatten(1, 2))
            loss = model.compressor.pres_loss(batch["F_s"], F_c) + P_s.square().mean() + P_t.square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def extrapolate(a: float, b: float, depths, depth: int) -> tuple[float, float, float]:
    """(fixed, per layer, at `depth`) from the values a, b at the two measured depths."""
    per_layer = (b - a) / (depths[1] - depths[0])
    fixed = a - depths[0] * per_layer
    return fixed, per_layer, fixed + depth * per_layer


def bench_paper(args) -> list[dict]:
    # Each measurement in a fresh process: the CPU allocator keeps the memory a measurement freed, and a dozen of
    # them at XL width added up past this machine's 24 GiB.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        measured = {(layout, d): pool.submit(measure_layout, args, layout, d) for layout in PAPER_LAYOUTS for d in args.depths}
        measured = {key: future.result() for key, future in measured.items()}
    rows = []
    for layout in PAPER_LAYOUTS:
        at = [measured[layout, d] for d in args.depths]
        row = {"bench": "paper", "layout": layout, "depth": args.full_depth}
        for key in ("step_s", "memory_gib", "gflop"):
            fixed, per_layer, full = extrapolate(at[0][key], at[1][key], args.depths, args.full_depth)
            row.update({f"{key}_fixed": round(fixed, 3), f"{key}_per_layer": round(per_layer, 4), key: round(full, 3)})
        row["step_s_2_layers"] = round(extrapolate(at[0]["step_s"], at[1]["step_s"], args.depths, 2)[2], 3)
        if "own_s" in at[0]:
            row["own_s"] = round(at[0]["own_s"], 3)
            row["own_share_pct"] = round(100 * at[0]["own_s"] / row["step_s"], 2)
        if at[0]["peak_gib"] is not None:
            row["peak_gib_per_layer"] = round(at[1]["peak_gib"] - at[0]["peak_gib"], 3)
        rows.append(row)
    for row in rows:
        for key in ("step_s", "memory_gib", "gflop"):
            row[f"{key}_vs_k1"] = round(row[key] / rows[0][key], 3)
    rows[1]["paper_vs_k1"] = PAPER_K2
    return rows + fsdp_memory(args)


def fsdp_memory(args) -> list[dict]:
    """Per-rank memory at GPT-XXL's size (k = 2), counted at --depths and extrapolated to its 48 layers: DDP keeps
    every weight, gradient and moment on each rank; FSDP a 1/N shard of them plus the gathered weights of the
    unit that runs and of the next one (prefetched). Activations are the same in both."""
    depth, at = 48, []
    for d in args.depths:
        model = paper_scar(args, "k=2", d, "GPT-XXL").train()
        params = sum(p.numel() for p in model.parameters())
        block = sum(p.numel() for p in model.backbone.layers[0].parameters())
        with autocast(args):
            one, two = (saved_bytes(model, paper_batch(args, "k=2", n)) for n in (1, 2))
        at.append((params, one + (args.memory_batch - 1) * (two - one)))
    params = extrapolate(at[0][0], at[1][0], args.depths, depth)[2]
    activations = extrapolate(at[0][1], at[1][1], args.depths, depth)[2]
    ddp = (16 * params + activations) / 2 ** 30
    fsdp = (16 * params / args.gpus + 2 * 4 * block + activations) / 2 ** 30
    return [{"bench": "fsdp", "model": "GPT-XXL", "depth": depth, "gpus": args.gpus, "memory_batch": args.memory_batch,
             "params_m": round(params / 1e6, 1), "activations_gib": round(activations / 2 ** 30, 2),
             "ddp_gib_per_rank": round(ddp, 2), "fsdp_gib_per_rank": round(fsdp, 2), "fsdp_vs_ddp": round(fsdp / ddp, 3)}]


def markdown(rows: list[dict]) -> str:
    lines = ["| layout | step (s) | vs k = 1 | memory (GiB) | vs k = 1 | GFLOP | vs k = 1 | fixed (s) | per layer (s) | "
             "2 layers (s) | SCAR's own (s, % of step) |", "|" + "---|" * 11]
    for r in rows:
        if r["bench"] == "paper":
            own = f"{r['own_s']} ({r['own_share_pct']} %)" if "own_s" in r else "-"
            lines.append(f"| {r['layout']} | {r['step_s']} | {r['step_s_vs_k1']} | {r['memory_gib']:.1f} | "
                         f"{r['memory_gib_vs_k1']} | {r['gflop']:.1f} | {r['gflop_vs_k1']} | {r['step_s_fixed']} | "
                         f"{r['step_s_per_layer']} | {r['step_s_2_layers']} | {own} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    print(f"# {args.model}, C={args.feature_dim}, grid {args.grid}, batch {args.batch}, {args.precision} on {args.device}",
          file=sys.stderr)
    if args.paper:
        rows = bench_paper(args)
        print(markdown(rows), file=sys.stderr)
    else:
        benches = {"prefix": bench_prefix, "decode": bench_decode, "compile": bench_compile}
        rows = [row for name, bench in benches.items() if args.what in (name, "all") for row in bench(args)]
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
