"""What turns texts into vectors: a sentence-transformers folder, an exported ONNX folder (ONNX Runtime on
CPU, CUDA or TensorRT) or a served endpoint's URL, behind one `encode(texts, kind)`."""

from __future__ import annotations

import copy
import json
import os
import threading
from pathlib import Path

import numpy as np

from serve.client import embed


def load_model(model_path: str, device: str | None = None):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_path, device=device, local_files_only=True)


def providers_for(device: str, export_dir: Path, max_seq_length: int, max_batch: int = 64) -> list:
    """ONNX Runtime providers for 'cpu', 'cuda' or 'tensorrt' (fp16 engine, cached next to the model,
    its optimisation profile covering batches up to max_batch and sequences up to max_seq_length)."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    shapes = lambda b, n: ",".join(f"{name}:{b}x{n}" for name in ("input_ids", "attention_mask", "token_type_ids"))  # noqa: E731
    trt = {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
           "trt_engine_cache_path": str(export_dir / "trt_cache"),
           "trt_profile_min_shapes": shapes(1, 1), "trt_profile_opt_shapes": shapes(max_batch // 2, max_seq_length // 2),
           "trt_profile_max_shapes": shapes(max_batch, max_seq_length)}
    return [("TensorrtExecutionProvider", trt), "CUDAExecutionProvider", "CPUExecutionProvider"]


def pick_device(device: str, export_dir: str) -> str:
    """'auto': TensorRT when the export stage built its engine here, CUDA when there is a GPU, else CPU."""
    if device != "auto":
        return device
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "TensorrtExecutionProvider" in available and (Path(export_dir) / "trt_cache").is_dir():
        return "tensorrt"
    return "cuda" if "CUDAExecutionProvider" in available else "cpu"


def tensorrt_unavailable() -> str | None:
    """Why a TensorRT engine cannot be built here, or None when it can."""
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return ("onnxruntime has no TensorrtExecutionProvider here (a CUDA GPU with onnxruntime-gpu and "
                "TensorRT 10 installed is needed); serving uses ONNX Runtime on "
                + ("CUDA" if "CUDAExecutionProvider" in ort.get_available_providers() else "CPU"))
    return None


class OnnxEmbedder:
    """Tokenizer + ONNX Runtime session: the exported artifact alone gives final embeddings."""

    def __init__(self, export_dir: str | Path, threads: int = 1, device: str = "cpu", optimized: bool = True):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        export_dir = Path(export_dir)
        self.info = json.loads((export_dir / "export.json").read_text())
        # A fast tokenizer keeps its padding/truncation setting as state between calls: threads sharing one
        # (a server's) get ids cut or padded by another call's setting. Each thread gets its own copy.
        self._tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
        self._per_thread = threading.local()
        self.prompts = self.info.get("prompts") or {}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # Idle intra-op threads sleep instead of spinning: a spinning thread burns a core that a server's
        # proxy, its HTTP handling or a neighbouring actor needs (on 2 cores: serving throughput +2-17%, p99
        # at concurrency 16 about halved; benchmarks/README.md).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # TensorRT builds from the portable graph; ORT's own providers load the pre-optimised one.
        name = self.info.get("optimized") if optimized and device != "tensorrt" else None
        path = export_dir / (name or "model.onnx")
        self.session = ort.InferenceSession(str(path), opts, providers=providers_for(
            device, export_dir, int(self.info["max_seq_length"])))
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
            enc = self.tok([texts[j] for j in idx], padding=True, truncation=True,
                           max_length=self.info["max_seq_length"], return_tensors="np")
            feeds = {"input_ids": enc["input_ids"].astype(np.int64),
                     "attention_mask": enc["attention_mask"].astype(np.int64),
                     "token_type_ids": enc.get("token_type_ids", np.zeros_like(enc["input_ids"])).astype(np.int64)}
            out[idx] = self.session.run(["sentence_embedding"], feeds)[0]
        return out

    @property
    def tok(self):
        """This thread's tokenizer."""
        tok = getattr(self._per_thread, "tok", None)
        if tok is None:
            tok = self._per_thread.tok = copy.deepcopy(self._tokenizer)
        return tok

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, uncut and without special tokens (what an endpoint counts)."""
        return self.tok(texts, add_special_tokens=False, truncation=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


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
