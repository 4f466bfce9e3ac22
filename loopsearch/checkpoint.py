"""Trial checkpoints: weights as safetensors, the full config and tokeniser beside them.

Layout of a trial directory::

    model.safetensors   weights (safetensors: no pickle, safe to load from anywhere)
    config.json         TrialConfig + results (plain JSON)
    tokenizer.json      the BPE tokeniser the model was trained with
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_model, save_model

from .looping import LoopedMDM
from .registry import Registry, get_registry
from .spec import TrialConfig


def save(directory: str | Path, model: LoopedMDM, config: TrialConfig, tokenizer_json: str,
         results: dict | None = None) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_model(model, str(d / "model.safetensors"))  # handles the tied embedding/head weights
    (d / "tokenizer.json").write_text(tokenizer_json)
    payload = {"config": config.model_dump(mode="json"), "results": results or {}}
    (d / "config.json").write_text(json.dumps(payload, indent=2))
    return d


def build_model(config: TrialConfig, vocab_size: int, registry: Registry | None = None) -> LoopedMDM:
    """Instantiate the backbone and strategy a TrialConfig names, through the plugin registry."""
    reg = registry or get_registry()
    backbone = reg.build("backbone", config.backbone.name, config.backbone.params, vocab_size, config.train.seq_len)
    strategy = reg.build("loop_strategy", config.strategy.name, config.strategy.params, backbone.d_model)
    return LoopedMDM(backbone, strategy, config.loop_start, config.loop_end)


def load(directory: str | Path, registry: Registry | None = None) -> tuple[LoopedMDM, TrialConfig, str]:
    """Rebuild a trained model from its directory: (model, config, tokenizer_json)."""
    from tokenizers import Tokenizer

    d = Path(directory)
    payload = json.loads((d / "config.json").read_text())
    config = TrialConfig.model_validate(payload["config"])
    tokenizer_json = (d / "tokenizer.json").read_text()
    vocab = Tokenizer.from_str(tokenizer_json).get_vocab_size()
    model = build_model(config, vocab, registry)
    load_model(model, str(d / "model.safetensors"))
    return model, config, tokenizer_json
