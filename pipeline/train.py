"""Train stage: contrastive fine-tuning of the embedder (InfoNCE over in-batch and hard negatives) on Ray Train.

The loop itself (engines, checkpoints, resume, the TorchTrainer) is pipeline/training.py's, shared with the
reranker; here is what makes it an embedder's: `Worker` embeds queries and passages, its loss is InfoNCE
(batching, the loss and GradCache live in pipeline/contrastive.py), and its checkpoints are scored by
NDCG@10 on the val split's queries against every passage of their rows.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.beir import compute_metrics
from pipeline.contrastive import StepLayout, grad_cache_step, info_nce
from pipeline.embedders import load_model
from pipeline.errors import RetrofitError
from pipeline.models import resolve_embedder
from pipeline.training import LoopWorker, fit_on_ray_train, has_val_rows, keep_checkpoint, run_worker, training_counts

class ValidationSet:
    """The val split as a small retrieval task: its queries against every passage of its rows
    (positives and mined negatives). NDCG@10 on it picks the best checkpoint and drives early stopping."""

    def __init__(self, rows: list[dict], max_queries: int):
        rows = rows[:max_queries]
        texts: dict[str, str] = {}
        for r in rows:
            texts[r["positive_id"]] = r["positive_text"]
            texts.update(zip(r["negative_ids"], r["negative_texts"]))
        self.passage_ids, self.passages = list(texts), list(texts.values())
        self.queries = {r["qa_id"]: r["query"] for r in rows}
        self.qrels = {r["qa_id"]: {pid: 1 for pid in (r.get("positive_ids") or [r["positive_id"]])} for r in rows}

    def __len__(self) -> int:
        return len(self.queries)

    def ndcg10(self, encode) -> float:
        return float(sum(self.per_query(encode).values()) / max(1, len(self)))

    def per_query(self, encode) -> dict[str, float]:
        """NDCG@10 of each val query."""
        import torch

        with torch.no_grad():
            q = torch.cat([encode(list(self.queries.values())[i:i + 64], "query")
                           for i in range(0, len(self.queries), 64)])
            p = torch.cat([encode(self.passages[i:i + 64], "passage") for i in range(0, len(self.passages), 64)])
        scores = (q @ p.T).float().cpu().numpy()
        run = {}
        for qid, row in zip(self.queries, scores):
            top = row.argsort()[::-1][:10]
            run[qid] = {self.passage_ids[j]: float(row[j]) for j in top}
        return {qid: m["ndcg@10"] for qid, m in compute_metrics(self.qrels, run)[1].items()}


class Worker(LoopWorker):
    """The embedder's training worker: a sentence-transformers model, InfoNCE over every worker's passages."""


    def build_model(self, path: str):
        """The model to train, from the start weights or a checkpoint's model folder."""
        tc = self.tc
        model = load_model(path, device=self.device)
        model.prompts = {k: v for k, v in (("query", tc.query_prefix), ("passage", tc.passage_prefix)) if v}
        return model

    def validation_set(self, rows: list[dict]):
        return ValidationSet(rows, self.tc.val_max_queries)

    def val_ndcg10(self) -> float:
        return self.val.ndcg10(self.encode)

    def save_model(self, folder: Path) -> None:
        # encode() switches the max length between queries and passages; save the longer one, the
        # length every later user of the model (eval, export, serving) should embed passages with.
        self.model.max_seq_length = max(self.tc.max_query_tokens, self.tc.max_passage_tokens)
        self.model.save(str(folder), safe_serialization=True)

    def encode(self, texts: list[str], kind: str):
        """kind 'query' or 'passage' (their prefix and max length). Passages are embedded in groups of
        similar length (less padding: a step's passages mix short and long texts), in their given order."""
        import torch

        size = self.sampler.per_worker
        if kind == "query" or len(texts) <= size:
            return self._embed(texts, kind)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        parts = [self._embed([texts[i] for i in order[j:j + size]], kind) for j in range(0, len(texts), size)]
        return torch.cat(parts)[torch.argsort(torch.tensor(order))]

    def _embed(self, texts: list[str], kind: str):
        import torch

        query = kind == "query"
        prefix = self.tc.query_prefix if query else self.tc.passage_prefix
        self.model.max_seq_length = self.tc.max_query_tokens if query else self.tc.max_passage_tokens
        features = self.model.preprocess([prefix + t for t in texts])
        features = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in features.items()}
        return torch.nn.functional.normalize(self.engine.forward(features)["sentence_embedding"].float(), dim=-1)

    def train_step(self, batch: list[int]) -> float:
        """One global step: this worker embeds its rows, the loss sees every worker's passages."""
        tc = self.tc
        parts = [self.rows.take(self.sampler.worker_rows(batch, w)).to_pylist() for w in range(self.world)]
        layout = StepLayout.build(parts, tc.negatives_per_query)
        queries, passages = [r["query"] for r in parts[self.rank]], layout.passages[self.rank]

        def loss_fn(q, p):
            return info_nce(q, p, layout, self.rank, self.world, tc.loss_temperature, tc.symmetric)

        if tc.grad_cache_chunk:
            loss = grad_cache_step(self.encode, queries, passages, loss_fn, self.engine.backward,
                                   tc.grad_cache_chunk, self.seed + self.state["global_step"])
        else:
            loss_t = loss_fn(self.encode(queries, "query"), self.encode(passages, "passage"))
            self.engine.backward(loss_t)
            loss = float(loss_t.item())
        self.engine.step()
        self.state["global_step"] += 1
        return self.global_loss(loss)


def train_loop(config: dict) -> None:
    """What each Ray Train worker of the train stage runs."""
    run_worker(Worker, config)


def run_stage(cfg, run, rec) -> None:
    import pyarrow.parquet as pq

    train_path = run.root / "prep" / "train.parquet"
    n_rows = pq.ParquetFile(train_path).metadata.num_rows
    tc = cfg.train
    if n_rows < max(2, tc.num_workers):  # caught here, not as a worker error Ray Train would retry
        raise RetrofitError(f"{train_path} has {n_rows} rows; contrastive training on {tc.num_workers} worker(s) "
                         f"needs at least {max(2, tc.num_workers)}")
    has_val = has_val_rows(run, tc)
    chosen = fit_on_ray_train("train", train_loop, tc, {
        "train": tc, "seed": cfg.seed, "base_model": resolve_embedder(tc.base_model), "run": run.location,
        "train_path": "prep/train.parquet", "val_path": "prep/val.parquet" if has_val else None}, run, rec, has_val)
    kept = keep_checkpoint(chosen, rec.output("model"))
    rec.manifest.counts = training_counts("train", run, tc, n_rows, kept)
