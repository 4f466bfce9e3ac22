"""The Python API: load what a study trained, without the command line.

    import loopsearch
    trial = loopsearch.load_trial("quickstart", 3)          # storage: $LOOPSEARCH_STORAGE or ./loopsearch.db
    out = trial.model(token_ids)                           # a LoopedMDM in eval mode: logits, loops executed
    trial.record.val_nll, trial.config.strategy, trial.tokenizer.encode("To be").ids

``loopsearch.load_trial`` is this module's ``load_trial`` (imported on first use, so ``import
loopsearch`` stays light).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class LoadedTrial:
    """A trained trial: the model (eval mode, on ``device``), its TrialConfig, its tokenizer
    (a ``tokenizers.Tokenizer``) and its stored record (val NLL, FLOPs, steps, ...)."""

    model: Any  # loopsearch.looping.LoopedMDM
    config: Any  # loopsearch.spec.TrialConfig
    tokenizer: Any  # tokenizers.Tokenizer
    record: Any  # loopsearch.search.record.TrialRecord
    checkpoint: str


def load_trial(study: str, trial: int, storage: str | None = None, device: str = "cpu") -> LoadedTrial:
    """Load trial ``trial`` of ``study`` from ``storage`` (default: $LOOPSEARCH_STORAGE, else
    sqlite:///loopsearch.db here). Raises a one-line LoopsearchError for an unknown study or a
    trial without a checkpoint (pruned, failed, running)."""
    from tokenizers import Tokenizer

    from . import checkpoint
    from .eval.loop_scaling import trial_checkpoint
    from .search import study as studies
    from .search.record import TrialRecord
    from .search.storage import require_existing
    from .train import resolve_device

    require_existing(storage)
    st, _ = studies.load(study, storage)
    directory = trial_checkpoint(st, trial)
    model, config, tokenizer_json = checkpoint.load(directory)
    model = model.to(resolve_device(device)).eval()
    record = TrialRecord.of(next(t for t in st.get_trials(deepcopy=False) if t.number == trial))
    return LoadedTrial(model, config, Tokenizer.from_str(tokenizer_json), record, str(directory))
