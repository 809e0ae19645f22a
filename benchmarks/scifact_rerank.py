"""Does a reranker trained on zero-label data help people's queries? SciFact, issue 33.

The run folder's SDG output is seeded from the committed whole-corpus claims of Qwen2.5-Coder-0.5B
(results/scifact-sdg-qwen2.5-coder-0.5b.parquet, with the config that wrote them), so no LLM runs here.
prep mines hard negatives with the base model; the embedder is not fine-tuned (train.max_steps=1 and
merge.weight=0 ship the base), so what is measured is the reranker alone over the base embedder's top k.
The rerank stage trains the cross-encoder (the base embedder's transformer with a new head) and gates it on
the val split; then the 300 human test claims are scored over the whole corpus, base alone vs base + reranker
at each top k, with the paired test. Writes results/scifact-rerank.json.

    .venv/bin/python benchmarks/scifact_rerank.py [--work DIR] [--top-k 20 50] [--set section.field=value ...]

With --dev-gate (after a full run, same --work and --set) the trained reranker is gated once more, on the 809
human train claims as dev queries (what `merge.dev_queries` gives the rerank stage), and that verdict is added
to the result file as `dev_gate`: would a user with some human queries have shipped it?
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
CLAIMS = RESULTS / "scifact-sdg-qwen2.5-coder-0.5b.parquet"
CLAIMS_CONFIG = RESULTS / "scifact-devmerge-qwen2.5-coder-0.5b.json"  # the config that wrote those claims


def seed_sdg(cfg, run) -> None:
    """sdg/qa.parquet from the committed claims, recorded under this config's SDG identity (skipped by the runner)."""
    import shutil

    from pipeline import runner
    from pipeline.config import CONFIG_SCHEMA
    from pipeline.rundir import StageRecorder

    stage_hash, inputs = runner.stage_identity("sdg", cfg, run)
    old = run.read_manifest("sdg")
    if old is not None and old.status == "completed" and old.config_hash == stage_hash:
        return
    rec = StageRecorder(run, "sdg", stage_hash, inputs, cfg.section_settings("sdg"), CONFIG_SCHEMA)
    run.clear("sdg")
    rec.dir.mkdir(parents=True)
    with rec:
        shutil.copy(CLAIMS, rec.output("qa.parquet"))
        rec.manifest.counts = json.loads((RESULTS / "scifact-sdg-qwen2.5-coder-0.5b.json").read_text())["counts"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "scifact-rerank"))
    ap.add_argument("--top-k", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--dev-gate", action="store_true", help="Gate the trained reranker on SciFact's train claims "
                    "and add the verdict to results/scifact-rerank.json.")
    args = ap.parse_args()

    from pipeline import runner
    from pipeline.config import RetrofitConfig, dump_config, load_config
    from pipeline.models import resolve_embedder
    from pipeline.report import compare
    from pipeline.beir import METRICS
    from pipeline.retrieval import evaluate_models, reranked_label
    from pipeline.rundir import RunDir
    from pipeline.storage import cache_dir

    written = json.loads(CLAIMS_CONFIG.read_text())["config"]
    written["corpus"]["path"] = str(SCIFACT / "corpus.jsonl")
    written["merge"]["dev_queries"] = None  # nothing human chooses anything here
    base_cfg = RetrofitConfig.model_validate(written)
    overrides = ["train.max_steps=1", "merge.weight=0", "rerank.enabled=true",
                 f"rerank.top_k={min(args.top_k)}", *args.overrides]
    config_path = Path(args.work) / "base-config.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(dump_config(base_cfg))
    cfg = load_config(config_path, overrides)
    run = RunDir(args.work)
    if args.dev_gate:
        return dev_gate(load_config(config_path, [*overrides, f"merge.dev_queries={SCIFACT}:train"]), run)
    t0 = time.perf_counter()
    timings = {}
    for stage in ("corpus", "sdg", "prep", "train", "merge", "rerank"):
        if stage == "sdg":
            seed_sdg(cfg, run)
        t = time.perf_counter()
        runner.run_stage(stage, cfg, run)
        timings[stage] = round(time.perf_counter() - t, 1)
    counts = run.read_manifest("rerank").counts
    reranker = str(run.root / "rerank" / ("model" if counts["shipped"] else "candidate"))

    human, curve = {}, {}
    base = resolve_embedder(cfg.train.base_model)
    for k in sorted(args.top_k):
        result = evaluate_models(SCIFACT, {"base": base}, 100, cache_dir() / "eval", cfg.eval.texts_per_batch,
                                 reranker=reranker, rerank_top_k=k)
        label = reranked_label("base")
        comparison = compare(result.per_query, METRICS, base="base")
        curve[str(k)] = {"ndcg@10": result.means[label]["ndcg@10"], "recall@10": result.means[label]["recall@10"],
                         "p_value": comparison[label]["ndcg@10"]["p_value"], "ms_per_query": result.rerank_ms_per_query}
        if k == min(args.top_k):
            human = {"embedder": result.means["base"], "reranked": result.means[label],
                     "references": {r: result.means[r] for r in result.references},
                     "significance": comparison[label]}
        print(f"top {k}: NDCG@10 {result.means['base']['ndcg@10']:.4f} -> {result.means[label]['ndcg@10']:.4f} "
              f"(p {comparison[label]['ndcg@10']['p_value']:.3f}), {result.rerank_ms_per_query} ms/query", flush=True)

    import torch

    out = {"benchmark": "scifact-rerank", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
           "generator": "qwen2.5-coder-0.5b", "docs": 0, "embedder": "base (all-MiniLM-L6-v2, not fine-tuned)",
           "reranker": "all-MiniLM-L6-v2's transformer + new head, trained on the run's train split",
           "config": cfg.section_settings("rerank"), "stage_seconds": timings,
           "pipeline_seconds": round(time.perf_counter() - t0, 1), "rerank_stage": counts,
           "human": human, "top_k_curve": curve,
           "rerank_ms_per_query": {k: point["ms_per_query"] for k, point in curve.items()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scifact-rerank.json").write_text(json.dumps(out, indent=1))
    k = str(min(args.top_k))
    print(f"SciFact human claims, NDCG@10 base {human['embedder']['ndcg@10']:.4f} -> base + reranker (top {k}) "
          f"{human['reranked']['ndcg@10']:.4f} (p {human['significance']['ndcg@10']['p_value']:.3f})")
    return 0


def dev_gate(cfg, run) -> int:
    """The rerank stage's gate on human dev queries, over the reranker this benchmark trained."""
    from pipeline.rerank import gate

    counts = run.read_manifest("rerank").counts
    reranker = run.root / "rerank" / ("model" if counts["shipped"] else "candidate")
    t = time.perf_counter()
    decision = gate(cfg, run, str(reranker))
    decision["seconds"] = round(time.perf_counter() - t, 1)
    print(f"[dev gate] {decision['verdict']}", flush=True)
    path = RESULTS / "scifact-rerank.json"
    result = json.loads(path.read_text())
    result["dev_gate"] = decision
    path.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
