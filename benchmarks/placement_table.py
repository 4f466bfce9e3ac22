"""Tabular benchmark: train every loop placement of a small looped MDLM at one training-FLOP budget, 3 seeds each.

The grid (46 configurations by default): a 6-layer transformer backbone; every block
[loop_start, loop_end) of 1-3 layers (15 blocks) looped 2 or 3 times with a constant loop count
(strategy ``fixed``), every block looped with S ~ U{1..3} in training and 3 loops at inference
(LoopMDM's recipe, ``--uniform-loops 3``), plus the non-looped baseline (strategy ``none``, written as
n_loops 1 with an empty block). Each configuration (a "cell") is trained once per seed (``--seeds``,
default 0 1 2). A seed fixes the data order, the initialisation and the validation masks, and is the
same for every cell: rows of one seed differ only in the placement, so differences between cells are
paired by seed. Each row also keeps the learning curve (val NLL at ``--eval-points`` equal fractions
of the budget), so pruners can be replayed against the table without training
(benchmarks/search_efficiency.py); benchmarks/placement_summary.py reports its signal-to-noise and
which cells beat the paper's placement.

Output: a parquet table (polars), one row per (configuration, seed):

- ``loop_start``, ``loop_end``, ``block_length``, ``n_loops``, ``train_loops``, ``strategy``: the
  placement (the baseline: 0, 0, 0, 1, "none");
- ``label``: e.g. ``[1,3)x3 U``; ``val_nll`` and ``val_se``: final validation ELBO, nats/token, and
  its standard error over the validation windows; ``val_values`` and ``val_draws``: the validation per
  (window, draw), so two rows of one seed can be differenced pairwise; ``train_flops``: FLOPs spent
  (<= budget); ``steps``: optimizer steps;
  ``inference_flops_per_token``; ``n_params``;
- ``curve``: [[gflops, val_nll], ...] at every evaluation (GFLOPs = 1e9 training FLOPs spent
  when it ran; the last point is the final ``val_nll``);
- ``wall_s``: training wall time, seconds; ``seed``;
- the settings as constant columns (``n_layer``, ``d_model``, ``n_heads``, ``seq_len``,
  ``batch_size``, ``lr``, ``vocab_size``, ``budget``, ``eval_points``, ``unigram_nll``) and the run's
  provenance (``torch_version``, ``date``); the same settings are in the parquet's key-value
  metadata under ``loopsearch.placement_table`` (JSON).

``unigram_nll`` is the plateau: the cross-entropy (nats/token) of the validation split under the
training split's unigram distribution. An MDLM that has learned nothing but token frequencies
sits there; a useful table needs the baseline clearly below it. The model (d_model 48, 4 heads,
seq 32, batch 16, lr 1e-2, vocabulary 260: almost bytes) was chosen because it leaves the plateau
(3.53) within 1 TFLOP; at vocabulary 512 every setting tried stayed on it (2026-11-24).

The shipped table's date, machine, figures and summary are in docs/results.md ("Where to loop").
The training head runs only at masked positions and is charged so: rows are comparable only with
tables from the same code version (the 2026-11-24 one-seed table charged the full head and used the
old validation estimator).

Run (138 trainings of 60-100 s on one thread; resumable: rows already in ``--output`` with the same
settings are kept unless ``--fresh``), on two cores as two shards, then merged::

    OMP_NUM_THREADS=1 python benchmarks/placement_table.py --shard 0/2 --output /tmp/pt_s0.parquet &
    OMP_NUM_THREADS=1 python benchmarks/placement_table.py --shard 1/2 --output /tmp/pt_s1.parquet
    python benchmarks/placement_table.py --merge /tmp/pt_s0.parquet /tmp/pt_s1.parquet
    OMP_NUM_THREADS=1 python benchmarks/placement_table.py --limit 1 --seeds 0 --output /tmp/b.parquet  # baseline only

Rows are trained cell by cell (every seed of a cell before the next), so a partial table holds whole
cells; ``--cells`` trains chosen cells first, in the order given, and a later run without it adds
the rest to the same ``--output``. Shards split the rows still to do, so only their merge holds
whole cells, and each shard decides what is left from its own ``--output``: to continue a sharded
run with other cells, merge the shards first and copy the merged table to every shard's output.
The 4-TFLOP table (docs/results.md) was started so::

    OMP_NUM_THREADS=1 python benchmarks/placement_table.py --budget 4e12 --shard 0/2 \
        --output /tmp/pt4_s0.parquet --cells baseline '[1,3)x3 U' '[0,1)x2' '[5,6)x2' ...
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch

from loopsearch import checkpoint
from loopsearch.data import PreparedData, prepare
from loopsearch.registry import get_registry
from loopsearch.spec import PluginRef, TrainConfig, TrialConfig
from loopsearch.train import train
from loopsearch.units import format_flops, parse_flops

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "placement_table.parquet"
METADATA_KEY = "loopsearch.placement_table"


@dataclass(frozen=True)
class Placement:
    """One configuration of the grid; n_loops 1 is the non-looped baseline (empty block)."""

    loop_start: int
    loop_end: int
    n_loops: int
    train_loops: str = "constant"  # "constant": n_loops in training; "uniform": S ~ U{1..n_loops} (LoopMDM)

    @property
    def block_length(self) -> int:
        return self.loop_end - self.loop_start

    @property
    def strategy(self) -> str:
        return "none" if self.n_loops == 1 else "fixed"

    @property
    def key(self) -> tuple[int, int, int, str]:
        return (self.loop_start, self.loop_end, self.n_loops, self.train_loops)

    def label(self) -> str:
        if self.n_loops == 1:
            return "baseline"
        return f"[{self.loop_start},{self.loop_end})x{self.n_loops}" + (" U" if self.train_loops == "uniform" else "")


BASELINE = Placement(0, 0, 1)
PAPER = Placement(1, 3, 3, "uniform")  # LoopMDM's hand placement: layers [1,3), S ~ U{1..3} in training


def placements(n_layer: int, max_block: int, loop_counts: list[int],
               uniform_counts: list[int] = ()) -> list[Placement]:
    """The baseline, then every block of 1..max_block layers for every loop count (> 1) with the
    count fixed in training, then every block with S ~ U{1..k} in training for k in uniform_counts."""
    grid = [BASELINE]
    for train_loops, counts in (("constant", loop_counts), ("uniform", uniform_counts)):
        for n_loops in sorted(set(counts) - {1}):
            for length in range(1, max_block + 1):
                for start in range(0, n_layer - length + 1):
                    grid.append(Placement(start, start + length, n_loops, train_loops))
    return grid


def trial_config(args: argparse.Namespace, placement: Placement, number: int, seed: int) -> TrialConfig:
    """The loopsearch TrialConfig of one placement and seed (the seed fixes data order, init and
    validation masks: rows of one seed are paired)."""
    strategy = (PluginRef(name="none") if placement.n_loops == 1 else
                PluginRef(name="fixed", params={"n_loops": placement.n_loops, "train_loops": placement.train_loops}))
    train_cfg = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, device="cpu",
                            precision="fp32", compile=False, eval_points=args.eval_points,
                            eval_sequences=args.eval_sequences, min_steps=1)
    return TrialConfig(
        study="placement_table", trial=number,
        backbone=PluginRef(name="transformer",
                           params={"n_layer": args.n_layer, "d_model": args.d_model, "n_heads": args.n_heads}),
        strategy=strategy, loop_start=placement.loop_start, loop_end=placement.loop_end,
        corpus=PluginRef(name="shakespeare"), vocab_size=args.vocab_size, train=train_cfg,
        budget=args.budget, seed=seed)


def load_data(vocab_size: int) -> PreparedData:
    """Tiny Shakespeare (shipped with the package), BPE-tokenised at ``vocab_size`` (cached)."""
    corpus_cls = get_registry().get("corpus", "shakespeare")
    return prepare(corpus_cls(corpus_cls.Params()), vocab_size)


def unigram_nll(data: PreparedData) -> float:
    """Cross-entropy (nats/token) of the validation split under the training split's unigram
    distribution (add-one smoothed): where an MDLM that learned only token frequencies sits."""
    counts = torch.bincount(data.train, minlength=data.vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return float(-logp[data.valid].mean())


def train_placement(args: argparse.Namespace, placement: Placement, number: int, seed: int,
                    data: PreparedData) -> dict:
    """Train one configuration from scratch; return its table row (without the shared settings)."""
    config = trial_config(args, placement, number, seed)
    torch.manual_seed(config.seed)
    model = checkpoint.build_model(config, data.vocab_size)
    start = time.perf_counter()
    result = train(model, data, config.train, config.budget, config.seed,
                   report=lambda gflops, nll: None, progress=False)
    wall = time.perf_counter() - start
    curve = [[point[0] / 1e9, point[1]] for point in result.history]
    validation = result.validation
    return {
        "loop_start": placement.loop_start, "loop_end": placement.loop_end,
        "block_length": placement.block_length, "n_loops": placement.n_loops, "strategy": placement.strategy,
        "train_loops": placement.train_loops, "label": placement.label(),
        "val_nll": result.val_nll, "val_se": result.val_se, "train_flops": result.train_flops, "steps": result.steps,
        # the final validation per (window, draw), window-major: rows of one seed share windows and
        # masks, so two placements' difference is paired (loopsearch/stats.py)
        "val_values": validation.flat() if validation is not None else [],
        "val_draws": validation.draws if validation is not None else 0,
        "inference_flops_per_token": model.inference_flops_per_token(config.train.seq_len),
        "n_params": sum(p.numel() for p in model.parameters()),
        "curve": curve, "wall_s": wall, "seed": config.seed,
    }


def settings(args: argparse.Namespace, data: PreparedData) -> dict:
    """The run's settings and provenance: constant columns of every row and parquet metadata."""
    return {
        "n_layer": args.n_layer, "d_model": args.d_model, "n_heads": args.n_heads, "seq_len": args.seq_len,
        "batch_size": args.batch_size, "lr": args.lr, "vocab_size": data.vocab_size, "budget": args.budget,
        "eval_points": args.eval_points, "eval_sequences": args.eval_sequences,
        "unigram_nll": unigram_nll(data), "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(), "date": dt.date.today().isoformat(),
    }


