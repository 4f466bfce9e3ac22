"""Training throughput of loopsearch's looped masked-diffusion transformer: tokens/s, FLOP/s, MFU.

What it measures: full training steps (MDLM loss from ``loopsearch.diffusion.diffusion_loss``,
backward, AdamW step) of an 8-layer, d_model 256, 4-head transformer at seq 128 and batch 32,
on random token ids (vocab 2048), for two configs:

- ``plain``: no looping (strategy ``none``), every layer runs once;
- ``looped``: layers [2, 4) run 3 times (strategy ``fixed``, n_loops 3).

For each config and dtype (fp32, and bf16 = ``torch.autocast(device, dtype=torch.bfloat16)``) it
reports tokens/s, the achieved FLOP/s and MFU. FLOPs per step come from the project's one FLOP
accounting, ``LoopedMDM.train_step_flops`` (see loopsearch/flops.py: matmuls only, training = 3x
forward, every loop application counted). MFU is achieved FLOP/s divided by a peak that this
script measures in the same run: the FLOP/s of large square matmuls (F.linear, the op nn.Linear
runs) of the same dtype on the same device, 2 * n^3 FLOPs per n x n matmul. It is a practical
peak, not a data-sheet one.

Each row runs up to --warmup untimed then --steps timed steps, but stops once its steps have taken
--max-row-s seconds (at least one step is timed; the table shows how many steps were timed and how
many warmup steps preceded them; with --compile one extra untimed step compiles first). That keeps
the default run at 1-3 minutes on 2 CPU cores, where one bf16 step takes about a minute (no bf16
matmul units on AVX2 CPUs) and one fp32 step ~1.5 s.

Run::

    python benchmarks/train_throughput.py                 # auto device, fp32 and bf16
    python benchmarks/train_throughput.py --device cuda --steps 50 --compile
    python benchmarks/train_throughput.py --steps 5 --warmup 1 --max-row-s 600  # all rows warmed (~15 min, CPU)
    python benchmarks/train_throughput.py --dtypes fp32 --sdpa math --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from loopsearch.diffusion import diffusion_loss
from loopsearch.looping import LoopedMDM, NoParams
from loopsearch_builtins.strategies import FixedLoops, FixedParams, NoLoop
from loopsearch_builtins.transformer import Transformer, TransformerParams

N_LAYER, D_MODEL, N_HEADS, SEQ_LEN, BATCH, VOCAB = 8, 256, 4, 128, 32, 2048
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONFIGS = {  # name -> strategy factory
    "plain": lambda: (NoLoop(NoParams(), D_MODEL), 0, 0),
    "looped (fixed x3, layers 2-4)": lambda: (FixedLoops(FixedParams(n_loops=3), D_MODEL), 2, 4),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flop_per_s(dtype: torch.dtype, device: torch.device, n: int, warmup: int, repeats: int) -> float:
    """FLOP/s of n x n matmuls in ``dtype`` (2 * n^3 FLOPs each), as F.linear(a, b) = a @ b.T: the
    layout nn.Linear runs. (On CPUs without native bf16 GEMM, torch's bf16 a @ b with both operands
    row-major takes a far slower path: 0.3 GFLOP/s at n=2048 on an AVX2 EPYC, so it is no peak.)"""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        F.linear(a, b)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        F.linear(a, b)
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def train_throughput(make_strategy, dtype: str, device: torch.device, steps: int, warmup: int,
                     max_row_s: float, compile: bool, sdpa_math: bool, full_head: bool = False) -> dict:
    """Run ``warmup`` untimed then ``steps`` timed training steps; return tokens/s and FLOP/s.

    A row stops early once its steps have taken ``max_row_s`` seconds in all, keeping at least one
    timed step: if the budget runs out during warmup, the last step run is the one timed
    (``warmup_steps`` < ``warmup``: it may include one-time costs; that happens when one step takes
    about as long as the budget, e.g. bf16 on a CPU without bf16 matmul units)."""
    torch.manual_seed(0)
    backbone = Transformer(TransformerParams(n_layer=N_LAYER, d_model=D_MODEL, n_heads=N_HEADS), VOCAB, SEQ_LEN)
    model = LoopedMDM(backbone, *make_strategy()).to(device)
    forward = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)  # masks, t and loop counts (as in train.py)
    mask_id = model.backbone.mask_id
    attention = sdpa_kernel(SDPBackend.MATH) if sdpa_math else contextlib.nullcontext()

    def step() -> float:
        """One training step on random tokens; returns its FLOPs (what ran, as train.py counts)."""
        x0 = torch.randint(0, VOCAB, (BATCH, SEQ_LEN), generator=gen).to(device)
        n_loops = model.strategy.train_loops(gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss, out = diffusion_loss(forward, x0, mask_id, gen, n_loops, positions=not full_head)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # the head ran only at the masked positions (out.head_share): charged what ran
        return model.train_step_flops(SEQ_LEN, BATCH, out.applications, out.extra_flops, out.head_share)

    model.train()
    seconds, flops = [], []  # per step
    with attention:
        if compile:
            step()  # compilation: untimed, outside the row's time budget
        while len(seconds) < warmup + steps and sum(seconds) < max_row_s:
            sync(device)
            t0 = time.perf_counter()
            flops.append(step())
            sync(device)
            seconds.append(time.perf_counter() - t0)
    first = min(warmup, len(seconds) - 1)  # drop the warmup steps, keep at least one
    s, f, n = sum(seconds[first:]), sum(flops[first:]), len(seconds) - first
    return {"tokens_per_s": n * BATCH * SEQ_LEN / s, "achieved_flop_per_s": f / s, "step_flop": f / n,
            "timed_steps": n, "warmup_steps": first, "timed_s": s}


def si(x: float, unit: str) -> str:
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per row (at most)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed training steps per row")
    ap.add_argument("--max-row-s", type=float, default=15.0,
                    help="stop a row once its steps took this many seconds (keeps >= 1 timed step)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--sdpa", default="default", choices=["default", "math"], help="attention backend")
    ap.add_argument("--matmul-size", type=int, default=None,
                    help="n of the n x n peak matmul (default 2048 cpu, 8192 cuda)")
    ap.add_argument("--matmul-repeats", type=int, default=None, help="timed peak matmuls (default 5 cpu, 50 cuda)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per row instead of a table")
    ap.add_argument("--full-head", action="store_true",
                    help="run the output head on every position (before issue 13; default: masked positions only)")
    ap.add_argument("--shape", default=None, metavar="L,D,H,T,B,V",
                    help="layers, d_model, heads, seq_len, batch, vocab (default 8,256,4,128,32,2048; the "
                         "paper's: 12,768,12,1024,8,50257)")
    args = ap.parse_args()
    if args.shape:
        global N_LAYER, D_MODEL, N_HEADS, SEQ_LEN, BATCH, VOCAB
        try:
            N_LAYER, D_MODEL, N_HEADS, SEQ_LEN, BATCH, VOCAB = (int(x) for x in args.shape.split(","))
        except ValueError:
            ap.error(f"--shape {args.shape!r}: give six integers L,D,H,T,B,V, e.g. 12,768,12,1024,8,50257")

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    n = args.matmul_size or (8192 if cuda else 2048)
    repeats = args.matmul_repeats or (50 if cuda else 5)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if unknown := set(dtypes) - set(DTYPES):
        ap.error(f"unknown dtype(s) {sorted(unknown)}; choose from {list(DTYPES)}")

    peaks = {d: matmul_peak_flop_per_s(DTYPES[d], device, n, warmup=2, repeats=repeats) for d in dtypes}
    rows = []
    for name, make_strategy in CONFIGS.items():
        for d in dtypes:
            r = train_throughput(make_strategy, d, device, args.steps, args.warmup, args.max_row_s,
                                 args.compile, args.sdpa == "math", args.full_head)
            rows.append({"config": name, "dtype": d, **r, "peak_flop_per_s": peaks[d],
                         "mfu_pct": 100 * r["achieved_flop_per_s"] / peaks[d]})

    if args.json:
        meta = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                "compile": args.compile, "sdpa": args.sdpa, "full_head": args.full_head, "max_row_s": args.max_row_s,
                "matmul_size": n, "n_layer": N_LAYER, "d_model": D_MODEL, "n_heads": N_HEADS,
                "seq_len": SEQ_LEN, "batch": BATCH, "vocab": VOCAB}
        for row in rows:
            print(json.dumps({**row, **meta}))
        return

    name = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name} | torch {torch.__version__} | compile={args.compile} sdpa={args.sdpa} | "
          f"{N_LAYER} layers, d_model {D_MODEL}, {N_HEADS} heads, seq {SEQ_LEN}, batch {BATCH} | "
          f"up to {args.warmup} warmup + {args.steps} timed steps or {args.max_row_s:g} s per row")
    print("peak = measured " + ", ".join(f"{d} {n}x{n} matmul: {si(p, 'FLOP/s')}" for d, p in peaks.items()))
    header = ["config", "dtype", "tokens/s", "achieved FLOP/s", "peak FLOP/s (measured)", "MFU %",
              "timed (warmup) steps"]
    table = [[r["config"], r["dtype"], f"{r['tokens_per_s']:,.0f}", si(r["achieved_flop_per_s"], "FLOP/s"),
              si(r["peak_flop_per_s"], "FLOP/s"), f"{r['mfu_pct']:.1f}", f"{r['timed_steps']} ({r['warmup_steps']})"]
             for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *table)]
    for i, line in enumerate([header, *table]):
        print("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
