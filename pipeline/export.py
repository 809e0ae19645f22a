"""Export stage: the fine-tuned embedder as one ONNX graph (encoder + pooling + normalisation),
with a parity gate against the torch model on real texts that fails the stage when they diverge.

The export folder is self-contained for serving: model.onnx, the tokenizer files and export.json
(max length, pooling, parity figures).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np


class ParityError(RuntimeError):
    pass


def _pooled_module(st_model):
    """transformer -> pooling -> L2 normalisation as a plain nn.Module taking token tensors."""
    import torch

    transformer = st_model[0].auto_model
    pooling = st_model[1]
    mode = pooling.get_pooling_mode_str() if hasattr(pooling, "get_pooling_mode_str") else "mean"
    if mode not in ("mean", "cls"):
        raise ValueError(f"pooling mode {mode!r} is not supported by the ONNX export (mean or cls)")

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                      token_type_ids=token_type_ids).last_hidden_state
            if mode == "cls":
                emb = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(emb, p=2, dim=1)

    return Pooled().eval(), mode


def export_onnx(model_dir: str | Path, out_dir: str | Path, opset: int) -> Path:
    import torch

    from pipeline.encode import load_model

    st = load_model(str(model_dir), device="cpu")
    module, mode = _pooled_module(st)
    tok = st.tokenizer
    sample = tok(["an example sentence", "a second, somewhat longer example sentence"], padding=True,
                 return_tensors="pt")
    sample.setdefault("token_type_ids", torch.zeros_like(sample["input_ids"]))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(module, (sample["input_ids"], sample["attention_mask"], sample["token_type_ids"]),
                      str(onnx_path), input_names=["input_ids", "attention_mask", "token_type_ids"],
                      output_names=["sentence_embedding"], opset_version=opset, dynamo=False,
                      dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                                    "sentence_embedding": {0: "batch"}})
    tok.save_pretrained(out_dir)
    (out_dir / "export.json").write_text(json.dumps(
        {"max_seq_length": st.max_seq_length, "pooling": mode, "normalized": True, "opset": opset,
         "dimension": st.get_embedding_dimension()}, indent=2))
    return onnx_path


class OnnxEmbedder:
    """Tokenizer + ONNX Runtime session: the exported artifact alone gives final embeddings."""

    def __init__(self, export_dir: str | Path, threads: int = 1, providers: list[str] | None = None):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        export_dir = Path(export_dir)
        self.info = json.loads((export_dir / "export.json").read_text())
        self.tok = AutoTokenizer.from_pretrained(str(export_dir))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(export_dir / "model.onnx"), opts,
                                            providers=providers or ["CPUExecutionProvider"])
        self.dimension = int(self.info["dimension"])

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
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


def quantize_int8(export_dir: str | Path, out_dir: str | Path) -> Path:
    """Dynamic int8 weights, per channel (per-tensor int8 was too lossy for MiniLM: cosine ~0.965)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    export_dir, out_dir = Path(export_dir), Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(export_dir, out_dir, ignore=shutil.ignore_patterns("model.onnx"))
    quantize_dynamic(export_dir / "model.onnx", out_dir / "model.onnx", per_channel=True,
                     weight_type=QuantType.QInt8)
    info = json.loads((out_dir / "export.json").read_text())
    (out_dir / "export.json").write_text(json.dumps({**info, "quantization": "int8-dynamic-per-channel"}, indent=2))
    return out_dir


def parity(model_dir: str | Path, export_dir: str | Path, texts: list[str]) -> dict:
    """Per-text cosine between torch and ONNX embeddings of the same texts."""
    from pipeline.encode import load_model

    ref = load_model(str(model_dir), device="cpu").encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    got = OnnxEmbedder(export_dir).encode(texts)
    cos = np.sum(ref * got, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    return {"texts": len(texts), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "max_abs_diff": float(np.abs(ref - got).max())}


def run_stage(cfg, run, rec) -> None:
    import pyarrow.parquet as pq

    from pipeline.corpus import passage_text

    model_dir = run.root / "train" / "model"
    out_dir = rec.dir / "onnx"
    shutil.rmtree(out_dir, ignore_errors=True)
    export_onnx(model_dir, out_dir, cfg.export.opset)
    rec.phase("export")
    chunks = pq.read_table(run.root / "corpus" / "chunks.parquet").slice(0, cfg.export.parity_texts).to_pylist()
    queries = pq.read_table(run.root / "sdg" / "qa.parquet").slice(0, cfg.export.parity_texts).column("query")
    texts = [passage_text(c["title"], c["text"]) for c in chunks] + queries.to_pylist()
    report = parity(model_dir, out_dir, texts)
    report["threshold"] = cfg.export.min_cosine
    report["passed"] = report["min_cosine"] >= cfg.export.min_cosine
    (rec.dir / "parity.json").write_text(json.dumps(report, indent=2))
    rec.manifest.counts = {"parity": report}
    if not report["passed"]:
        raise ParityError(f"ONNX export diverges from torch: min cosine {report['min_cosine']:.6f} "
                          f"< {cfg.export.min_cosine} over {report['texts']} texts (see {rec.dir / 'parity.json'})")
    rec.phase("parity")
    if cfg.export.int8:
        rec.manifest.counts["int8"] = int8_variant(cfg, run, rec)
        rec.phase("int8")


def int8_variant(cfg, run, rec) -> dict:
    """Quantise, measure the NDCG@10 it costs on the test split, keep it only within the tolerance."""
    from pipeline.evaluate import evaluate_models

    int8_dir = quantize_int8(rec.dir / "onnx", rec.dir / "onnx-int8")
    result = evaluate_models(run.root / "prep" / "beir_test", {"fp32": str(rec.dir / "onnx"), "int8": str(int8_dir)},
                             cfg.eval.top_k, run.root / "cache" / "eval", cfg.eval.batch_size)
    loss = result.means["fp32"]["ndcg@10"] - result.means["int8"]["ndcg@10"]
    kept = loss <= cfg.export.int8_max_ndcg_loss
    summary = {"ndcg@10_fp32": result.means["fp32"]["ndcg@10"], "ndcg@10_int8": result.means["int8"]["ndcg@10"],
               "ndcg@10_loss": round(loss, 5), "tolerance": cfg.export.int8_max_ndcg_loss, "kept": kept}
    (rec.dir / "int8.json").write_text(json.dumps(summary, indent=2))
    if not kept:
        shutil.rmtree(int8_dir)
    print(f"[export] int8 variant: NDCG@10 {summary['ndcg@10_fp32']:.4f} -> {summary['ndcg@10_int8']:.4f} "
          f"({'kept' if kept else 'dropped: loss above ' + str(cfg.export.int8_max_ndcg_loss)})", flush=True)
    return summary
