"""Language-model unlearning on the fictitious facts: TOFU's table for forget 5% of authors.

Command (from the repository root, CPU is enough):

    nice -n 10 python experiments/lm_facts.py --out runs/lm_facts     # 3 seeds, every method

Measured 2026-11-30 (2 CPU cores shared with other jobs at load 6-20, ``nice -n 10``; jax 0.10.2):
1822 s in all, of which 1120 s training the 3 full models and 3 oracles in one vmap (times are
inflated 2-5x by the load; ``time_s`` is seed 0's unlearning, compilation included). Data: 40
training authors, 10 holdout authors, world facts; forget 2 authors (12 question-answer pairs), 284
retain pairs; lm-tiny (475,776 parameters), 30 epochs. Mean +- sd over 3 seeds (population sd; the
KS p-values of 12 questions take few distinct values, hence NPO's sd 0); ``relearn_before`` is the
held-out forget ROUGE-L before the attack:

    method     forget_quality        model_utility   forget_rouge    retain_rouge    privleak         relearn         relearn_before  time_s
    ---------  --------------------  --------------  --------------  --------------  ---------------  --------------  --------------  ------
    retrain    9.12e-01 +- 6.10e-02  0.455 +- 0.067  0.598 +- 0.003  1.000 +- 0.000  0.003 +- 0.075   0.626 +- 0.125  0.627           186.7
    original   6.69e-02 +- 4.62e-02  0.478 +- 0.049  1.000 +- 0.000  1.000 +- 0.000  -1.000 +- 0.000  0.900 +- 0.029  1.000           -
    ga         6.47e-01 +- 1.57e-01  0.136 +- 0.069  0.099 +- 0.074  0.169 +- 0.093  0.473 +- 0.223   0.413 +- 0.090  0.065           18.6
    npo        5.36e-01 +- 0.00e+00  0.461 +- 0.055  0.295 +- 0.102  0.945 +- 0.010  0.622 +- 0.131   0.726 +- 0.023  0.276           19.5
    sam_npo    6.65e-01 +- 2.89e-01  0.457 +- 0.059  0.285 +- 0.087  0.947 +- 0.022  0.761 +- 0.070   0.691 +- 0.039  0.265           22.4
    grad_diff  6.47e-01 +- 1.57e-01  0.401 +- 0.049  0.158 +- 0.084  0.738 +- 0.171  0.761 +- 0.147   0.615 +- 0.111  0.141           24.3
    simnpo     7.08e-01 +- 3.24e-01  0.478 +- 0.062  0.417 +- 0.093  0.996 +- 0.000  -0.071 +- 0.310  0.755 +- 0.030  0.444           22.1
    idkpo      1.19e-01 +- 1.05e-01  0.481 +- 0.045  0.033 +- 0.024  1.000 +- 0.000  -0.898 +- 0.041  0.879 +- 0.024  0.050           30.2
    rmu        4.42e-02 +- 4.10e-02  0.475 +- 0.051  0.740 +- 0.147  1.000 +- 0.000  -1.000 +- 0.000  0.858 +- 0.034  0.744           22.7

The issue's claims on this table:

* Fit: the full models answer 100% of forget and 100% of retain questions with ROUGE-L recall >= 0.9
  (mean forget and retain ROUGE-L recall 1.000, all 3 seeds). Holds.
* The oracle's forget quality is high: 0.912 +- 0.061 (per seed 0.87, 1.00, 0.87) against an oracle
  of another seed, the original's 0.067 (0.001, 0.10, 0.10). Holds. With only 12 forget questions
  the KS test is weak: the original model is not rejected at 0.05 on two seeds of three.
* Gradient ascent collapses model utility first: GA 0.136 +- 0.069 (retain ROUGE 0.169), every other
  method >= 0.401 (GradDiff, whose retain term slows the collapse), NPO 0.461, oracle 0.455. Holds.
* NPO keeps utility better than GA at comparable forget quality: forget quality 0.536 vs 0.647 (both
  far above the original's 0.067 and within each other's spread), utility 0.461 vs 0.136, retain
  ROUGE 0.945 vs 0.169. Holds. GA's forget ROUGE (0.099) is lower than NPO's (0.295), but both are
  BELOW the oracle's 0.598: the answers are templated ("... was born in ... in 19xx"), so a model that
  never saw an author still recalls 60% of the answer words, and lower is over-unlearning, not better
  forgetting (PrivLeak > 0 for GA, NPO, SAM-NPO, GradDiff says the same: the forget answers became
  less likely than unseen authors').
* SAM variants recover less after the relearning attack: held-out forget ROUGE after 10 AdamW steps on
  4 forget pairs is 0.691 +- 0.039 for SAM-NPO against 0.726 +- 0.023 for NPO (lower on each seed:
  0.707/0.637/0.729 vs 0.716/0.704/0.758) from the same starting point (0.265 vs 0.276). Holds in
  direction on every seed, but the gap (0.035) is small next to the seed spread and to the oracle's
  own 0.626 after the attack (what templated answers let a model infer): at rho = 0.01 and 20 steps
  SAM buys little robustness here; both recover to above the oracle, i.e. part of what NPO removed
  was hidden, not erased. GA's 0.413 is below the oracle's because the collapsed model relearns
  slowly, not because it is robust.

Other rows: IdkPO refuses (forget ROUGE 0.033) yet keeps the answers' likelihood (PrivLeak -0.90,
forget quality 0.12, relearn 0.88: hidden, not removed, as the TOFU and NPO papers find for refusal
training). RMU at these settings (layer 1 of 2, c = 40, 20 steps) barely forgets (forget ROUGE 0.74,
forget quality 0.044, PrivLeak -1): it is under-tuned for this model and was left as the registry
has it (the issue's claims do not involve it). No registry setting was changed for this table.

The run is :func:`unlearn_jax.apps.lm_bench.run_lm_benchmark` (the same code as
``unlearn-jax bench --data facts --forget authors:0.05 --methods ga,grad_diff,npo,simnpo,idkpo,rmu,
sam_npo --seeds 3``) with its default data and model; this script adds the mean +- sd table, the
checks of the issue's claims on the measured numbers, and writes ``results.json``, ``table.txt``
and the plots of :func:`~unlearn_jax.apps.lm_bench.write_lm_outputs` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax

from unlearn_jax.apps import lm_bench
from unlearn_jax.evaluation import format_table

# The rows the orderings need first (GA, NPO, SAM-NPO), should a run be cut short.
METHODS = ("ga", "npo", "sam_npo", "grad_diff", "simnpo", "idkpo", "rmu")
SHOWN = (
    ("forget_quality", "forget_quality", ".2e"),
    ("model_utility", "model_utility", ".3f"),
    ("forget_rouge", "forget/rouge_l", ".3f"),
    ("retain_rouge", "retain/rouge_l", ".3f"),
    ("privleak", "privleak", ".3f"),
    ("relearn", "relearn/rouge_after", ".3f"),
)


def mean_sd_table(record) -> str:
    """The benchmark's rows as ``mean +- sd`` over seeds (sd: population, ``np.std``)."""
    rows = []
    for row in record["rows"]:
        if "error" in row:
            rows.append({"method": row["method"], "error": row["error"]})
            continue
        out = {"method": row["method"]}
        for column, key, spec in SHOWN:
            mean, sd = row["mean"][key], row["std"][key]
            out[column] = f"{mean:{spec}} +- {sd:{spec}}"
        out["relearn_before"] = f"{row['mean']['relearn/rouge_before']:.3f}"
        out["time_s"] = "-" if row["time_s"] is None else f"{row['time_s']:.1f}"
        rows.append(out)
    return format_table(rows)


