"""Exported ONNX graphs behind ONNX Runtime: the providers for CPU, CUDA or TensorRT, the choice among them,
and `OnnxModel`, what an exported embedder and an exported reranker share (export.json, the session, a
tokenizer per thread). The graphs themselves are written by the export stage (pipeline/export.py)."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path


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


class OnnxModel:
    """An export folder loaded for inference: export.json as `info`, one ONNX Runtime session, and its tokenizer
    (a copy per thread). `info["max_seq_length"]` is the most tokens one input (or pair) may have."""

    def __init__(self, export_dir: str | Path, threads: int = 1, device: str = "cpu", optimized: bool = True):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        export_dir = Path(export_dir)
        self.info = json.loads((export_dir / "export.json").read_text())
        # A fast tokenizer keeps its padding/truncation setting as state between calls: threads sharing one
        # (a server's) get ids cut or padded by another call's setting. Each thread gets its own copy.
        self._tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
        self._per_thread = threading.local()
        self.max_tokens = int(self.info["max_seq_length"])
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
        self.session = ort.InferenceSession(str(path), opts, providers=providers_for(device, export_dir,
                                                                                     self.max_tokens))

    @property
    def tok(self):
        """This thread's tokenizer."""
        tok = getattr(self._per_thread, "tok", None)
        if tok is None:
            tok = self._per_thread.tok = copy.deepcopy(self._tokenizer)
        return tok

    def feeds(self, enc) -> dict:
        """A tokenizer's numpy output as the graph's three int64 inputs."""
        import numpy as np

        ids = enc["input_ids"]
        return {"input_ids": ids.astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64),
                "token_type_ids": enc.get("token_type_ids", np.zeros_like(ids)).astype(np.int64)}

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, uncut and without special tokens (what an endpoint counts)."""
        return self.tok(texts, add_special_tokens=False, truncation=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)
