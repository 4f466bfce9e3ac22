"""Task corpora: train a study on a reasoning task (``[corpus] name = "addition"``).

- ``addition``: multi-digit addition problems generated in-package (loopsearch/tasks.py), one
  ``123+4567=4690`` line each; the train and valid splits of ``AdditionParams`` (the test split
  is held out for ``loopsearch.tasks.evaluate_task`` and appears in neither).
"""

from __future__ import annotations

from loopsearch import hookimpl
from loopsearch.data import Corpus
from loopsearch.tasks import AdditionParams, addition_splits, problems_text


class AdditionCorpus(Corpus):
    name = "addition"
    Params = AdditionParams

    def load_splits(self) -> dict[str, str]:
        splits = addition_splits(self.params)  # type: ignore[arg-type]
        return {"train": problems_text(splits["train"]), "valid": problems_text(splits["valid"])}


@hookimpl
def register_corpora():
    return [AdditionCorpus]
