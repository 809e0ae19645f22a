"""Merge stage: the shipped model is a * fine-tuned + (1 - a) * base, weight by weight.

Fine-tuning on synthetic queries can trade general ability for the generator's style. Averaging the
weights with the base (WiSE-FT, LM-Cocktail) keeps most of a real gain and gives back what was lost;
it cannot make a gain. The weight `a` is chosen on human dev queries when the user gives some
(`merge.dev_queries`: the grid's best NDCG@10 on them), else it is `merge.weight`. Synthetic queries
never choose it: they reward what fits the generator, not the users. Dev queries are scored over the
run's own chunks (a document ranks by its best chunk) and are never the test queries.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.beir import DevQueries, compute_metrics, in_corpus, load_dev_queries
from pipeline.embedders import load_model
from pipeline.errors import RetrofitError
from pipeline.models import resolve_embedder
from pipeline.retrieval import chunk_run


class Merger:
    """The base and fine-tuned weights, loaded once; save(a, folder) writes a * tuned + (1 - a) * base
    (every floating-point tensor) as a model folder that keeps the tuned model's own files (tokenizer,
    prompts, max length)."""

    def __init__(self, base_path: str, tuned_path: str):
        self.model = load_model(tuned_path, device="cpu")
        self.tuned = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.base = load_model(base_path, device="cpu").state_dict()
        if self.tuned.keys() != self.base.keys() or any(self.tuned[k].shape != self.base[k].shape for k in self.tuned):
            raise RetrofitError(f"cannot merge {tuned_path} with {base_path}: their weights differ in names or shapes "
                                "(was the fine-tuned model trained from another base?)")

    def save(self, a: float, out_dir: Path) -> None:
        import torch

        self.model.load_state_dict({k: a * v + (1 - a) * self.base[k] if v.is_floating_point() else v
                                    for k, v in self.tuned.items()})
        shutil.rmtree(out_dir, ignore_errors=True)
        if not torch.cuda.is_available():  # transformers' save imports DeepSpeed, which warns it found no GPU
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self.model.save(str(out_dir), safe_serialization=True)


def merge_weights(base_path: str, tuned_path: str, a: float, out_dir: Path) -> None:
    """One mix, saved: Merger(base, tuned).save(a, out_dir)."""
    Merger(base_path, tuned_path).save(a, out_dir)


def dev_metrics(model_path: str, chunks_path: Path, doc_of_chunk: list[str], dev: DevQueries, top_k: int,
                cache: Path, batch_size: int) -> dict[str, float]:
    """BEIR metrics of one model on the dev queries over the run's chunks (a document scores its best chunk;
    `doc_of_chunk` holds each chunk's document id, in row order)."""
    run, _ = chunk_run(model_path, chunks_path, dev.queries, doc_of_chunk, top_k, cache, batch_size)
    return compute_metrics(dev.qrels, run)[0]


def choose_weight(curve: dict[float, dict[str, float]]) -> float:
    """The grid point with the best dev NDCG@10; a tie goes to the smaller weight (closer to the base)."""
    return max(sorted(curve), key=lambda a: curve[a]["ndcg@10"])


def run_stage(cfg, run, rec) -> None:
    import pyarrow.parquet as pq

    base, tuned = resolve_embedder(cfg.train.base_model), str(run.root / "train" / "model")
    merger = Merger(base, tuned)
    mc = cfg.merge
    model_dir = rec.output("model")
    counts: dict = {"weight": mc.weight, "chosen_by": "merge.weight (no dev queries given)"}
    if mc.dev_queries:
        chunks_path = run.root / "corpus" / "chunks.parquet"
        doc_of_chunk = [str(d) for d in pq.read_table(chunks_path, columns=["doc_id"]).column("doc_id").to_pylist()]
        dev = in_corpus(load_dev_queries(mc.dev_queries), set(doc_of_chunk))
        print(f"[merge] choosing the weight on {len(dev.qrels)} dev queries from {dev.source}"
              + (f" ({dev.dropped} dropped: their documents are not in this corpus)" if dev.dropped else ""), flush=True)
        curve = {}
        candidates = rec.dir / "candidates"
        for a in sorted(set(mc.grid)):
            path = base if a == 0 else tuned if a == 1 else str(candidates / f"a{a:g}")
            if 0 < a < 1:
                merger.save(a, Path(path))
            curve[a] = dev_metrics(path, chunks_path, doc_of_chunk, dev, cfg.eval.top_k, run.root / "cache" / "eval",
                                   cfg.eval.texts_per_batch)
            print(f"[merge] a={a:g}: dev NDCG@10 {curve[a]['ndcg@10']:.4f}", flush=True)
        weight = choose_weight(curve)
        shutil.rmtree(candidates, ignore_errors=True)
        counts = {"weight": weight, "chosen_by": f"best dev NDCG@10 over {sorted(curve)}",
                  "dev_queries": len(dev.qrels), "dev_queries_dropped": dev.dropped,
                  "curve": {f"{a:g}": {m: curve[a][m] for m in ("ndcg@10", "recall@10", "recall@100")} for a in curve}}
        if weight == 0:
            print("[merge] the base model scores best on your dev queries: the shipped model is the base", flush=True)
    merger.save(counts["weight"], model_dir)
    print(f"[merge] shipped model = {counts['weight']:g} x fine-tuned + {1 - counts['weight']:g} x base "
          f"({counts['chosen_by']}) -> {model_dir}", flush=True)
    rec.manifest.counts = counts
