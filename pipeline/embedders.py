"""What turns texts into vectors: a sentence-transformers folder, an exported ONNX folder (ONNX Runtime on
CPU, CUDA or TensorRT) or a served endpoint's URL, behind one `encode(texts, kind)`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.onnx_models import OnnxModel
from serve.client import embed


def load_model(model_path: str, device: str | None = None):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_path, device=device, local_files_only=True)


class OnnxEmbedder(OnnxModel):
    """An exported embedder folder: the artifact alone gives final embeddings (pooled, normalised)."""

    def __init__(self, export_dir: str | Path, threads: int = 1, device: str = "cpu", optimized: bool = True):
        super().__init__(export_dir, threads, device, optimized)
        self.prompts = self.info.get("prompts") or {}
        self.dimension = int(self.info["dimension"])

    def encode(self, texts: list[str], batch_size: int = 32, input_type: str | None = None) -> np.ndarray:
        prefix = self.prompts.get(input_type, "") if input_type else ""
        if prefix:
            texts = [prefix + t for t in texts]
        # Batches of similar length waste little on padding; the output keeps the input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.dimension), np.float32)
        for i in range(0, len(texts), batch_size):
            idx = order[i:i + batch_size]
            enc = self.tok([texts[j] for j in idx], padding=True, truncation=True, max_length=self.max_tokens,
                           return_tensors="np")
            out[idx] = self.session.run(["sentence_embedding"], self.feeds(enc))[0]
        return out


class _SentenceTransformerEncoder:
    def __init__(self, path: str, batch_size: int):
        self.model, self.batch_size = load_model(path), batch_size

    def encode(self, texts: list[str], kind: str) -> np.ndarray:
        prompt = kind if kind in (self.model.prompts or {}) else None  # the model's own query/passage prefix
        return self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True, prompt_name=prompt,
                                 convert_to_numpy=True, show_progress_bar=False).astype(np.float32)


class _OnnxEncoder:
    def __init__(self, path: str, batch_size: int, threads: int):
        self.model, self.batch_size = OnnxEmbedder(path, threads=threads), batch_size

    def encode(self, texts: list[str], kind: str) -> np.ndarray:
        return self.model.encode(texts, self.batch_size, input_type=kind)


class _EndpointEncoder:
    def __init__(self, url: str, batch_size: int):
        self.url, self.batch_size = url, batch_size

    def encode(self, texts: list[str], kind: str) -> np.ndarray:
        # Evaluation reads long documents the way the in-process model does: their first max_seq_length tokens.
        out = [embed(self.url, texts[i:i + self.batch_size], encoding_format="base64", input_type=kind,
                     truncate="END")
               for i in range(0, len(texts), self.batch_size)]
        return np.asarray([v for chunk in out for v in chunk], np.float32)


def is_endpoint(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def make_encoder(spec: str, batch_size: int = 64, threads: int | None = None):
    """A sentence-transformers folder, an exported ONNX folder (has export.json) or an endpoint URL."""
    if is_endpoint(spec):
        return _EndpointEncoder(spec, batch_size)
    if (Path(spec) / "export.json").exists():
        return _OnnxEncoder(spec, batch_size, threads or os.cpu_count() or 1)
    return _SentenceTransformerEncoder(spec, batch_size)
