"""Embedding a table's texts in bulk: the one place every stage encodes through.

`encode_parquet` embeds one text column of a Parquet table with any model `embedders.make_encoder`
takes (a sentence-transformers folder, an ONNX export or an endpoint URL; a folder may be in a bucket),
in shards: through Ray Data actors when the table is large (one model per actor) or in-process when
small. Each shard's texts travel to its worker and its vectors back, so the workers need no folder
shared with the driver. The driver writes them as .npy files into a cache folder named by the model's
and the table's fingerprints, so a changed model or corpus never reuses stale embeddings and an
interrupted encode resumes.
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
from pipeline.storage import local_copy

SHARD_ROWS = 4096


def texts_of(table, kind: str) -> list[str]:
    """'passage' rows are chunks (title + text); 'query' rows have a `query` column."""
    if kind == "passage":
        return [passage_text(t, x) for t, x in zip(table.column("title").to_pylist(), table.column("text").to_pylist())]
    return table.column("query").to_pylist()


class EncodeWorker:
    def __init__(self, model_path: str, kind: str, batch_size: int, cpus: int | None = None):
        if cpus is not None:  # inside a Ray actor: use exactly the CPUs it was given
            set_threads(cpus)
        self.encoder = make_encoder(model_path if is_endpoint(model_path) else str(local_copy(model_path)),
                                    batch_size, threads=cpus)
        self.kind = kind

    def process(self, task: dict) -> dict:
        emb = np.ascontiguousarray(self.encoder.encode(list(task["texts"]), self.kind), np.float32)
        return {"shard_id": int(task["shard_id"]), "rows": len(emb), "vectors": emb.tobytes()}


def encode_parquet(model_path: str, table_path: str | Path, kind: str, cache_root: str | Path, *,
                   batch_size: int = 64, use_ray: bool = False, num_actors: int = 1, cpus: int = 1,
                   num_gpus: float = 0, resources: dict | None = None) -> np.ndarray:
    """Normalised float32 embeddings of every row of `table_path`, in row order."""
    table_path = Path(table_path)
    n_rows = pq.ParquetFile(table_path).metadata.num_rows
    # An endpoint has no fingerprint: its embeddings are never cached (a fresh key each call).
    model_key = f"url{time.time_ns()}" if is_endpoint(model_path) else tree_fingerprint(local_copy(model_path))
    key = f"{kind}-{model_key}-{tree_fingerprint(table_path)}"
    out_dir = Path(cache_root) / key
    out_dir.mkdir(parents=True, exist_ok=True)
    n_shards = (n_rows + SHARD_ROWS - 1) // SHARD_ROWS
    done = {int(p.stem) for p in out_dir.glob("[0-9]*.npy")}
    todo = [i for i in range(n_shards) if i not in done]
    table = pq.read_table(table_path, memory_map=True) if todo else None
    tasks = [{"shard_id": i, "texts": texts_of(table.slice(i * SHARD_ROWS, SHARD_ROWS), kind)} for i in todo]
    for result in map_shards(EncodeWorker, tasks, use_ray=use_ray, num_actors=num_actors, num_cpus=cpus,
                             num_gpus=num_gpus, resources=resources, label=f"encode {kind} texts",
                             ctor_kwargs={"model_path": model_path, "kind": kind, "batch_size": batch_size,
                                          "cpus": cpus if use_ray else None}):
        emb = np.frombuffer(result["vectors"], np.float32).reshape(result["rows"], -1)
        # A private temporary name, then an atomic rename: the cache may be shared by runs working at once.
        tmp = out_dir / f".{result['shard_id']:05d}.{os.getpid()}.{uuid.uuid4().hex}.tmp.npy"
        np.save(tmp, emb)
        tmp.rename(out_dir / f"{result['shard_id']:05d}.npy")
    if n_rows == 0:
        return np.zeros((0, 0), np.float32)
    emb = np.concatenate([np.load(out_dir / f"{i:05d}.npy") for i in range(n_shards)])
    if is_endpoint(model_path):
        shutil.rmtree(out_dir, ignore_errors=True)
    return emb

