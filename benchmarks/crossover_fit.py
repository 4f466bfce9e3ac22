"""Where the looped arm would cross the baseline: the budget sweep's paired table, crossover verdict
and power-law fits over one or more sweep studies of the same recipe (issue 12).

A sweep study cannot grow new budgets after it was created (Optuna fixes a parameter's choices), so
a larger budget is run as a second study of the same recipe and seeds (same data order, masks and
validation windows) and joined here. The per-(arm, budget, seed) values are written to a CSV so the
published figures can be recomputed without the database:

    python benchmarks/crossover_fit.py --studies xover_d48,xover_d48_16 --csv benchmarks/crossover_d48.csv
    python benchmarks/crossover_fit.py --csv benchmarks/crossover_d48.csv        # from the CSV alone

Prints, for every arm: the paired differences from the baseline per budget (mean over seeds, 95% t
interval), the crossover verdict (loopsearch/results/sweep.py), the fit L(C) = E + A (C/C0)^-alpha on
every budget but the largest with its prediction checked at the largest (held out above the fitted
range), and the fit on every budget with its predicted crossover (95% bootstrap over seeds).
"""

from __future__ import annotations

import argparse
import csv

import polars as pl


def rows_from_studies(names: list[str], storage: str | None) -> list[dict]:
    from loopsearch.results import sweep
    from loopsearch.search import study as studies

    frames = []
    for name in names:
        st, spec = studies.load(name, storage)
        df = sweep.frame(st).with_columns(pl.lit(name).alias("study"),
                                          pl.lit(sweep.baseline_arm(spec)).alias("baseline"))
        frames.append(df)
    return pl.concat(frames, how="vertical_relaxed").to_dicts()


def main() -> None:
    from loopsearch.results import scaling_fit, sweep

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", help="comma-separated sweep studies of one recipe (else read --csv)")
    ap.add_argument("--csv", help="write the per-seed rows here (with --studies), or read them (without)")
    ap.add_argument("--storage", default=None)
    ap.add_argument("--bootstrap", type=int, default=400)
    args = ap.parse_args()
    keep = ("study", "arm", "baseline", "budget", "seed_offset", "val_nll", "steps", "val_windows", "val_draws",
            "eval_key")
    if args.studies:
        rows = [{k: r.get(k) for k in keep} for r in rows_from_studies(args.studies.split(","), args.storage)]
        if args.csv:
            with open(args.csv, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keep[:-3])
                w.writeheader()
                w.writerows({k: r[k] for k in keep[:-3]} for r in rows)
    else:
        with open(args.csv) as f:
            rows = [{**r, "budget": float(r["budget"]), "seed_offset": int(r["seed_offset"]),
                     "val_nll": float(r["val_nll"]), "steps": int(r["steps"]), "val_windows": None,
                     "val_draws": None, "eval_key": None} for r in csv.DictReader(f)]
    base = rows[0]["baseline"]
    df = pl.DataFrame([{k: r[k] for k in ("arm", "budget", "seed_offset", "val_nll", "val_windows", "val_draws",
                                          "eval_key")} for r in rows],
                      schema={"arm": pl.Utf8, "budget": pl.Float64, "seed_offset": pl.Int64, "val_nll": pl.Float64,
                              "val_windows": pl.List(pl.Float64), "val_draws": pl.Int64, "eval_key": pl.Utf8})
    pairs = sweep.paired(df, base)
    print("| budget (FLOPs) | seeds | baseline val NLL | looped val NLL | Δ looped - baseline | 95% interval "
          "| in words |")
    print("|---|---|---|---|---|---|---|")
    curves = {(c["arm"], c["budget"]): c for c in sweep.curves(df)}
    for p in pairs:
        print(f"| {p['budget']:.3g} | {p['pairs']} | {curves[(base, p['budget'])]['val_nll']:.4f} | "
              f"{curves[(p['arm'], p['budget'])]['val_nll']:.4f} | {p['delta']:+.4f} | "
              f"[{p['lo']:+.4f}, {p['hi']:+.4f}] | {p['verdict']} |")
    for arm in sorted({p["arm"] for p in pairs}):
        print(f"\n{arm}: {sweep.crossover([p for p in pairs if p['arm'] == arm])['verdict']}")
        fit_rows = [{k: r[k] for k in ("arm", "budget", "seed_offset", "val_nll")} for r in rows]
        budgets = sorted({r["budget"] for r in fit_rows})
        if len(budgets) >= 4:
            held = scaling_fit.predict(fit_rows, base, arm, hold_out=budgets[-1], n_boot=args.bootstrap)
            print(f"fit without {budgets[-1]:.3g}: {held['words']}")
            print(f"  {scaling_fit.hold_out_words(held['hold_out'])}")
        full = scaling_fit.predict(fit_rows, base, arm, n_boot=args.bootstrap)
        f = full["fit"]
        print(f"fit on every budget: {full['words']}")
        print(f"  baseline E={f[base]['E']:.3f} A={f[base]['A']:.3f} alpha={f[base]['alpha']:.3f}; "
              f"{arm} E={f[arm]['E']:.3f} A={f[arm]['A']:.3f} alpha={f[arm]['alpha']:.3f}")


if __name__ == "__main__":
    main()
