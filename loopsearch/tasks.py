"""Reasoning tasks: multi-digit addition generated in-package, and GSM8K from its jsonl files.

A task yields ``Problem``s: a ``prompt`` the model is given as a fixed prefix and the exact
``answer`` it must generate after it. ``evaluate_task`` puts each prompt at the start of a
sequence of ``seq_len`` tokens, MASK everywhere after it, fills the MASK positions with a sampler
(loopsearch/sampling.py), decodes what was generated and scores exact match on the extracted
answer. Prompts that leave fewer than ``min_new_tokens`` positions to generate are skipped and
counted (``n_skipped``), never truncated.

Addition problems look like ``123+4567=4690`` (one per line in the ``addition`` corpus,
plugins/tasks.py). Difficulty: ``digits`` per operand (``min_digits`` .. ``digits`` when a range
is wanted) and ``n_operands``. Generation is deterministic in ``seed``: the test, valid and train
splits come from separate random streams, test and valid hold distinct problems, and no valid or
train problem is a test problem (nor a train problem a valid one). The test split depends only
on the seed, the difficulty and ``n_test``, not on the other split sizes.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import LoopsearchError, SpecError

TASK_NAMES = ("addition", "gsm8k")
ADDITION_SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Problem:
    prompt: str  # the prefix the model is given, e.g. "123+4567="
    answer: str  # the exact answer, e.g. "4690"
    task: str = "addition"  # which extractor reads the model's completion

    @property
    def text(self) -> str:
        """The problem as a training line (addition: ``123+4567=4690\\n``)."""
        return f"{self.prompt}{self.answer}\n"


# ---- addition ----------------------------------------------------------------------------------
class AdditionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    digits: int = Field(3, ge=1, le=18, description="digits per operand (the difficulty knob)")
    min_digits: int | None = Field(None, ge=1, le=18, description="fewest digits per operand; operand lengths "
                                                                   "are drawn uniformly in [min_digits, digits] "
                                                                   "(None: exactly `digits`)")
    n_operands: int = Field(2, ge=2, le=8, description="numbers added per problem")
    n_train: int = Field(20000, ge=1, description="training problems (may repeat; never a valid/test problem)")
    n_valid: int = Field(500, ge=1, description="validation problems (distinct; never a test problem)")
    n_test: int = Field(500, ge=1, description="test problems (distinct)")
    seed: int = Field(0, description="seed of the generator; same seed, same problems")

    @model_validator(mode="after")
    def _digit_range(self):
        if self.min_digits is not None and self.min_digits > self.digits:
            raise ValueError(f"min_digits={self.min_digits} is above digits={self.digits}")
        return self


def _operand_counts(min_digits: int, digits: int) -> int:
    """How many operands have between min_digits and digits digits (1 digit: 0..9)."""
    return 10 ** digits - (10 ** (min_digits - 1) if min_digits > 1 else 0)


def addition_capacity(digits: int, n_operands: int = 2, min_digits: int | None = None) -> int:
    """Number of distinct addition problems at this difficulty (ordered operands)."""
    return _operand_counts(min_digits or digits, digits) ** n_operands


def _operand(rng: random.Random, min_digits: int, digits: int) -> int:
    d = rng.randint(min_digits, digits)
    return rng.randint(0, 9) if d == 1 else rng.randint(10 ** (d - 1), 10 ** d - 1)


def _addition_problem(rng: random.Random, min_digits: int, digits: int, n_operands: int) -> Problem:
    ops = [_operand(rng, min_digits, digits) for _ in range(n_operands)]
    return Problem("+".join(map(str, ops)) + "=", str(sum(ops)), "addition")


def addition_problems(n: int, digits: int = 3, seed: int = 0, *, n_operands: int = 2,
                      min_digits: int | None = None, exclude: set[str] | frozenset[str] = frozenset(),
                      unique: bool = True) -> list[Problem]:
    """``n`` addition problems from ``random.Random(seed)``, none of whose prompts is in
    ``exclude``; ``unique``: no prompt twice. Deterministic: the same arguments give the same
    list, and a longer list starts with the shorter one."""
    lo = min_digits or digits
    if not 1 <= lo <= digits:
        raise LoopsearchError(f"addition digits must satisfy 1 <= min_digits <= digits, got {lo}..{digits}")
    if n_operands < 2:
        raise LoopsearchError(f"addition needs n_operands >= 2, got {n_operands}")
    capacity = addition_capacity(digits, n_operands, lo)
    free = capacity - len(exclude)  # exclude holds valid problems of this difficulty (an upper bound)
    if free < 1 or (unique and n > free):
        raise LoopsearchError(
            f"{n} {'distinct ' if unique else ''}addition problems with {lo}..{digits} digits and {n_operands} "
            f"operands are not available ({capacity} exist, {len(exclude)} held out); lower n_valid/n_test or "
            f"raise digits")
    rng = random.Random(seed)
    out: list[Problem] = []
    seen: set[str] = set()
    tries, max_tries = 0, 50 * n + 20 * min(capacity, 10 ** 6)  # generous: rejection near capacity
    while len(out) < n:
        tries += 1
        if tries > max_tries:
            raise LoopsearchError(f"could not draw {n} addition problems outside the held-out ones; lower "
                                  f"n_valid/n_test or raise digits")
        p = _addition_problem(rng, lo, digits, n_operands)
        if p.prompt in exclude or (unique and p.prompt in seen):
            continue
        seen.add(p.prompt)
        out.append(p)
    return out


def _split_seed(seed: int, split: str) -> str:
    # random.Random hashes a str seed with sha512: stable across runs and Python versions
    return f"loopsearch-addition/{seed}/{split}"


def addition_splits(params: AdditionParams) -> dict[str, list[Problem]]:
    """{"train", "valid", "test": problems} of an AdditionParams: test first (distinct), valid
    (distinct, no test problem), train (no valid or test problem; may repeat)."""
    p = params
    kw = dict(n_operands=p.n_operands, min_digits=p.min_digits)
    test = addition_problems(p.n_test, p.digits, _split_seed(p.seed, "test"), **kw)  # type: ignore[arg-type]
    held = {q.prompt for q in test}
    valid = addition_problems(p.n_valid, p.digits, _split_seed(p.seed, "valid"), exclude=held, **kw)  # type: ignore[arg-type]
    held |= {q.prompt for q in valid}
    train = addition_problems(p.n_train, p.digits, _split_seed(p.seed, "train"), exclude=held, unique=False,
                              **kw)  # type: ignore[arg-type]
    return {"train": train, "valid": valid, "test": test}


def problems_text(problems: list[Problem]) -> str:
    """Problems as training text, one ``prompt+answer`` line each."""
    return "".join(p.text for p in problems)


# ---- GSM8K ---------------------------------------------------------------------------------------
GSM8K_PROMPT = "Question: {question}\nAnswer:"


class GSM8KParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="GSM8K jsonl file with `question` and `answer` fields, e.g. "
                                  "../shared/data/gsm8k/test.jsonl")
    limit: int | None = Field(None, ge=1, description="use only the first `limit` problems (None: all)")


def load_gsm8k(path: str | Path, limit: int | None = None) -> list[Problem]:
    """GSM8K problems from a jsonl file: prompt ``Question: {question}\\nAnswer:``, answer the
    number after ``#### `` (normalised: no commas, no ``$``)."""
    path = Path(path)
    if not path.is_file():
        raise LoopsearchError(f"GSM8K file not found: {path}; pass the path of a jsonl file such as "
                              f"gsm8k/test.jsonl")
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                question, solution = row["question"], row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LoopsearchError(f"{path}:{i} is not a GSM8K record; each line must be JSON with "
                                      f"`question` and `answer` fields") from None
            if "####" not in solution:
                raise LoopsearchError(f"{path}:{i}: the answer has no `#### <number>` line; is this GSM8K?")
            answer = normalize_number(solution.rsplit("####", 1)[1])
            out.append(Problem(GSM8K_PROMPT.format(question=question), answer, "gsm8k"))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise LoopsearchError(f"GSM8K file {path} holds no problems; pass a non-empty jsonl file")
    return out