def write_table(rows: list[dict], meta: dict, path: Path, total_wall_s: float) -> pl.DataFrame:
    """Write the rows (plus the settings as constant columns) as parquet; return the frame."""
    frame = pl.DataFrame([{**row, **meta} for row in rows])
    meta = {**meta, "total_wall_s": round(total_wall_s, 1), "rows": len(rows)}
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path, metadata={METADATA_KEY: json.dumps(meta)})
    return frame


SETTING_KEYS = ("n_layer", "d_model", "n_heads", "seq_len", "batch_size", "lr", "vocab_size", "budget",
                "eval_points", "eval_sequences")


def resumable_rows(path: Path, meta: dict) -> list[dict]:
    """The rows of an earlier run of the same settings at ``path`` (to skip), or [] when there is
    none. A table of other settings is an error, not silently mixed in: pass --fresh or --output."""
    if not path.exists():
        return []
    frame = pl.read_parquet(path)
    if "train_loops" not in frame.columns or "val_values" not in frame.columns:
        raise SystemExit(f"{path} was written by an older version of this script (no train_loops/val_values "
                         "columns); pass --fresh to replace it or --output to write elsewhere")
    old = frame.row(0, named=True) if frame.height else {}
    differ = [key for key in SETTING_KEYS if old and old.get(key) != meta[key]]
    if differ:
        raise SystemExit(f"{path} holds a table of other settings ({', '.join(differ)} differ); pass --fresh "
                         "to replace it or --output to write elsewhere")
    own = set(frame.columns) - set(meta)
    return [{key: row[key] for key in own} for row in frame.iter_rows(named=True)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-layer", type=int, default=6, help="backbone depth")
    p.add_argument("--d-model", type=int, default=48, help="residual width")
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--lr", type=float, default=1e-2, help="peak learning rate")
    p.add_argument("--vocab-size", type=int, default=260, help="BPE vocabulary (260: the 256 bytes + 4 merges)")
    p.add_argument("--budget", type=parse_flops, default=parse_flops("1e12"), help="training FLOPs per configuration")
    p.add_argument("--eval-points", type=int, default=8, help="validations per run (the learning curve)")
    p.add_argument("--eval-sequences", type=int, default=1024,
                   help="validation windows of the final validation (the learning curve's use 64)")
    p.add_argument("--max-block", type=int, default=3, help="longest loop block, layers")
    p.add_argument("--loops", type=int, nargs="+", default=[2, 3],
                   help="loop counts of the looped rows (the count fixed in training)")
    p.add_argument("--uniform-loops", type=int, nargs="*", default=[3],
                   help="loop counts k of rows trained with S ~ U{1..k} (LoopMDM's strategy; [1,3) U is the paper's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds (data order, init and validation masks); every configuration runs once per seed, "
                        "cell by cell, so a partial table holds whole cells")
    p.add_argument("--limit", type=int, default=None, help="train only the first N configurations (baseline first)")
    p.add_argument("--cells", nargs="+", default=None, metavar="LABEL",
                   help="train only these cells, in this order (labels as in the table: baseline, '[1,3)x3 U', "
                        "'[4,6)x2'); a later run without --cells adds the rest to the same --output")
    p.add_argument("--shard", default="0/1", help="I/N: train only every N-th row still to do, from the I-th "
                   "(N processes, each with its own --output copied from the same partial table, then --merge)")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="write the union of these tables (same settings; one row per cell and seed) to --output")
    p.add_argument("--fresh", action="store_true",
                   help="start over; by default rows already in --output (same settings) are kept and skipped")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="parquet file written")
    return p.parse_args(argv)


