r"""Sampling benchmark: every sampler and loop schedule on one trained checkpoint.

For each setting: network calls, network passes per sample (the cached sampler runs only the
sequences that changed), loop-block applications per call, FLOPs per generated token
(the one FLOP accounting), tokens/s, generative perplexity under the study's reference causal LM
(mean over samples, with its standard error) and the samples' unigram entropy. Adaptive loop
schedules are compared with the constant schedule of the same sampler: their FLOP saving and
their gen-PPL change. Real validation text scored by the same reference is the first row (what
the corpus itself scores).

The checkpoint (about 10 minutes on 2 CPU cores, once; run from any directory):

    loopsearch study create --recipe benchmarks/sampling_study.toml \
        --space benchmarks/sampling_space.toml --name sampling
    loopsearch study run sampling
    loopsearch reference train sampling
    python benchmarks/sampling.py --study sampling --trial 1 --output sampling.md

Any trained trial works: pass --study/--trial (and --storage). Wall time and tokens/s depend
on the machine and on what else runs: take them from an idle machine.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

from loopsearch.eval import generation, metrics
from loopsearch.eval import loop_scaling as evaluate
from loopsearch.eval.reference import check_tokenizer, gen_ppl, load_reference, unigram_entropy
from loopsearch.search import study as studies


def settings(max_loops: int, steps: int) -> list[dict]:
    """(label, sampler, params, steps, loop schedule, exit) of every row."""
    half = max(1, max_loops // 2)
    rows = [dict(sampler="ancestral", steps=steps, loops=f"constant:{max_loops}"),
            dict(sampler="ancestral", steps=4 * steps, loops=f"constant:{max_loops}"),
            dict(sampler="cached", steps=4 * steps, loops=f"constant:{max_loops}"),
            dict(sampler="cached", steps=4 * steps, loops=f"middle:1-{max_loops}"),
            dict(sampler="threshold", steps=steps, loops=f"constant:{max_loops}", params={"threshold": 0.9}),
            dict(sampler="confidence", steps=steps, loops=f"constant:{max_loops}")]
    if max_loops > 1:
        rows += [dict(sampler="confidence", steps=steps, loops=f"constant:{half}"),
                 dict(sampler="confidence", steps=steps, loops="constant:1"),
                 dict(sampler="confidence", steps=steps, loops=f"decreasing:1-{max_loops}"),
                 dict(sampler="confidence", steps=steps, loops=f"increasing:1-{max_loops}"),
                 dict(sampler="confidence", steps=steps, loops=f"middle:1-{max_loops}"),
                 *[dict(sampler="confidence", steps=steps, loops=f"constant:{max_loops}",
                        exit=("hidden_delta", {"tol": tol})) for tol in (0.15, 0.3)],
                 dict(sampler="ancestral", steps=steps, loops=f"middle:1-{max_loops}")]
    return rows


def per_sample_nll(ref, tokens: torch.Tensor) -> list[float]:
    return [gen_ppl(ref, row[None])["nll"] for row in tokens]


def summarise(nlls: list[float]) -> tuple[float, float]:
    """gen-PPL of the pooled samples and the standard error of its log (delta method)."""
    mean = statistics.fmean(nlls)
    se = statistics.stdev(nlls) / math.sqrt(len(nlls)) if len(nlls) > 1 else float("nan")
    return math.exp(mean), se


def run(args) -> list[dict]:
    st, spec = studies.load(args.study, args.storage)
    loaded = generation.load_trial(evaluate.trial_checkpoint(st, args.trial), args.device)
    ref_dir = Path(args.reference) if args.reference else metrics.ensure_reference(spec)
    ref, _, ref_tok, ref_info = load_reference(ref_dir)
    check_tokenizer(ref_tok, loaded.tokenizer_json, args.study)
    model = loaded.model
    max_loops = int(model.strategy.eval_loops()) if model.strategy.loops_block else 1
    T = loaded.seq_len
    _, config, val = evaluate.load_for_validation(evaluate.trial_checkpoint(st, args.trial), args.device)
    real = torch.cat(val)[: args.n_samples].cpu()
    ppl, se = summarise(per_sample_nll(ref, real))
    out = [{"setting": "validation text (real data)", "gen_ppl": ppl, "log_se": se,
            "entropy": unigram_entropy(real)}]
    for s in settings(max_loops, args.steps or T):
        result, _ = generation.sample_trial(loaded, n=args.n_samples, sampler=s["sampler"], steps=s["steps"],
                                            seed=args.seed, params=s.get("params"), loops=s["loops"],
                                            exit=s.get("exit"))
        c = result.cost
        ppl, se = summarise(per_sample_nll(ref, result.tokens.cpu()))
        label = f"{s['sampler']} {s['steps']} steps, loops {s['loops']}" + (
            f", exit {s['exit'][0]}:tol={s['exit'][1]['tol']}" if s.get("exit") else "")
        out.append({"setting": label, "sampler": s["sampler"], "steps": s["steps"], "loops": s["loops"],
                    "exit": bool(s.get("exit")), "calls": c.network_calls,
                    "passes": c.sequence_calls / max(c.sequences, 1), "mean_loops": c.mean_loops,
                    "flops_per_token": c.flops_per_token, "tokens_per_s": c.tokens_per_s, "gen_ppl": ppl,
                    "log_se": se, "entropy": unigram_entropy(result.tokens.cpu())})
        print(f"  {label}: {c.network_calls} calls, {c.flops_per_token:.3g} FLOP/token, gen-PPL {ppl:.1f}",
              file=sys.stderr)
    compare(out, max_loops)
    print(f"checkpoint: study {args.study} trial {args.trial} ({config.strategy.name} [{config.loop_start},"
          f"{config.loop_end}) x{max_loops}, {T} tokens per sample, {args.n_samples} samples, seed {args.seed}); "
          f"reference LM val ppl {ref_info.get('val_ppl', float('nan')):.2f}", file=sys.stderr)
    return out


def compare(rows: list[dict], max_loops: int) -> None:
    """FLOP saving and gen-PPL change of each row against the constant max-loop row of its
    sampler and step count."""
    base = {(r["sampler"], r["steps"]): r for r in rows
            if r.get("loops") == f"constant:{max_loops}" and not r.get("exit") and r.get("sampler") != "cached"}
    for r in rows[1:]:
        b = base.get(("ancestral" if r["sampler"] == "cached" else r["sampler"], r["steps"]))
        if b is None or b is r:
            continue
        r["flop_saving"] = 1.0 - r["flops_per_token"] / b["flops_per_token"]
        r["delta_gen_ppl"] = r["gen_ppl"] - b["gen_ppl"]


def markdown(rows: list[dict]) -> str:
    head = ("| setting | calls | passes/sample | loops/call | FLOP/gen token | FLOP saving | tokens/s | "
            "gen PPL (±1 se) | Δ gen PPL | entropy |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        ppl = r["gen_ppl"]
        band = f"{ppl:.1f} ({ppl * math.exp(-r['log_se']):.1f}-{ppl * math.exp(r['log_se']):.1f})"
        cell = lambda k, f: "" if r.get(k) is None else f.format(r[k])  # noqa: E731
        lines.append(f"| {r['setting']} | {cell('calls', '{}')} | {cell('passes', '{:.1f}')} | "
                     f"{cell('mean_loops', '{:.2f}')} | "
                     f"{cell('flops_per_token', '{:.3g}')} | {cell('flop_saving', '{:+.0%}')} | "
                     f"{cell('tokens_per_s', '{:.0f}')} | {band} | {cell('delta_gen_ppl', '{:+.1f}')} | "
                     f"{r['entropy']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", default="sampling")
    p.add_argument("--trial", type=int, default=1)
    p.add_argument("--storage", default=None)
    p.add_argument("--reference", default=None, help="reference LM directory (default: the study's)")
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the sample length)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--output", default=None, help="also write the Markdown table here")
    args = p.parse_args()
    text = markdown(run(args))
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