# ---- answer extraction ---------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?")
_AFTER_HASHES = re.compile(r"####\s*(-?\$?\s?\d[\d,]*(?:\.\d+)?)")


def normalize_number(text: str) -> str:
    """'$1,234.' -> '1234', '18.00' -> '18', ' 7 ' -> '7' (GSM8K's answer convention)."""
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if re.fullmatch(r"-?\d+\.\d+", s):
        whole, frac = s.split(".")
        s = whole if not frac.strip("0") else f"{whole}.{frac.rstrip('0')}"
    return s


def extract_answer(task: str, generated_text: str) -> str | None:
    """The answer in a completion (the text generated after the prompt), or None if there is
    none. ``addition``: the first line, stripped, if it is all digits. ``gsm8k``: the number
    after ``####`` (commas, ``$`` and a trailing ``.`` dropped), else the last number."""
    if task == "addition":
        first = generated_text.split("\n", 1)[0].strip()
        return first if first.isascii() and first.isdigit() else None
    if task == "gsm8k":
        m = _AFTER_HASHES.search(generated_text)
        if m:
            return normalize_number(m.group(1))
        numbers = _NUMBER.findall(generated_text)
        return normalize_number(numbers[-1]) if numbers else None
    raise LoopsearchError(f"no answer extractor for task {task!r}; available: {', '.join(TASK_NAMES)}")


