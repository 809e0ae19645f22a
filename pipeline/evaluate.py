"""Eval stage: base vs the shipped model on the run's synthetic test split (prep/beir_test), with BM25 and
its fusion with the base as reference rows, and a report that says when a difference is within noise."""

from __future__ import annotations

from pipeline.models import resolve_embedder
from pipeline.report import format_table, print_wins_and_losses, write_report
from pipeline.retrieval import evaluate_models


def run_stage(cfg, run, rec) -> None:
    # A location, not this machine's path: Ray workers on other nodes fetch a bucket run's model themselves.
    models = {"base": resolve_embedder(cfg.train.base_model), "fine-tuned": f"{run.location}/merge/model"}
    result = evaluate_models(run.root / "prep" / "beir_test", models, cfg.eval.top_k,
                             run.root / "cache" / "eval", cfg.eval.texts_per_batch)
    weight = run.require("merge", "eval").counts["weight"]
    shipped = "" if weight == 1 else f" ('fine-tuned' is the shipped model: {weight:g} x fine-tuned + {1 - weight:g} x base)"
    summary = write_report(result, rec.dir, "Retrieval on the synthetic test split" + shipped)
    print(format_table(result.means))
    print(*summary["verdicts"], sep="\n")
    print_wins_and_losses(result, "base", "fine-tuned")
    sig = summary["comparison"]["fine-tuned"]["ndcg@10"]
    rec.manifest.counts = {"queries": len(result.data.qrels), "ndcg@10_base": result.means["base"]["ndcg@10"],
                           "ndcg@10_fine_tuned": result.means["fine-tuned"]["ndcg@10"],
                           "ndcg@10_p_value": sig["p_value"],
                           "ndcg@10_references": {r: result.means[r]["ndcg@10"] for r in result.references}}
