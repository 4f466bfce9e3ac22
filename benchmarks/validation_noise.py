"""How noisy is val NLL, and what does validating cost? (README: "Validation: an estimate with its error")

Trains the former quickstart recipe's (benchmarks/recipe_d64.toml: d_model 64, BPE 1024) no-loop
baseline and one looped trial (layers 1-2 looped, S ~ U{1..3}) at the recipe's budget, timing the
trial and the validations inside it, then scores both models under ``--mask-seeds`` different mask
keys with

* ``old``: the estimator loopsearch used until 2026-12-01 (64 windows x a midpoint grid of 8 mask
  rates, one mask per (window, t), ELBO weight 1/t), kept here for the comparison;
* ``new``: ``loopsearch.diffusion.validation_elbo`` with the recipe's defaults.

For each it prints the spread over mask seeds of each model's val NLL (unpaired) and of the
difference between the two (paired: both scored on the same masks), beside the standard error
the new estimator reports, and the validation's share of the trial's wall time.

    python benchmarks/validation_noise.py --threads 2 --mask-seeds 12
"""

from __future__ import annotations

import argparse
from pathlib import Path
import json
import platform
import statistics
import time

import torch


@torch.no_grad()
def old_estimator(model, windows: torch.Tensor, mask_id: int, seed: int, n_t: int = 8, batch_size: int = 16) -> float:
    """The retired estimator: one generator over batches, midpoint t grid, 1/t weight."""
    from loopsearch.diffusion import elbo, mask_tokens, masked_nll

    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for x0 in windows.split(batch_size):
        for t in (torch.arange(n_t, dtype=torch.float32) + 0.5) / n_t:
            tt = t.expand(x0.shape[0])
            xt, masked = mask_tokens(x0, tt, mask_id, generator)
            out = model(xt, None, tt)
            total += elbo(masked_nll(out.logits, x0, masked, mask_id), tt).item() * x0.shape[0]
            count += x0.shape[0]
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(Path(__file__).resolve().parent / "recipe_d64.toml"))
    ap.add_argument("--mask-seeds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="training seed of both models")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from loopsearch import checkpoint
    from loopsearch.data import validation_windows
    from loopsearch.diffusion import validation_elbo
    from loopsearch.search import study as studies
    from loopsearch.search.space import BASELINE, Choice
    from loopsearch.stats import paired_window_interval
    from loopsearch.train import train

    spec = studies.spec_from_options("noise", "early_middle", args.recipe, None, None, args.seed, None, None)
    data = studies.Objective(spec, progress=False).data()
    looped = Choice(strategy="fixed", strategy_params={"n_loops": 3, "train_loops": "uniform"},
                    loop_start=1, loop_end=3)
    models, timing = {}, {}
    for name, choice in (("baseline", BASELINE), ("looped", looped)):
        cfg = studies.trial_config(spec, 0, choice)
        torch.manual_seed(cfg.seed)
        model = checkpoint.build_model(cfg, data.vocab_size)
        r = train(model, data, cfg.train, cfg.budget, cfg.seed, progress=False, eval_seed=cfg.mask_seed)
        model.eval()
        models[name] = model
        timing[name] = {"wall_s": r.wall_s, "eval_s": r.eval_s, "eval_share": r.eval_s / r.wall_s, "steps": r.steps,
                        "val_nll": r.val_nll, "val_nll_se": r.val_se}
        print(f"{name}: {r.steps} steps, val NLL {r.val_nll:.4f} ± {r.val_se:.4f}, trial {r.wall_s:.1f} s of which "
              f"validation {r.eval_s:.2f} s ({100 * r.eval_s / r.wall_s:.1f}%)", flush=True)

    t = spec.train
    mask_id = models["baseline"].backbone.mask_id
    old_windows, _ = validation_windows(data.valid, t.seq_len, 10 ** 9)
    old_windows = old_windows[:64]  # the old default: the first 64 windows
    windows, keys = validation_windows(data.valid, t.seq_len, t.eval_sequences)
    rows = {"old": {"baseline": [], "looped": []}, "new": {"baseline": [], "looped": []}}
    se, paired_se, old_s, new_s = {"baseline": [], "looped": []}, [], 0.0, 0.0
    for s in range(args.mask_seeds):
        vals = {}
        for name, model in models.items():
            began = time.perf_counter()
            rows["old"][name].append(old_estimator(model, old_windows, mask_id, seed=1000 + s))
            old_s += time.perf_counter() - began
            began = time.perf_counter()
            v = validation_elbo(model, windows, keys, mask_id, t.eval_draws, seed=1000 + s,
                                batch_size=t.eval_batch_size)
            new_s += time.perf_counter() - began
            rows["new"][name].append(v.nll)
            se[name].append(v.se)
            vals[name] = v.flat(12)
        paired_se.append(paired_window_interval(vals["baseline"], vals["looped"], t.eval_draws).se)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
           f"{args.threads} torch thread(s), torch {torch.__version__}", "recipe": args.recipe,
           "mask_seeds": args.mask_seeds, "windows": len(keys), "draws": t.eval_draws, "trials": timing}
    for est in ("old", "new"):
        diff = [b - a for a, b in zip(rows[est]["baseline"], rows[est]["looped"])]
        out[est] = {"sd_baseline": statistics.stdev(rows[est]["baseline"]),
                    "sd_looped": statistics.stdev(rows[est]["looped"]),
                    "sd_paired": statistics.stdev(diff), "mean_delta": statistics.fmean(diff),
                    "s_per_eval": (old_s if est == "old" else new_s) / (2 * args.mask_seeds)}
    out["new"].update(se_baseline=statistics.fmean(se["baseline"]), se_looped=statistics.fmean(se["looped"]),
                      se_paired=statistics.fmean(paired_se))
    for est in ("old", "new"):
        o = out[est]
        extra = "" if est == "old" else (f"; reported SE: baseline {o['se_baseline']:.4f}, looped "
                                         f"{o['se_looped']:.4f}, paired {o['se_paired']:.4f}")
        print(f"{est}: SD over {args.mask_seeds} mask seeds: baseline {o['sd_baseline']:.4f}, looped "
              f"{o['sd_looped']:.4f}, paired difference {o['sd_paired']:.4f} (mean {o['mean_delta']:+.4f}); "
              f"{o['s_per_eval']:.2f} s per validation{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
