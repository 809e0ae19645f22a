"""Diagnostic: the WiSE-FT curve of a finished SciFact run on SciFact's 300 human test claims.

    .venv/bin/python benchmarks/merge_curve.py RUN_DIR [--weights 0.25 0.5 0.75]

Mixes `a x fine-tuned + (1 - a) x base` (the merge stage's own Merger) for each weight and scores base,
every mix and the model as trained on the human test claims over the whole corpus. This reads the test
queries, so it never chooses a weight: it says whether a fixed default other than 1 would have helped,
and how much of a run's loss or gain survives a half-way mix. Writes
benchmarks/results/scifact-merge-curve-<run folder name>.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_result  # noqa: E402
from benchmarks.scifact import SCIFACT, TABLE_METRICS  # noqa: E402
from pipeline.merge import Merger  # noqa: E402
from pipeline.models import resolve_embedder  # noqa: E402
from pipeline.report import compare, format_table  # noqa: E402
from pipeline.retrieval import evaluate_models  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="A finished run folder of benchmarks/scifact.py (its train/model is used).")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--data", default=str(SCIFACT))
    args = ap.parse_args()

    run = Path(args.run)
    base = resolve_embedder("minilm")
    merger = Merger(base, str(run / "train" / "model"))
    models = {"base": base}
    for a in args.weights:
        folder = run / "cache" / "merge_curve" / f"weight-{a:g}"
        if not (folder / "config.json").exists():
            merger.save(a, folder)
        models[f"a={a:g}"] = str(folder)
    models["a=1 (as trained)"] = str(run / "train" / "model")
    result = evaluate_models(args.data, models, 100, run / "cache" / "scifact_eval", 64, references=False)
    comparison = compare(result.per_query, ("ndcg@10", "recall@100"), base="base")
    print(format_table(result.means, TABLE_METRICS))
    path = write_result(f"scifact-merge-curve-{run.name}", {
        "run": run.name, "weights": args.weights, "human": result.means,
        "significance": {m: comparison[m] for m in models if m != "base"}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
