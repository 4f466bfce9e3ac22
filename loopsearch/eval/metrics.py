"""Quality metrics of a trained trial beyond val NLL: what ``loopsearch evaluate`` measures and
what a study can optimise (``[objective] metrics``).

- ``gen_ppl``: unconditional samples (loopsearch/sampling.py) scored by the study's reference
  causal LM (loopsearch/eval/reference.py), always with the samples' unigram entropy beside it (low-
  entropy samples game gen-PPL) and what generation cost in FLOPs.
- ``zeroshot``: the ELBO bound on a held-out text file (WikiText-2, LAMBADA, PTB), in nats/token
  and bits per byte (loopsearch/eval/zeroshot.py).
- ``task``: exact-match accuracy on a reasoning task by conditional sampling (loopsearch/tasks.py).

Results are stored with the trial in the study (``loopsearch.metrics.<trial>``, plain JSON),
one row per metric and setting; ``loopsearch leaderboard`` shows the latest of each.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import optuna
from rich.table import Table

from ..data import prepare
from ..errors import LoopsearchError
from ..registry import get_registry
from ..sampling import parse_loop_schedule
from ..spec import validate
from ..tasks import evaluate_task, get_task
from .generation import Loaded, load_trial, sample_trial
from .reference import (ReferenceConfig, check_tokenizer, load_reference, reference_dir, save_reference, score_samples,
                        train_reference)
from .zeroshot import read_eval_text, zeroshot_nll

METRIC_ATTR = "loopsearch.metrics."
EVALUATE_METRICS = ("genppl", "zeroshot", "task")


# ---- the reference LM of a study ------------------------------------------------------------------
def reference_path(spec) -> Path:
    return reference_dir(spec.artifacts_dir, spec.name)


def ensure_reference(spec, params: dict | None = None, progress: bool = True) -> Path:
    """The study's reference causal LM, trained on its corpus and tokeniser on first use
    (``loopsearch reference train`` does it explicitly). Written to a temporary directory and
    renamed, so a crash or a second worker never leaves half a reference behind."""
    path = reference_path(spec)
    if (path / "model.safetensors").exists():
        return path
    train_reference_for(spec, params, progress, path)
    return path


def train_reference_for(spec, params: dict | None, progress: bool, path: Path | None = None) -> dict[str, Any]:
    path = path or reference_path(spec)
    config = validate(ReferenceConfig, params or {}, "reference LM parameters")
    data = prepare(get_registry().build("corpus", spec.corpus.name, spec.corpus.params), spec.vocab_size)
    model, info = train_reference(data, config, progress=progress)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_reference(tmp, model, config, data.tokenizer_json, info)
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)
    return info


# ---- metrics -------------------------------------------------------------------------------------
def sampler_settings(sampler: str, params: dict | None, steps: int | None, loops, exit, seed: int) -> dict[str, Any]:
    label = parse_loop_schedule(loops).label()
    return {"sampler": sampler, "sampler_params": dict(params or {}), "steps": steps, "loops": label,
            "exit": None if exit is None else exit[0] + "".join(f",{k}={v}" for k, v in sorted(exit[1].items())),
            "seed": seed}


def gen_ppl_metric(loaded: Loaded, reference: str | Path, *, sampler: str = "confidence", params: dict | None = None,
                   steps: int | None = None, n_samples: int = 16, seed: int = 0, loops=None,
                   exit: tuple[str, dict] | None = None) -> dict[str, Any]:
    """gen-PPL and unigram entropy of ``n_samples`` unconditional samples, and their cost."""
    ref_model, _, ref_tok, _ = load_reference(reference)
    check_tokenizer(ref_tok, loaded.tokenizer_json, loaded.config.study)
    result, _ = sample_trial(loaded, n=n_samples, sampler=sampler, steps=steps, seed=seed, params=params,
                             loops=loops, exit=exit)
    device = next(loaded.model.parameters()).device
    scored = score_samples(ref_model.to(device), result.tokens, device=device)
    return {"metric": "genppl", "gen_ppl": scored["gen_ppl"], "gen_nll": scored["nll"], "gen_nll_se": scored["nll_se"],
            "gen_ppl_lo": scored["gen_ppl_lo"], "gen_ppl_hi": scored["gen_ppl_hi"],
            "sample_entropy": scored["entropy"], "n_samples": n_samples,
            **sampler_settings(sampler, params, steps, loops, exit, seed), **cost_fields(result.cost)}


def cost_fields(cost) -> dict[str, Any]:
    d = cost.as_dict()
    return {k: d[k] for k in ("network_calls", "sequence_calls", "cached_calls", "mean_loops", "flops",
                              "flops_per_token", "wall_s", "tokens_per_s", "generated_tokens")}


def zeroshot_metric(loaded: Loaded, path: str | Path, *, sequences: int | None = 64, seed: int = 0,
                    device: str | None = None) -> dict[str, Any]:
    """The ELBO bound on a text file: nats/token, perplexity bound and bits per byte."""
    cfg = loaded.config.train
    text = read_eval_text(path)
    row = zeroshot_nll(loaded.model, loaded.tokenizer_json, text, seq_len=cfg.seq_len, n_sequences=sequences,
                       batch_size=cfg.eval_batch_size, draws=cfg.eval_draws, seed=seed)
    return {"metric": "zeroshot", "data": str(path), "perplexity": row.pop("perplexity_bound"), **row}


def task_metric(loaded: Loaded, task: str = "addition", task_params: dict | None = None, *, n: int = 64,
                sampler: str = "confidence", params: dict | None = None, steps: int | None = None, seed: int = 0,
                loops=None, exit: tuple[str, dict] | None = None) -> dict[str, Any]:
    """Exact-match accuracy on the first ``n`` problems of the task's test split."""
    problems = get_task(task, task_params or {}).problems("test")[:n]
    row = evaluate_task(loaded.model, loaded.tokenizer_json, problems, seq_len=loaded.seq_len, sampler=sampler,
                        steps=steps, seed=seed, sampler_params=params, loops=loops, exit=exit)
    cost = row.pop("cost")
    return {"metric": "task", "task": task, "task_params": dict(task_params or {}), **row,
            **sampler_settings(sampler, params, steps, loops, exit, seed),
            **{k: cost[k] for k in ("network_calls", "mean_loops", "flops", "flops_per_token", "wall_s",
                                    "tokens_per_s")}}


