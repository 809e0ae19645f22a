"""Embedding a table's texts in bulk: the one place every stage encodes through.

`encode_parquet` embeds one text column of a Parquet table with any model `embedders.make_encoder`
takes (a sentence-transformers folder, an ONNX export or an endpoint URL), in shards: through Ray Data
actors when the table is large (one model per actor) or in-process when small. Shards are written as
.npy files into a cache folder named by the model's and the table's fingerprints, so a changed model
or corpus never reuses stale embeddings and an interrupted encode resumes.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.beir import passage_text
from pipeline.embedders import is_endpoint, make_encoder
from pipeline.ray_runtime import map_shards, set_threads
from pipeline.rundir import tree_fingerprint

SHARD_ROWS = 4096


def texts_of(table, kind: str) -> list[str]:
    """'passage' rows are chunks (title + text); 'query' rows have a `query` column."""
    if kind == "passage":
        return [passage_text(t, x) for t, x in zip(table.column("title").to_pylist(), table.column("text").to_pylist())]
    return table.column("query").to_pylist()


class EncodeWorker:
    def __init__(self, model_path: str, table_path: str, kind: str, out_dir: str, batch_size: int,
                 cpus: int | None = None):
        if cpus is not None:  # inside a Ray actor: use exactly the CPUs it was given
            set_threads(cpus)
        self.encoder = make_encoder(model_path, batch_size, threads=cpus)
        self.table_path, self.kind, self.out_dir = table_path, kind, Path(out_dir)

    def process(self, task: dict) -> dict:
        start, stop = int(task["start"]), int(task["stop"])
        table = pq.read_table(self.table_path, memory_map=True).slice(start, stop - start)
        emb = self.encoder.encode(texts_of(table, self.kind), self.kind)
        # A private temporary name, then an atomic rename: the cache may be shared by runs working at once.
        tmp = self.out_dir / f".{int(task['shard_id']):05d}.{os.getpid()}.{uuid.uuid4().hex}.tmp.npy"
        np.save(tmp, emb)
        tmp.rename(self.out_dir / f"{int(task['shard_id']):05d}.npy")
        return {"shard_id": int(task["shard_id"]), "rows": len(emb)}


def encode_parquet(model_path: str, table_path: str | Path, kind: str, cache_root: str | Path, *,
                   batch_size: int = 64, use_ray: bool = False, num_actors: int = 1, cpus: int = 1,
                   num_gpus: float = 0, resources: dict | None = None) -> np.ndarray:
    """Normalised float32 embeddings of every row of `table_path`, in row order."""
    table_path = Path(table_path)
    n_rows = pq.ParquetFile(table_path).metadata.num_rows
    # An endpoint has no fingerprint: its embeddings are never cached (a fresh key each call).
    model_key = f"url{time.time_ns()}" if is_endpoint(model_path) else tree_fingerprint(Path(model_path))
    key = f"{kind}-{model_key}-{tree_fingerprint(table_path)}"
    out_dir = Path(cache_root) / key
    out_dir.mkdir(parents=True, exist_ok=True)
    n_shards = (n_rows + SHARD_ROWS - 1) // SHARD_ROWS
    done = {int(p.stem) for p in out_dir.glob("[0-9]*.npy")}
    tasks = [{"shard_id": i, "start": i * SHARD_ROWS, "stop": min((i + 1) * SHARD_ROWS, n_rows)}
             for i in range(n_shards) if i not in done]
    for _ in map_shards(EncodeWorker, tasks, use_ray=use_ray, num_actors=num_actors, num_cpus=cpus,
                        num_gpus=num_gpus, resources=resources, label=f"encode {kind} texts",
                        ctor_kwargs={"model_path": model_path, "table_path": str(table_path), "kind": kind,
                                     "out_dir": str(out_dir), "batch_size": batch_size,
                                     "cpus": cpus if use_ray else None}):
        pass
    if n_rows == 0:
        return np.zeros((0, 0), np.float32)
    emb = np.concatenate([np.load(out_dir / f"{i:05d}.npy") for i in range(n_shards)])
    if is_endpoint(model_path):
        shutil.rmtree(out_dir, ignore_errors=True)
    return emb

