"""Benchmarks: SCAR's cost claims, measured side by side in one run and printed as ratios.

    python bench.py                                                    # the toy sizes, on this machine
    python bench.py --model GPT-XL --feature-dim 768 --grid 32 --batch 4 --device cuda --precision bf16

prefix  one training step (forward + backward) of next-token SCAR at k = 1, 2, 4 (1x, 4x and 16x fewer
        prefix tokens P_s): time and, on CUDA, peak memory, each relative to k = 1. The paper (Fig. 1c,
        LlamaGen-XL at 512 px, with the optimiser): 4x compression takes 23.9 % less GPU memory and
        trains 1.42x faster than 1x.
decode  sampling grid^2 target tokens Z_t (k = 2, CFG) with the KV cache, against recomputing the
        whole sequence at every step; both must give the same tokens.

Random features, codes and words stand in for DINOv2, the tokenizer and the instruction: only the
shapes matter for cost. Absolute times depend on the machine and its load; the ratios compare rows
of the same run.
"""
import argparse
import json
import sys
import time

import torch

from data import toy_vocabulary
from model import GPT_SIZES, SCAR, NextTokenTransformer, SCARConfig, gpt_config
from sample import generate_tokens

KS = (1, 2, 4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=["prefix", "decode", "all"], default="all", help="which benchmark to run")
    p.add_argument("--model", default="toy", choices=list(GPT_SIZES), help="next-token backbone size")
    p.add_argument("--feature-dim", type=int, default=128, help="C of the DINOv2 features (768 for ViT-B)")
    p.add_argument("--grid", type=int, default=8, help="side of F_s and of the target grid (paper: 32); a multiple of 4")
    p.add_argument("--text-len", type=int, default=16, help="instruction slots T_t (words of the toy's vocabulary)")
    p.add_argument("--vocab", type=int, default=1024, help="codebook size (LlamaGen: 16384)")
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--iters", type=int, default=5, help="timed repetitions (the mean is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 autocast or fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
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


@torch.no_grad()
def bench_decode(args) -> list[dict]:
    F_s, _, text, mask, _ = inputs(args)
    model = scar(args, 2).eval()
    tokens = {}

    def run(cache: bool):
        with autocast(args):
            tokens[cache] = generate_tokens(model, (F_s, text), args.grid ** 2, mask, cfg=3.0, use_cache=cache,
                                            generator=torch.Generator(args.device).manual_seed(0))

    cached, recomputed = (timed(lambda: run(c), args)[0] for c in (True, False))
    return [{"bench": "decode", "tokens": args.grid ** 2, "cached_s": round(cached, 4), "recomputed_s": round(recomputed, 4),
             "speedup": round(recomputed / cached, 2), "same_tokens": torch.equal(tokens[True], tokens[False])}]


def main(argv=None):
    args = parse_args(argv)
    print(f"# {args.model}, C={args.feature_dim}, grid {args.grid}, batch {args.batch}, {args.precision} on {args.device}",
          file=sys.stderr)
    rows = (bench_prefix(args) if args.what in ("prefix", "all") else []) + \
        (bench_decode(args) if args.what in ("decode", "all") else [])
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