ROW_KEY = ("loop_start", "loop_end", "n_loops", "train_loops", "seed")


def merge(paths: list[Path], output: Path) -> pl.DataFrame:
    """The union of tables written by shards of one run (their settings must agree): one row per
    cell and seed (the first table's row where several have it); the parquet metadata of the first."""
    frames = [pl.read_parquet(p) for p in paths]
    for p, f in zip(paths[1:], frames[1:]):
        differ = [k for k in SETTING_KEYS if f.height and frames[0].height and f[k][0] != frames[0][k][0]]
        if differ:
            raise SystemExit(f"{p} has other settings than {paths[0]} ({', '.join(differ)} differ)")
    frame = pl.concat(frames, how="diagonal_relaxed").unique(subset=list(ROW_KEY), keep="first", maintain_order=True)
    meta = json.loads(pl.read_parquet_metadata(paths[0]).get(METADATA_KEY, "{}"))
    meta.update(rows=frame.height, total_wall_s=round(float(frame["wall_s"].sum()), 1), merged=[str(p) for p in paths])
    output.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(output, metadata={METADATA_KEY: json.dumps(meta)})
    return frame


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.merge:
        frame = merge(args.merge, args.output)
        print(f"wrote {args.output}: {frame.height} rows from {len(args.merge)} tables")
        return
    torch.set_num_threads(args.threads)
    data = load_data(args.vocab_size)
    meta = settings(args, data)
    grid = placements(args.n_layer, args.max_block, args.loops, args.uniform_loops)[: args.limit]
    number = {placement: i for i, placement in enumerate(grid)}  # a cell's trial number: its place in the full grid
    if args.cells:
        by_label = {placement.label(): placement for placement in grid}
        unknown = [label for label in args.cells if label not in by_label]
        if unknown:
            loops, uniform = " ".join(map(str, args.loops)), " ".join(map(str, args.uniform_loops))
            raise SystemExit(f"--cells: no cell {', '.join(map(repr, unknown))} in this grid; labels look like "
                             f"'baseline', '[1,3)x3 U', '[4,6)x2' (--max-block {args.max_block}, --loops {loops}, "
                             f"--uniform-loops {uniform})")
        grid = [by_label[label] for label in dict.fromkeys(args.cells)]
    rows = [] if args.fresh else resumable_rows(args.output, meta)
    done = {(row["loop_start"], row["loop_end"], row["n_loops"], row["train_loops"], row["seed"]) for row in rows}
    # cell-major: every seed of a cell before the next cell, so a partial table holds whole cells
    todo = [(seed, number[placement], placement) for placement in grid for seed in args.seeds
            if (*placement.key, seed) not in done]
    shard, shards = (int(x) for x in args.shard.split("/"))
    todo = todo[shard::shards]
    print(f"{len(grid)} configurations x {len(args.seeds)} seeds, {format_flops(args.budget)} each; "
          f"{len(rows)} rows kept from {args.output}, {len(todo)} to train; unigram plateau "
          f"{meta['unigram_nll']:.3f} nats/token; settings {json.dumps(meta)}", flush=True)
    start = time.perf_counter()
    previous_wall = sum(row["wall_s"] for row in rows)
    for n, (seed, i, placement) in enumerate(todo):
        row = train_placement(args, placement, i, seed, data)
        rows.append(row)
        first = row["curve"][0][1]
        print(f"[{n + 1:3d}/{len(todo)}] seed {seed} {placement.label():14s} val NLL {row['val_nll']:.4f} "
              f"+- {row['val_se']:.4f} (first eval {first:.4f}) {row['steps']:4d} steps {row['wall_s']:5.1f} s "
              f"elapsed {time.perf_counter() - start:6.0f} s", flush=True)
        # a partial table survives a crash, and a rerun continues from it
        write_table(rows, meta, args.output, previous_wall + time.perf_counter() - start)
    total = previous_wall + time.perf_counter() - start
    frame = write_table(rows, meta, args.output, total)
    best = frame.sort("val_nll").row(0, named=True)
    print(f"wrote {args.output} ({len(rows)} rows) in {total:.0f} s; best {best['strategy']} "
          f"[{best['loop_start']},{best['loop_end']})x{best['n_loops']} val NLL {best['val_nll']:.4f}; "
          f"unigram plateau {meta['unigram_nll']:.4f}")
    if not math.isfinite(best["val_nll"]):
        raise SystemExit("non-finite val NLL in the table")


if __name__ == "__main__":
    main()
