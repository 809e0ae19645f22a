"""Eval stage: base vs the shipped model on the run's synthetic test split (prep/beir_test), with BM25 and
its fusion with the base as reference rows, and a report that says when a difference is within noise. When
the rerank stage shipped a reranker, a row reorders the shipped model's top hits with it, compared with the
shipped model alone too."""

from __future__ import annotations

from pipeline.models import resolve_embedder
from pipeline.report import format_table, print_wins_and_losses, write_report
from pipeline.retrieval import evaluate_models, reranked_label


def run_stage(cfg, run, rec) -> None:
    # A location, not this machine's path: Ray workers on other nodes fetch a bucket run's model themselves.
    models = {"base": resolve_embedder(cfg.train.base_model), "fine-tuned": f"{run.location}/merge/model"}
    reranker = str(run.root / "rerank" / "model") if run.require("rerank", "eval").counts.get("shipped") else None
    result = evaluate_models(run.root / "prep" / "beir_test", models, cfg.eval.top_k,
                             run.root / "cache" / "eval", cfg.eval.texts_per_batch, reranker=reranker,
                             rerank_top_k=cfg.rerank.top_k)
    weight = run.require("merge", "eval").counts["weight"]
    shipped = "" if weight == 1 else f" ('fine-tuned' is the shipped model: {weight:g} x fine-tuned + {1 - weight:g} x base)"
    also = (("fine-tuned", reranked_label("fine-tuned")),) if reranker else ()
    summary = write_report(result, rec.dir, "Retrieval on the synthetic test split" + shipped, also=also)
    print(format_table(result.means))
    print(*summary["verdicts"], sep="\n")
    print_wins_and_losses(result, "base", "fine-tuned")
    sig = summary["comparison"]["fine-tuned"]["ndcg@10"]
    rec.manifest.counts = {"queries": len(result.data.qrels), "ndcg@10_base": result.means["base"]["ndcg@10"],
                           "ndcg@10_fine_tuned": result.means["fine-tuned"]["ndcg@10"],
                           "ndcg@10_p_value": sig["p_value"],
                           "ndcg@10_references": {r: result.means[r]["ndcg@10"] for r in result.references}}
    if reranker:
        rec.manifest.counts.update({"ndcg@10_reranked": result.means[reranked_label("fine-tuned")]["ndcg@10"],
                                    "rerank_ms_per_query": result.rerank_ms_per_query})
