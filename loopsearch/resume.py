"""Training-state checkpoints: a trial that dies (kill -9, a lost machine) resumes, not restarts.

Every ``checkpoint_every`` training FLOPs the trainer saves what it needs to continue exactly:
weights, optimizer state, RNG states (the data-order, mask and loop-count streams and torch's own), FLOPs spent,
step count, the validation history and the running statistics. Layout of a state directory
(``ARTIFACTS/STUDY/trial-NNNN/state/``, NNNN the first attempt of the trial)::

    latest                          name of the newest complete checkpoint (replaced atomically)
    ckpt-SSSSSSSS/model.safetensors weights
    ckpt-SSSSSSSS/state.safetensors optimizer tensors and RNG states; metadata "loopsearch": JSON
    progress.json                   FLOPs spent and steps after the newest step (what a crash loses)

A checkpoint is written to a temporary directory and renamed, then ``latest`` is replaced, so a
kill during a save leaves the previous checkpoint intact. Only safetensors and JSON are read
back: nothing is unpickled, so a state directory from elsewhere cannot run code.

Saving rule: a checkpoint is written after the last step before the FLOPs spent could pass the
previous checkpoint plus ``every`` (the next step is bounded by the largest step), so a crash
loses at most ``every`` training FLOPs (plus the step that was running).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_file, save_model

from .errors import LoopsearchError

class TrialTakenOver(LoopsearchError):
    """This attempt's trial was failed and retried elsewhere (the process was stalled)."""


FORMAT = 2  # 2: separate random streams (data order, masks and t, loop counts)


@dataclass
class TrainState:
    """Every counter of the trainer (FLOPs spent, steps, loop applications, the latest loss, strategy
    stats summed over steps, the validation history): what a checkpoint saves and a resume restores."""

    spent: float = 0.0
    steps: int = 0
    loops_sum: float = 0.0
    loss: float = float("nan")
    stats_sum: dict[str, float] = field(default_factory=dict)
    history: list[tuple[float, ...]] = field(default_factory=list)  # (FLOPs, val NLL, its SE)