def objective_metric(metric: str, directory: str | Path, spec) -> dict[str, Any]:
    """One study objective (gen_ppl, zeroshot_bpb or task_accuracy) of a trained trial, as the
    user attributes to store with it; the key named ``metric`` holds the objective's value."""
    obj = spec.objective
    loaded = load_trial(directory, spec.train.device)
    sampling = dict(sampler=obj.sampler.name, params=obj.sampler.params, steps=obj.steps, seed=obj.seed,
                    loops=obj.loops)
    if metric == "gen_ppl":
        row = gen_ppl_metric(loaded, ensure_reference(spec, obj.reference, progress=False),
                             n_samples=obj.n_samples, **sampling)
        return {"gen_ppl": row["gen_ppl"], "sample_entropy": row["sample_entropy"],
                "sample_flops_per_token": row["flops_per_token"]}
    if metric == "zeroshot_bpb":
        row = zeroshot_metric(loaded, obj.zeroshot, sequences=obj.zeroshot_sequences, seed=spec.seed)
        return {"zeroshot_bpb": row["bits_per_byte"], "zeroshot_nats_per_token": row["nll"],
                "zeroshot_data": row["data"]}
    if metric == "task_accuracy":
        row = task_metric(loaded, obj.task.name, obj.task.params, n=obj.n_task, **sampling)
        return {"task_accuracy": row["accuracy"], "task": obj.task.name,
                "sample_flops_per_token": row["flops_per_token"]}
    raise LoopsearchError(f"unknown objective metric {metric!r}")


