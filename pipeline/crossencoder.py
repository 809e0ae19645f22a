"""Cross-encoders: one transformer reads a query and a passage together and gives one relevance score.

A reranker folder is a Hugging Face sequence-classification model with one label (what sentence-transformers'
`CrossEncoder` saves and loads, e.g. the MS MARCO MiniLM rerankers) plus `reranker.json` (its pair length).
Started from an embedder instead (no cross-encoder given), the embedder's transformer gets a new, randomly
initialised scoring head: it has to learn to score pairs from the run's training rows alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.onnx_models import OnnxModel

SETTINGS_FILE = "reranker.json"


def transformer_folder(path: str) -> Path:
    """Where a model folder's Hugging Face transformer lives: the folder itself, or a sentence-transformers
    folder's Transformer module (modules.json names its path; all-MiniLM-L6-v2 keeps it at the top)."""
    folder = Path(path)
    modules = folder / "modules.json"
    if modules.exists():
        for m in json.loads(modules.read_text()):
            if m.get("type", "").endswith("Transformer"):
                return folder / m.get("path", "")
    return folder


def load_pair_model(path: str, device: str = "cpu"):
    """(model, tokenizer) of a cross-encoder folder, or of an embedder with a new one-label head."""
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = transformer_folder(path)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialized: classifier.*" is the point, not a warning
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1).to(device)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model, AutoTokenizer.from_pretrained(str(folder))


def pair_features(tokenizer, queries: list[str], passages: list[str], max_tokens: int, device: str = "cpu") -> dict:
    """Tokenised (query, passage) pairs: the passage is cut to fit, never the query."""
    enc = tokenizer(queries, passages, truncation="only_second", max_length=max_tokens, padding=True,
                    return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def save_reranker(model, tokenizer, folder: Path, max_pair_tokens: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    (folder / SETTINGS_FILE).write_text(json.dumps({"max_pair_tokens": max_pair_tokens}))


class PairScorer(torch.nn.Module):
    """The module the training engines call: tokenised pairs in, one logit per pair out."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model

    def forward(self, features):
        return self.hf(**features).logits[:, 0]


def score_in_batches(score_batch, pairs: list[tuple[str, str]], batch_size: int = 32) -> np.ndarray:
    """One logit per pair (higher: more relevant), in the given order. `score_batch(queries, passages)` scores
    one batch; pairs go in batches of similar length (less padding)."""
    out = np.zeros(len(pairs), np.float32)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][1]))
    for j in range(0, len(order), batch_size):
        idx = order[j:j + batch_size]
        out[idx] = score_batch([pairs[i][0] for i in idx], [pairs[i][1] for i in idx])
    return out


def torch_scores(forward, tokenizer, pairs: list[tuple[str, str]], max_tokens: int, device: str,
                 batch_size: int = 32) -> np.ndarray:
    """score_in_batches with a torch `forward`: a PairScorer, or the training engine around one."""
    def score_batch(queries, passages):
        return forward(pair_features(tokenizer, queries, passages, max_tokens, device)).float().cpu().numpy()

    with torch.inference_mode():
        return score_in_batches(score_batch, pairs, batch_size)


class Reranker:
    """Scores (query, passage) pairs with a saved reranker folder (torch)."""

    def __init__(self, path: str, batch_size: int = 32, max_pair_tokens: int | None = None, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        hf, self.tokenizer = load_pair_model(path, self.device)
        self.model = PairScorer(hf).eval()
        settings = Path(path) / SETTINGS_FILE
        saved = json.loads(settings.read_text())["max_pair_tokens"] if settings.exists() else 512
        self.max_pair_tokens = max_pair_tokens or saved
        self.batch_size = batch_size

    def score_pairs(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        return torch_scores(self.model, self.tokenizer, pairs, self.max_pair_tokens, self.device, self.batch_size)

    def score(self, query: str, passages: list[str]) -> np.ndarray:
        return self.score_pairs([(query, p) for p in passages])


class OnnxReranker(OnnxModel):
    """An exported reranker folder (export/reranker): the scoring head is in the graph, so ONNX Runtime alone
    gives each pair's logit. `max_tokens` is the pair length it was trained with."""

    def __init__(self, export_dir: str | Path, threads: int = 1, device: str = "cpu", optimized: bool = True,
                 batch_size: int = 32):
        super().__init__(export_dir, threads, device, optimized)
        self.batch_size = batch_size

    def score_pairs(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        def score_batch(queries, passages):
            enc = self.tok(queries, passages, truncation="only_second", max_length=self.max_tokens, padding=True,
                           return_tensors="np")
            return self.session.run(["score"], self.feeds(enc))[0]

        return score_in_batches(score_batch, pairs, self.batch_size)

    def score(self, query: str, passages: list[str]) -> np.ndarray:
        return self.score_pairs([(query, p) for p in passages])

    def pair_tokens(self, query: str, passages: list[str]) -> list[int]:
        """Tokens of each (query, passage) pair as the model reads it uncut, special tokens included."""
        q = len(self.token_ids([query])[0])
        return [q + len(ids) + self.special_pair_tokens for ids in self.token_ids(passages)]

    @property
    def special_pair_tokens(self) -> int:
        return self.tok.num_special_tokens_to_add(pair=True)


def is_exported(path: str | Path) -> bool:
    """A folder the export stage wrote (export.json + ONNX graph) rather than a torch cross-encoder folder."""
    return (Path(path) / "export.json").exists()


def load_reranker(path: str | Path, batch_size: int = 32, threads: int | None = None):
    """A torch reranker folder (rerank/model) or an exported one (export/reranker), behind score_pairs/score."""
    if is_exported(path):
        return OnnxReranker(path, threads=threads or 1, batch_size=batch_size)
    return Reranker(str(path), batch_size=batch_size, threads=threads)
