"""Builtin corpora, read through Hugging Face ``datasets``.

- ``shakespeare``: Tiny Shakespeare (public domain, 1.1 MB), shipped inside the package so the
  quickstart works offline on a fresh machine; first 90% train, last 10% valid.
- ``text``: local text files (train, and valid or a held-out fraction of train).
- ``ptb``: the Penn Treebank (Mikolov's split), read from a local copy (not shipped: no open licence).
- ``hub``: a Hugging Face hub dataset by name (needs network access).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from loopsearch import hookimpl
from loopsearch.data import Corpus
from loopsearch.errors import LoopsearchError


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def read_text_files(files: dict[str, str]) -> dict[str, str]:
    """{split: path} -> {split: whole text}, read with datasets' ``text`` builder."""
    for split, path in files.items():
        if not Path(path).is_file():
            raise LoopsearchError(f"corpus file for split {split!r} not found: {path}; pass an existing text file")
    ds = _quiet_datasets().load_dataset("text", data_files=files, sample_by="document")
    return {split: "".join(ds[split]["text"]) for split in files}


def split_tail(text: str, valid_fraction: float) -> dict[str, str]:
    """Hold out the last ``valid_fraction`` of the text (cut at a line boundary) for validation."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - valid_fraction))) + 1
    return {"train": text[:cut], "valid": text[cut:]}


class ShakespeareParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    valid_fraction: float = Field(0.1, gt=0, lt=1, description="share of the text held out for validation")


class Shakespeare(Corpus):
    name = "shakespeare"
    Params = ShakespeareParams

    def load_splits(self) -> dict[str, str]:
        path = resources.files("loopsearch_builtins") / "data" / "tinyshakespeare.txt"
        with resources.as_file(path) as p:
            text = read_text_files({"train": str(p)})["train"]
        return split_tail(text, self.params.valid_fraction)


class TextParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: str = Field(description="path of the training text file")
    valid: str | None = Field(None, description="path of the validation text file "
                                                "(default: hold out valid_fraction of train)")
    valid_fraction: float = Field(0.1, gt=0, lt=1, description="held-out share when valid is not given")


class TextFiles(Corpus):
    name = "text"
    Params = TextParams

    def load_splits(self) -> dict[str, str]:
        p = self.params
        if p.valid is None:
            return split_tail(read_text_files({"train": p.train})["train"], p.valid_fraction)
        return read_text_files({"train": p.train, "valid": p.valid})


class PTBParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dir: str | None = Field(None, description="folder with ptb.train.txt and ptb.valid.txt (default: ptb/ under "
                                              "$LOOPSEARCH_DATA or the nearest shared/data)")


class PTB(Corpus):
    """The Penn Treebank language-modelling split (Mikolov's; word-level, <unk> for rare words).
    Not shipped with loopsearch (no open licence): read from a local copy."""

    name = "ptb"
    Params = PTBParams

    def load_splits(self) -> dict[str, str]:
        from loopsearch.data import shared_data_dir

        root = Path(self.params.dir) if self.params.dir else (shared_data_dir() or Path("data")) / "ptb"
        files = {"train": root / "ptb.train.txt", "valid": root / "ptb.valid.txt"}
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            raise LoopsearchError(f"PTB not found: {', '.join(missing)}; pass corpus params dir=FOLDER "
                                  f"(or set LOOPSEARCH_DATA to the folder that holds ptb/)")
        return read_text_files({k: str(v) for k, v in files.items()})


class HubParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: str = Field(description="hub dataset name, e.g. Salesforce/wikitext")
    config: str | None = Field(None, description="dataset configuration, e.g. wikitext-2-raw-v1")
    text_field: str = Field("text", description="column holding the text")
    train_split: str = "train"
    valid_split: str = "validation"


class HubDataset(Corpus):
    name = "hub"
    Params = HubParams

    def load_splits(self) -> dict[str, str]:
        p = self.params
        datasets = _quiet_datasets()
        try:
            ds = datasets.load_dataset(p.dataset, p.config)
        except Exception as exc:  # offline machine, unknown name, ...
            raise LoopsearchError(
                f"cannot load hub dataset {p.dataset!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                f"on an offline machine use the `text` corpus with local files"
            ) from None
        return {
            "train": "\n".join(ds[p.train_split][p.text_field]),
            "valid": "\n".join(ds[p.valid_split][p.text_field]),
        }


@hookimpl
def register_corpora():
    return [Shakespeare, TextFiles, PTB, HubDataset]
