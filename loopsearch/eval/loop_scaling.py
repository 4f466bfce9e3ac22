"""Inference-time loop scaling: evaluate a trained checkpoint at several loop counts.

LoopMDM trains with S ~ U{1..n} loops so that the count can change at inference, trading compute
for quality. ``loop_scaling`` measures that trade on the study's validation split: val NLL (the
same fixed-mask ELBO as in training) and inference FLOPs per token (the one FLOP accounting) at
each loop count, and with inference-time exit criteria (plugins/exits.py), for which the loop
count is a cap: there the FLOPs are what ran (mean loops executed, plus the criteria's readouts).
Results are stored in the study (``loopsearch.eval.<trial>``, plain JSON) and
beside the checkpoint (``eval.json``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import torch

from .. import checkpoint
from ..data import prepare, subsample, validation_windows
from ..diffusion import validation_elbo
from ..errors import LoopsearchError
from ..exits import ExitSpec, check_exits, make_exit  # noqa: F401 - check_exits: re-exported for the CLI
from ..looping import ExecutionRecorder
from ..registry import get_registry
from ..train import resolve_device

EVAL_ATTR = "loopsearch.eval."


MAX_LOOPS = 256  # evaluating more loop counts than this is a typo, not an experiment


def parse_loops(text: str) -> list[int]:
    """'1,2,4,8' or '1-8' -> sorted loop counts."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise LoopsearchError(f"cannot read --loops {text!r}; write counts like 1,2,4,8 or a range 1-8") from None
    if not out or min(out) < 1:
        raise LoopsearchError(f"--loops {text!r} must list loop counts >= 1, e.g. 1,2,4,8")
    if max(out) > MAX_LOOPS:
        raise LoopsearchError(f"--loops {text!r} asks for {max(out)} loops; at most {MAX_LOOPS} are evaluated")
    return sorted(out)


def trial_checkpoint(study: optuna.Study, number: int) -> Path:
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise LoopsearchError(f"study {study.study_name!r} has no trial {number}; trials: "
                              f"{', '.join(map(str, sorted(trials))) or 'none'}")
    path = trials[number].user_attrs.get("checkpoint")
    if not path or not (Path(path) / "model.safetensors").exists():
        raise LoopsearchError(f"trial {number} of {study.study_name!r} has no checkpoint "
                              f"(state {trials[number].state.name.lower()}, checkpoint {path!r}); "
                              f"evaluate a complete trial (see `loopsearch leaderboard --study {study.study_name}`)")
    return Path(path)


def validation_set(directory: str | Path, device: str = "auto"):
    """A trial's checkpoint in eval mode on ``device``, its TrialConfig, and the validation
    windows (W, T) and their keys the trial was scored on (the study's corpus, the same windows
    and, with ``config.mask_seed``, the same masks)."""
    reg = get_registry()
    model, config, _ = checkpoint.load(directory, reg)
    data = prepare(reg.build("corpus", config.corpus.name, config.corpus.params), config.vocab_size)
    dev = resolve_device(device)
    model.to(dev).eval()
    windows, keys = validation_windows(data.valid, config.train.seq_len, config.train.eval_sequences)
    return model, config, windows.to(dev), keys


def load_for_validation(directory: str | Path, device: str = "auto"):
    """A trial's checkpoint, its TrialConfig, and the learning curve's validation windows
    (``eval_curve_sequences`` of them) in batches: what the attention analysis reads."""
    model, config, windows, keys = validation_set(directory, device)
    windows, _ = subsample(windows, keys, config.train.eval_curve_sequences)
    return model, config, list(windows.split(config.train.batch_size))


@torch.no_grad()
def loop_scaling(directory: str | Path, loops: list[int], device: str = "auto",
                 exits: list[ExitSpec] | None = None) -> list[dict]:
    """Val NLL (nats/token) and inference FLOPs per token of a checkpoint at each loop count,
    without an exit criterion ("none") and with each of ``exits`` ([(name, params)]), for which
    the loop count is a cap. ``mean_loops`` and the FLOPs are what the forward passes executed
    (loop-block applications per sequence, plus the criteria's readouts)."""
    criteria = check_exits(exits)
    model, config, windows, keys = validation_set(directory, device)
    cfg = config.train
    if not model.strategy.loops_block:
        loops, criteria = [1], []  # nothing to loop (or exit from): one row for the plain model
    rows = []
    for n in loops:
        for label, name, params in [("none", None, None), *criteria]:
            crit = None if name is None else make_exit(name, params, model, cfg.seq_len)
            rec = ExecutionRecorder(model)
            kwargs = {} if crit is None else {"exit": crit}
            val = validation_elbo(rec, windows, keys, model.backbone.mask_id, cfg.eval_draws, seed=config.mask_seed,
                                  batch_size=cfg.eval_batch_size, n_loops=n, **kwargs)
            nll = val.nll
            apps, extra = rec.means()
            shown = apps if model.strategy.loops_block else 1.0  # the plain model runs every layer once
            rows.append({"n_loops": n, "exit": label, "val_nll": nll, "val_nll_se": val.se,
                         "val_windows": val.flat(), "val_draws": val.draws, "perplexity": math.exp(min(nll, 700)),
                         "mean_loops": shown, "mean_token_loops": rec.mean_token_loops(),
                         "inference_flops_per_token": model.inference_flops_per_token(cfg.seq_len, apps, extra),
                         "trained_n_loops": int(model.strategy.eval_loops())})
    return rows


def store(study: optuna.Study, number: int, directory: Path, rows: list[dict]) -> list[dict]:
    """Store rows with the trial, merged with its earlier ones: a new row replaces an old one for
    the same loop count and exit criterion. Returns all the trial's rows."""
    key = lambda r: (r["n_loops"], r.get("exit", "none"))  # noqa: E731
    new = {key(r) for r in rows}
    old = [r for r in stored(study).get(number, []) if key(r) not in new]
    merged = sorted(old + rows, key=lambda r: (r["n_loops"], r.get("exit", "none") != "none", r.get("exit", "none")))
    study.set_user_attr(f"{EVAL_ATTR}{number}", {"loop_scaling": merged})
    (directory / "eval.json").write_text(json.dumps({"loop_scaling": merged}, indent=2))
    return merged


def stored(study: optuna.Study) -> dict[int, list[dict]]:
    """{trial number: loop-scaling rows} of every evaluated trial of a study."""
    return {int(k[len(EVAL_ATTR):]): v["loop_scaling"] for k, v in study.user_attrs.items()
            if k.startswith(EVAL_ATTR)}