def is_correct(problem: Problem, completion: str) -> bool:
    got = extract_answer(problem.task, completion)
    if got is None:
        return False
    if problem.task == "addition":
        return got.lstrip("0") == problem.answer.lstrip("0")  # '0' and '00' both read as 0
    return got == problem.answer


# ---- the registry --------------------------------------------------------------------------------
class Task:
    """A set of problems by split."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    def __init__(self, params: BaseModel):
        self.params = params

    def splits(self) -> dict[str, list[Problem]]:
        raise NotImplementedError

    def problems(self, split: str = "test") -> list[Problem]:
        splits = self.splits()
        if split not in splits:
            raise LoopsearchError(f"task {self.name!r} has no split {split!r}; available: {', '.join(splits)}")
        return splits[split]


class AdditionTask(Task):
    name = "addition"
    Params = AdditionParams

    def splits(self) -> dict[str, list[Problem]]:
        return addition_splits(self.params)  # type: ignore[arg-type]


class GSM8KTask(Task):
    name = "gsm8k"
    Params = GSM8KParams

    def splits(self) -> dict[str, list[Problem]]:
        p: GSM8KParams = self.params  # type: ignore[assignment]
        return {"test": load_gsm8k(p.path, p.limit)}

    def problems(self, split: str = "test") -> list[Problem]:
        if split != "test":
            raise LoopsearchError(f"task 'gsm8k' reads one file as its 'test' split, not {split!r}; point "
                                  f"`path` at the file you want (e.g. gsm8k/train.jsonl)")
        return self.splits()["test"]


TASKS: dict[str, type[Task]] = {"addition": AdditionTask, "gsm8k": GSM8KTask}


def get_task(name: str, params: dict | BaseModel | None = None) -> Task:
    """A task by name with validated parameters (one-line errors)."""
    if name not in TASKS:
        raise LoopsearchError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    if isinstance(params, cls.Params):
        return cls(params)
    data = params.model_dump() if isinstance(params, BaseModel) else dict(params or {})
    try:
        return cls(cls.Params.model_validate(data))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in exc.errors())
        accepted = ", ".join(cls.Params.model_fields)
        raise SpecError(f"bad parameters for task {name!r}: {problems} (accepted: {accepted})") from None


# ---- evaluation ----------------------------------------------------------------------------------
def _add_cost(total, cost) -> None:
    """Sum a batch's SampleCost into ``total`` (every field adds up)."""
    for field in ("sequences", "generated_tokens", "network_calls", "sequence_calls", "cached_calls", "loop_iterations",
                  "flops", "wall_s"):
        setattr(total, field, getattr(total, field) + getattr(cost, field))
    total.loops_per_call.extend(cost.loops_per_call)