class Checkpointer:
    """Saves and restores a trial's training state in ``directory`` every ``every`` FLOPs.

    ``every=None`` never saves (but still restores a state left by an earlier attempt and
    tracks the FLOPs spent, for accounting). ``writer=False`` (DDP ranks other than 0) reads but
    never writes."""

    def __init__(self, directory: str | Path, every: float | None, writer: bool = True):
        self.dir, self.every, self.writer = Path(directory), every, writer
        self.spent, self.steps = 0.0, 0  # after the newest step run in this process
        self.last_saved = 0.0
        self.resumed: TrainState | None = None
        # set by a study's objective: False once the trial belongs to someone else (a retry started
        # while this process was stalled); then nothing more is written into the shared directory
        self.still_mine: Callable[[], bool] | None = None

    # ---- saving ---------------------------------------------------------------------------------
    def track(self, spent: float, steps: int) -> None:
        """Called by the trainer right after every step: the FLOPs spent so far."""
        self.spent, self.steps = spent, steps

    def after_step(self, state: TrainState, worst_step: float, model, opt, gen) -> None:
        """Called by the trainer after every step and its validations; saves when due."""
        self.track(state.spent, state.steps)
        if self.every is None or not self.writer:
            return
        self._write_progress()
        if state.spent + worst_step > self.last_saved + self.every:
            self.save(state, model, opt, gen)

    def _write_progress(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "progress.json.tmp"
        try:
            tmp.write_text(json.dumps({"spent": self.spent, "steps": self.steps}))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.dir / "progress.json")

    def save(self, state: TrainState, model, opt, gen) -> Path:
        if self.still_mine is not None and not self.still_mine():
            raise TrialTakenOver(f"{self.dir} belongs to a retry of this trial now; this attempt stops")
        name = f"ckpt-{state.steps:08d}"
        tmp = self.dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            save_model(model, str(tmp / "model.safetensors"))
            tensors, meta = _pack(opt, gen)
            meta.update(format=FORMAT, train=asdict(state))
            save_file(tensors, str(tmp / "state.safetensors"), metadata={"loopsearch": json.dumps(meta)})
        except BaseException as exc:  # a full disk, an interrupt: no half-written checkpoint is left behind
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.filename is None:
                exc.filename = str(tmp)
            raise
        final = self.dir / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        previous = self.latest()
        pointer = self.dir / "latest.tmp"
        pointer.write_text(name)
        os.replace(pointer, self.dir / "latest")
        if previous is not None and previous != final:
            shutil.rmtree(previous, ignore_errors=True)
        self.last_saved = state.spent
        return final

    # ---- restoring ------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        pointer = self.dir / "latest"
        if not pointer.is_file():
            return None
        path = self.dir / pointer.read_text().strip()
        return path if (path / "state.safetensors").is_file() else None

    def saved_spent(self) -> float | None:
        """FLOPs spent at the newest checkpoint (None when there is none); reads only metadata."""
        path = self.latest()
        if path is None:
            return None
        try:
            with safe_open(str(path / "state.safetensors"), "pt") as f:
                return float(json.loads(f.metadata()["loopsearch"])["train"]["spent"])
        except Exception:  # noqa: BLE001 - restore() reports a damaged checkpoint
            return None

    def progress(self) -> dict | None:
        """FLOPs spent and steps after the newest step an earlier attempt ran (None if unknown)."""
        try:
            return json.loads((self.dir / "progress.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def restore(self, model, opt, gen) -> TrainState | None:
        """Load the newest checkpoint into model, optimizer and generator; None when there is none."""
        path = self.latest()
        if path is None:
            return None
        try:
            load_model(model, str(path / "model.safetensors"))
            with safe_open(str(path / "state.safetensors"), "pt") as f:
                meta = json.loads(f.metadata()["loopsearch"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - a damaged checkpoint is the user's to delete
            raise LoopsearchError(f"cannot resume from {path}: {type(exc).__name__}: {str(exc)[:200]}; "
                                  f"delete {self.dir} to start the trial over") from None
        if meta.get("format") != FORMAT:
            raise LoopsearchError(f"checkpoint {path} has format {meta.get('format')}, expected {FORMAT}; "
                                  f"delete {self.dir} to start the trial over")
        _unpack(tensors, meta, opt, gen)
        t = meta["train"]
        state = TrainState(t["spent"], t["steps"], t["loops_sum"], t["loss"], t["stats_sum"],
                           [tuple(h) for h in t["history"]])
        self.spent, self.steps, self.last_saved, self.resumed = state.spent, state.steps, state.spent, state
        return state

    def clear(self) -> None:
        """Remove the state directory (the trial is finished; its final checkpoint is elsewhere)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.dir.parent.rmdir()  # a trial directory left empty (pruned, or the dead attempt's)
        except OSError:
            pass


def _streams(gen) -> dict[str, torch.Generator]:
    """The trainer's random streams by name (one generator: the stream "gen")."""
    return gen if isinstance(gen, dict) else {"gen": gen}


def _pack(opt: torch.optim.Optimizer, gen) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {f"rng.stream.{k}": g.get_state() for k, g in _streams(gen).items()}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    scalars: dict[str, dict[str, float]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "opt_scalars": scalars}


def _unpack(tensors: dict[str, torch.Tensor], meta: dict, opt: torch.optim.Optimizer, gen) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta.get("opt_scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})  # moves state to the params' device
    for name, g in _streams(gen).items():
        key = f"rng.stream.{name}"
        if key not in tensors:
            raise LoopsearchError(f"checkpoint has no random stream {name!r} (saved by another loopsearch version); "
                                  f"delete its state directory to start the trial over")
        g.set_state(tensors[key])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k[9:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
