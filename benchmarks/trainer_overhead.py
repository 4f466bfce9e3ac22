"""The trainer's overhead on a small model: ``loopsearch.train.train`` against a bare training loop.

Both train the former quickstart recipe's model (benchmarks/recipe_d64.toml: 6 layers, d_model 64,
4 heads, seq 64, batch 16, BPE 1024) with the same loss (``diffusion_loss``, the head at masked
positions), AdamW and gradient clipping. The bare loop has nothing else: no FLOP accounting,
progress, random streams, budget checks, finite-loss agreement or checkpoints. The trainer's time
per step is its wall time minus validation (``wall_s - eval_s``) over its steps. Runs alternate
(trainer, bare, trainer, bare, ...) so a change in machine load hits both; the medians are
compared. Issue 13 asks for an overhead of at most 10%.

    python benchmarks/trainer_overhead.py --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
from pathlib import Path
import statistics
import time

import torch

from loopsearch.checkpoint import build_model
from loopsearch.data import prepare, random_batch
from loopsearch.diffusion import diffusion_loss
from loopsearch.registry import get_registry
from loopsearch.search import study as studies
from loopsearch.spec import PluginRef, TrialConfig
from loopsearch.stats import mean_interval
from loopsearch.train import make_optimizer, train

RECIPE = Path(__file__).resolve().parent / "recipe_d64.toml"  # the former quickstart (published figures)


def bare_loop(model, train_ids, cfg, steps: int) -> float:
    """Seconds per step of the plainest loop over the same model and loss."""
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(0)
    mask_id = model.backbone.mask_id
    model.train()
    began = time.perf_counter()
    for _ in range(steps):
        x0 = random_batch(train_ids, cfg.batch_size, cfg.seq_len, gen)
        loss, _ = diffusion_loss(model, x0, mask_id, gen, None, cfg.antithetic)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
    return (time.perf_counter() - began) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=5e11, help="training FLOPs of each trainer run")
    ap.add_argument("--repeats", type=int, default=3, help="alternating trainer / bare pairs")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = studies.make_spec(studies.load_recipe(str(RECIPE)), "overhead", "early_middle")
    data = prepare(get_registry().build("corpus", spec.corpus.name, spec.corpus.params), spec.vocab_size)
    cfg = spec.train.model_copy(update={"precision": "fp32", "compile": False, "eval_points": 1,
                                        "eval_sequences": 16, "eval_curve_sequences": 16})
    config = TrialConfig(study="overhead", trial=0, backbone=spec.backbone, strategy=PluginRef(name="none"),
                         corpus=spec.corpus, vocab_size=data.vocab_size, train=cfg, budget=args.budget, seed=0)
    trainer_s, bare_s = [], []
    for i in range(args.repeats):
        model = build_model(config, data.vocab_size)
        torch.manual_seed(i)
        r = train(model, data, cfg, args.budget, seed=i, progress=False)
        trainer_s.append((r.wall_s - r.eval_s) / r.steps)
        torch.manual_seed(i)
        bare_s.append(bare_loop(model, data.train, cfg, r.steps))
        print(f"pair {i + 1}: trainer {1e3 * trainer_s[-1]:.2f} ms/step, bare {1e3 * bare_s[-1]:.2f} ms/step "
              f"({r.steps} steps)", flush=True)
    t, b = statistics.median(trainer_s), statistics.median(bare_s)
    ci = mean_interval([100 * (x / y - 1) for x, y in zip(trainer_s, bare_s)])
    interval = f", per-pair mean {ci.mean:+.1f}% [{ci.lo:+.1f}, {ci.hi:+.1f}] (95% t)" if ci.lo is not None else ""
    print(f"median: trainer {1e3 * t:.2f} ms/step, bare loop {1e3 * b:.2f} ms/step: overhead {100 * (t / b - 1):+.1f}%"
          f"{interval} ({args.repeats} alternating pairs, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__})")


if __name__ == "__main__":
    main()