# ---- storage ------------------------------------------------------------------------------------------
def store(study: optuna.Study, number: int, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Append a metric row to the trial's rows (a row with the same metric and settings is
    replaced). Returns all the trial's rows."""
    key = lambda r: {k: v for k, v in r.items() if k in SETTINGS}  # noqa: E731
    rows = [r for r in stored(study).get(number, []) if key(r) != key(row)]
    rows.append(_plain(row))
    study.set_user_attr(f"{METRIC_ATTR}{number}", rows)
    return rows


SETTINGS = ("metric", "sampler", "sampler_params", "steps", "loops", "exit", "seed", "n_samples", "data", "task",
            "task_params", "n")


def stored(study: optuna.Study) -> dict[int, list[dict[str, Any]]]:
    return {int(k[len(METRIC_ATTR):]): v for k, v in study.user_attrs.items() if k.startswith(METRIC_ATTR)}


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe: NaN/inf become None (the storage keeps plain JSON)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


# ---- display ----------------------------------------------------------------------------------------------
COLUMNS = {  # key -> (header, format)
    "metric": ("metric", "{}"), "data": ("data", "{}"), "task": ("task", "{}"), "sampler": ("sampler", "{}"),
    "steps": ("steps", "{}"), "loops": ("loops", "{}"), "exit": ("exit", "{}"),
    "gen_ppl": ("gen PPL", "{:.2f}"), "sample_entropy": ("entropy (nats)", "{:.3f}"),
    "accuracy": ("accuracy", "{:.3f}"), "nll": ("NLL≤ (nats/tok)", "{:.4f}"), "perplexity": ("ppl≤", "{:.2f}"),
    "bits_per_byte": ("bits/byte≤", "{:.4f}"), "network_calls": ("calls", "{}"), "mean_loops": ("loops/call", "{:.2f}"),
    "flops_per_token": ("FLOP/gen tok", "{:.3g}"), "inference_flops_per_token": ("inf FLOP/tok", "{:.3g}"),
    "tokens_per_s": ("tok/s", "{:.0f}"), "wall_s": ("s", "{:.1f}"),
}


def _shown(r: dict[str, Any]) -> dict[str, Any]:
    """Each value with how sure it is: gen-PPL and accuracy with their 95% intervals, NLL ± its
    standard error, accuracy with how many problems were scored and skipped."""
    r = dict(r)
    if r.get("gen_ppl") is not None and r.get("gen_ppl_lo") is not None:
        r["gen_ppl"] = f"{r['gen_ppl']:.2f} [{r['gen_ppl_lo']:.2f}, {r['gen_ppl_hi']:.2f}]"
    if r.get("accuracy") is not None:
        interval = f" [{r['accuracy_lo']:.3f}, {r['accuracy_hi']:.3f}]" if r.get("accuracy_lo") is not None else ""
        skipped = f", {r['n_skipped']} skipped" if r.get("n_skipped") else ""
        r["accuracy"] = f"{r['accuracy']:.3f}{interval} ({r.get('correct', '?')}/{r.get('n', '?')}{skipped})"
    if r.get("nll") is not None and r.get("nll_se") is not None:
        r["nll"] = f"{r['nll']:.4f} ± {r['nll_se']:.4f}"
    return r


def rich_table(rows: list[dict[str, Any]], title: str):
    cols = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    table = Table(title=f"{title}: metrics (≤: an upper bound, the ELBO; [..]: 95% interval)", title_justify="left")
    for c in cols:
        table.add_column(COLUMNS[c][0], justify="left" if COLUMNS[c][1] == "{}" else "right")
    for r in map(_shown, rows):
        table.add_row(*("" if r.get(c) is None else r[c] if isinstance(r[c], str) and COLUMNS[c][1] != "{}"
                        else COLUMNS[c][1].format(r[c]) for c in cols))
    return table