@torch.no_grad()
def evaluate_task(model, tokenizer_json: str, problems: list[Problem], *, seq_len: int,
                  sampler: str | Any = "confidence", steps: int | None = None, seed: int = 0,
                  sampler_params: dict | None = None, loops: Any = None, exit: tuple[str, dict] | None = None,
                  batch_size: int = 16, min_new_tokens: int = 4, n_examples: int = 5) -> dict:
    """Exact-match accuracy of ``model`` (a LoopedMDM) on ``problems``.

    Each prompt (tokenised like the corpus: byte-level BPE, no special tokens) is the fixed
    prefix of a ``seq_len``-token sequence; every position after it is MASK and is generated
    with ``sampler`` (a plugin name or a ``Sampler`` instance) in ``steps`` steps (None: one step
    per generated position of the batch's longest generation), batch ``i`` seeded with
    ``seed + i``. ``loops``: a loop schedule (loopsearch.sampling.parse_loop_schedule); ``exit``:
    (name, params) of an exit criterion. Prompts leaving fewer than ``min_new_tokens`` positions
    are skipped and counted in ``n_skipped``; accuracy is over the problems evaluated.
    Returns accuracy, n, correct, n_skipped, the generation cost (summed over batches: network
    calls, loop iterations, FLOPs, wall seconds) and a few decoded examples.
    """
    from tokenizers import Tokenizer

    from .sampling import SampleCost, generate

    if not problems:
        raise LoopsearchError("no problems to evaluate; pass a non-empty list (check the task's split and limit)")
    if batch_size < 1:
        raise LoopsearchError(f"batch_size must be >= 1, got {batch_size}")
    tok = Tokenizer.from_str(tokenizer_json)
    mask_id = model.backbone.mask_id
    device = next(model.parameters()).device
    encoded = [(p, tok.encode(p.prompt, add_special_tokens=False).ids) for p in problems]
    kept = [(p, ids) for p, ids in encoded if len(ids) + min_new_tokens <= seq_len]
    n_skipped = len(encoded) - len(kept)
    if not kept:
        longest = min(len(ids) for _, ids in encoded)
        raise LoopsearchError(f"every prompt is too long for seq_len={seq_len} (the shortest has {longest} tokens, "
                              f"{min_new_tokens} more are needed for the answer); evaluate with a longer seq_len")
    total, correct, examples = SampleCost(), 0, []
    for i in range(0, len(kept), batch_size):
        batch = kept[i : i + batch_size]
        init = torch.full((len(batch), seq_len), mask_id, dtype=torch.long)
        for row, (_, ids) in enumerate(batch):
            init[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        init = init.to(device)
        n_steps = steps or int((init == mask_id).sum(dim=1).max())
        res = generate(model, init, sampler=sampler, steps=n_steps, seed=seed + i // batch_size,
                       params=sampler_params, loops=loops, exit=exit)
        _add_cost(total, res.cost)
        for row, (p, ids) in enumerate(batch):
            completion = tok.decode(res.tokens[row, len(ids):].tolist())
            ok = is_correct(p, completion)
            correct += ok
            if len(examples) < n_examples:
                examples.append({"prompt": p.prompt, "answer": p.answer, "completion": completion,
                                 "prediction": extract_answer(p.task, completion), "correct": ok})
    n = len(kept)
    from .stats import proportion_interval

    ci = proportion_interval(correct, n)
    return {"accuracy": correct / n, "accuracy_lo": ci[0], "accuracy_hi": ci[1],
            "correct": correct, "n": n, "n_skipped": n_skipped,
            "sampler": sampler if isinstance(sampler, str) else sampler.name, "steps": steps, "seq_len": seq_len,
            "seed": seed,
            "cost": total.as_dict(), "examples": examples}


def evaluate_checkpoint(directory: str | Path, name: str, params: dict | BaseModel | None = None, *,
                        split: str = "test", limit: int | None = None, seq_len: int | None = None,
                        device: str = "auto", **kwargs) -> dict:
    """``evaluate_task`` of a trial checkpoint on task ``name`` (``get_task``), its ``split``,
    the first ``limit`` problems; seq_len defaults to the trial's training length (at most).
    ``kwargs``: evaluate_task's (sampler, steps, seed, sampler_params, loops, batch_size)."""
    from . import checkpoint
    from .train import resolve_device

    problems = get_task(name, params).problems(split)[:limit]
    model, config, tokenizer_json = checkpoint.load(directory)
    trained = config.train.seq_len
    seq_len = seq_len or trained
    if not 1 <= seq_len <= trained:
        raise LoopsearchError(f"seq_len {seq_len} must be between 1 and {trained}, the length the trial was trained at")
    model.to(resolve_device(device)).eval()
    out = evaluate_task(model, tokenizer_json, problems, seq_len=seq_len, **kwargs)
    return {"task": name, "split": split, "checkpoint": str(directory), **out}
