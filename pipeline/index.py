"""The vector index: FAISS inner product over normalised embeddings (exact, IVF or HNSW; GPU when there is one)."""

from __future__ import annotations

import numpy as np


def build_index(chunk_emb: np.ndarray, kind: str = "flat", *, exact_max: int = 100_000, nprobe: int = 32,
                ef_search: int = 128, use_gpu: bool = True):
    """A FAISS inner-product index over the chunks (embeddings are normalised, so scores are cosines) and
    a short description of what was built. 'auto' is exact up to exact_max chunks, then IVF on a GPU or
    HNSW on CPUs (FAISS has no GPU HNSW)."""
    import faiss

    n, dim = chunk_emb.shape
    gpus = faiss.get_num_gpus() if use_gpu and hasattr(faiss, "get_num_gpus") else 0
    if kind == "auto":
        kind = "flat" if n <= exact_max else ("ivf" if gpus else "hnsw")
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = 80, ef_search
    else:
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))  # FAISS wants >= 39 training points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = chunk_emb[np.random.default_rng(0).permutation(n)[:256 * nlist]]
        index.train(sample)
        index.nprobe = min(nprobe, nlist)
    on_gpu = bool(gpus) and kind != "hnsw"
    if on_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(chunk_emb)
    return index, f"{kind} ({'GPU' if on_gpu else 'CPU'}, {n} chunks)"


def search(index, query_emb: np.ndarray, k: int, batch: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) for every query, in batches so the result buffers stay small per call."""
    k = min(k, index.ntotal)
    parts = [index.search(query_emb[i:i + batch], k) for i in range(0, len(query_emb), batch)]
    if not parts:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