def claims(record) -> list[str]:
    """The issue's orderings, each checked on the measured means (True / False and the figures)."""
    rows = {r["method"]: r["mean"] for r in record["rows"] if "error" not in r}
    answered = record["training"]["answered"]
    lines = [
        f"fit: full models answer {answered['forget']:.1%} of forget and "
        f"{answered['retain']:.1%} of retain questions with ROUGE-L recall >= 0.9 "
        f"(claim >= 90%: {min(answered['forget'], answered['retain']) >= 0.9})",
    ]
    if "retrain" in rows and "original" in rows:
        fq_r, fq_o = rows["retrain"]["forget_quality"], rows["original"]["forget_quality"]
        lines.append(
            f"oracle forget quality {fq_r:.3g} (original {fq_o:.3g}; p > 0.05 means "
            f"indistinguishable from an independent oracle): {fq_r > 0.05}"
        )
    methods = [m for m in rows if m not in ("retrain", "original")]
    if methods:
        utility = {m: rows[m]["model_utility"] for m in methods}
        lowest = min(utility, key=utility.get)
        lines.append(
            "lowest model utility: "
            + ", ".join(f"{m} {u:.3f}" for m, u in sorted(utility.items(), key=lambda kv: kv[1]))
            + f" (GA lowest: {lowest == 'ga'})"
        )
    if "ga" in rows and "npo" in rows:
        ga, npo = rows["ga"], rows["npo"]
        lines.append(
            f"NPO vs GA: utility {npo['model_utility']:.3f} vs {ga['model_utility']:.3f}, forget "
            f"quality {npo['forget_quality']:.3g} vs {ga['forget_quality']:.3g}, forget ROUGE "
            f"{npo['forget/rouge_l']:.3f} vs {ga['forget/rouge_l']:.3f}"
        )
    if "npo" in rows and "sam_npo" in rows:
        a, b = rows["npo"], rows["sam_npo"]
        lines.append(
            f"relearning (held-out forget ROUGE before -> after): NPO "
            f"{a['relearn/rouge_before']:.3f} -> {a['relearn/rouge_after']:.3f}, SAM-NPO "
            f"{b['relearn/rouge_before']:.3f} -> {b['relearn/rouge_after']:.3f} (SAM recovers "
            f"less: {b['relearn/rouge_after'] < a['relearn/rouge_after']})"
        )
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--forget", default="authors:0.05")
    parser.add_argument("--out", default=None, help="write results.json, table.txt, plots here")
    args = parser.parse_args(argv)
    config = lm_bench.LMBenchConfig(
        forget=args.forget, methods=tuple(m for m in args.methods.split(",") if m),
        seeds=args.seeds,
    )  # fmt: skip
    start = time.perf_counter()
    partial = Path(args.out, "rows.jsonl") if args.out else None
    if partial is not None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text("")

    def on_row(row):
        print(f"  {row['method']}: " + ", ".join(
            f"{k}={row.get(k, float('nan')):.3g}" for k in ("forget_quality", "model_utility",
            "forget_rouge", "retain_rouge", "privleak", "relearn")
        ) + f" ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
        if partial is not None:  # what a run cut short leaves
            with partial.open("a") as f:
                f.write(json.dumps(row, default=float) + "\n")

    record = lm_bench.run_lm_benchmark(
        config, progress=lambda msg: print(msg, flush=True), on_row=on_row
    )
    print()
    print(lm_bench.format_lm_table(record))
    print(f"\nmean +- sd over {config.seeds} seeds:\n{mean_sd_table(record)}")
    record["claims"] = claims(record)
    print("\n" + "\n".join(record["claims"]))
    wall = time.perf_counter() - start
    print(
        f"\ntraining {record['training']['wall_time_s']:.0f} s, total {wall:.0f} s, "
        f"jax {jax.__version__}, {jax.devices()[0].platform}"
    )
    if args.out:
        paths = lm_bench.write_lm_outputs(record, args.out)
        Path(args.out, "mean_sd.txt").write_text(mean_sd_table(record) + "\n")
        print(f"results: {paths['results']}")
    return record


if __name__ == "__main__":
    main()
