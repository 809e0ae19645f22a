"""Export stage: the fine-tuned embedder as one ONNX graph (encoder + pooling + normalisation),
with a parity gate against the torch model on real texts that fails the stage when they diverge; and, when
the rerank stage shipped a reranker, the reranker as one graph too (transformer + scoring head: one logit
per pair), under its own parity gate on real pairs, in export/reranker.

The export folder is self-contained for serving: model.onnx (portable: standard ONNX ops, what
TensorRT builds from), model.opt.onnx (ONNX Runtime's offline graph optimisation of it, what the CPU
and CUDA providers load), the tokenizer files and export.json (max length, pooling, the model's
query/passage prompts). Hand-written rather than optimum / sentence-transformers' ONNX backend: those
export the transformer alone, and we want pooling and normalisation inside the graph so the artifact
by itself gives final embeddings to any ONNX runtime.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np

from pipeline.beir import passage_text
from pipeline.embedders import OnnxEmbedder, load_model
from pipeline.onnx_models import tensorrt_unavailable
from pipeline.errors import RetrofitError
from pipeline.retrieval import evaluate_models


class ParityError(RuntimeError):
    pass


def _pooled_module(st_model):
    """transformer -> pooling -> L2 normalisation as a plain nn.Module taking token tensors."""
    import torch

    transformer = st_model[0].auto_model
    pooling = st_model[1]
    mode = pooling.get_pooling_mode_str() if hasattr(pooling, "get_pooling_mode_str") else "mean"
    if mode not in ("mean", "cls"):
        raise RetrofitError(f"pooling mode {mode!r} is not supported by the ONNX export (mean or cls)")

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


def trace_to_onnx(module, sample: dict, onnx_path: Path, output: str, opset: int) -> None:
    """A module taking (input_ids, attention_mask, token_type_ids) traced to ONNX, batch and length dynamic."""
    import torch

    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    sample.setdefault("token_type_ids", torch.zeros_like(sample["input_ids"]))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {0: "batch", 1: "sequence"}
    # The tracer warns about every data-dependent branch in transformers' attention code; none of them
    # applies to this graph, and the parity gate (the stage's real check) compares it with torch on real
    # texts. Left on, they are screens of "might be incorrect" on the console of every run.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(module, tuple(sample[n] for n in names), str(onnx_path), input_names=names,
                          output_names=[output], opset_version=opset, dynamo=False,
                          dynamic_axes={**{n: axes for n in names}, output: {0: "batch"}})


def export_onnx(model_dir: str | Path, out_dir: str | Path, opset: int) -> Path:
    st = load_model(str(model_dir), device="cpu")
    module, mode = _pooled_module(st)
    tok = st.tokenizer
    sample = tok(["an example sentence", "a second, somewhat longer example sentence"], padding=True,
                 return_tensors="pt")
    out_dir = Path(out_dir)
    onnx_path = out_dir / "model.onnx"
    trace_to_onnx(module, sample, onnx_path, "sentence_embedding", opset)
    tok.save_pretrained(out_dir)
    optimize_onnx(onnx_path, out_dir / OPTIMIZED)
    # The model's prompts (e.g. {"query": "query: "}) travel with it: serving applies them by input_type.
    prompts = {k: v for k, v in (st.prompts or {}).items() if v}
    (out_dir / "export.json").write_text(json.dumps(
        {"max_seq_length": st.max_seq_length, "pooling": mode, "normalized": True, "opset": opset,
         "dimension": st.get_embedding_dimension(), "prompts": prompts, "optimized": OPTIMIZED}, indent=2))
    return onnx_path


OPTIMIZED = "model.opt.onnx"


def export_reranker_onnx(model_dir: str | Path, out_dir: str | Path, opset: int) -> Path:
    """A reranker folder (rerank/model) as one ONNX graph: transformer + scoring head, one logit per pair.
    export.json's max_seq_length is the pair length it was trained with (what serving counts against)."""
    import torch

    from pipeline.crossencoder import SETTINGS_FILE, load_pair_model

    hf, tok = load_pair_model(str(model_dir))

    class ScoreGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hf = hf

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.hf(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).logits[:, 0]

    sample = tok(["a query", "a second query"], ["a passage", "a second, somewhat longer passage"], padding=True,
                 return_tensors="pt")
    out_dir = Path(out_dir)
    onnx_path = out_dir / "model.onnx"
    trace_to_onnx(ScoreGraph().eval(), sample, onnx_path, "score", opset)
    tok.save_pretrained(out_dir)
    optimize_onnx(onnx_path, out_dir / OPTIMIZED)
    settings = Path(model_dir) / SETTINGS_FILE
    max_pair_tokens = json.loads(settings.read_text())["max_pair_tokens"] if settings.exists() else 512
    (out_dir / "export.json").write_text(json.dumps(
        {"kind": "reranker", "max_seq_length": max_pair_tokens, "opset": opset, "optimized": OPTIMIZED,
         "score": "logit; relevance = sigmoid(logit)"}, indent=2))
    return onnx_path


def optimize_onnx(src: Path, dst: Path) -> None:
    """ONNX Runtime's offline graph optimisation (constant folding, node fusions), saved once so each
    replica does not redo it at start. EXTENDED, not ALL: ALL adds layout changes tied to this CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])


def quantize_int8(export_dir: str | Path, out_dir: str | Path) -> Path:
    """Dynamic int8 weights, per channel (per-tensor int8 was too lossy for MiniLM: cosine ~0.965)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    export_dir, out_dir = Path(export_dir), Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    # The fp32 TensorRT engine cache stays behind: 'auto' would load an engine built for the fp32 graph.
    shutil.copytree(export_dir, out_dir, ignore=shutil.ignore_patterns("model.onnx", OPTIMIZED, "trt_cache"))
    # It advises "pre-processing" (shape inference for static quantization) on the root logger; dynamic
    # int8 does not need it, and the int8 check below measures the result.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(export_dir / "model.onnx", out_dir / "model.onnx", per_channel=True,
                         weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    optimize_onnx(out_dir / "model.onnx", out_dir / OPTIMIZED)
    info = json.loads((out_dir / "export.json").read_text())
    (out_dir / "export.json").write_text(json.dumps({**info, "quantization": "int8-dynamic-per-channel"}, indent=2))
    return out_dir


def parity(reference: np.ndarray, embedder: OnnxEmbedder, texts: list[str]) -> dict:
    """Per-text cosine between the torch embeddings and an ONNX session's for the same texts."""
    got = embedder.encode(texts)
    cos = np.sum(reference * got, axis=1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(got, axis=1))
    return {"texts": len(texts), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "max_abs_diff": float(np.abs(reference - got).max())}


def parity_gate(model_dir: str | Path, export_dir: str | Path, texts: list[str], min_cosine: float,
                devices: list[str]) -> dict:
    """Parity of every graph serving may load (portable, optimised, TensorRT) against torch."""
    reference = load_model(str(model_dir), device="cpu").encode(texts, normalize_embeddings=True,
                                                               convert_to_numpy=True)
    checks = {"onnx": parity(reference, OnnxEmbedder(export_dir, optimized=False), texts),
              "onnx-optimized": parity(reference, OnnxEmbedder(export_dir), texts)}
    for device in devices:
        checks[device] = parity(reference, OnnxEmbedder(export_dir, device=device), texts)
    worst = min(checks, key=lambda k: checks[k]["min_cosine"])
    return {"texts": len(texts), "threshold": min_cosine, "checks": checks, "worst": worst,
            "min_cosine": checks[worst]["min_cosine"], "passed": checks[worst]["min_cosine"] >= min_cosine}


def reranker_parity_gate(model_dir: str | Path, export_dir: str | Path, pairs: list[tuple[str, str]],
                         max_diff: float, devices: list[str]) -> dict:
    """Every reranker graph serving may load against torch: the largest score difference over real pairs."""
    from pipeline.crossencoder import OnnxReranker, Reranker

    reference = Reranker(str(model_dir)).score_pairs(pairs)
    graphs = {"onnx": OnnxReranker(export_dir, optimized=False), "onnx-optimized": OnnxReranker(export_dir),
              **{device: OnnxReranker(export_dir, device=device) for device in devices}}
    checks = {name: float(np.abs(reference - graph.score_pairs(pairs)).max()) for name, graph in graphs.items()}
    worst = max(checks, key=checks.get)
    return {"pairs": len(pairs), "threshold": max_diff, "max_abs_diff": checks, "worst": worst,
            "passed": checks[worst] <= max_diff}


def split_rows(run, n: int) -> list[dict]:
    """Up to n rows of the test split (the train split when it is empty): queries with their positive and mined
    negatives, the reranker's real pairs."""
    import pyarrow.parquet as pq

    for split in ("test", "train"):
        rows = pq.read_table(run.root / "prep" / f"{split}.parquet").slice(0, n).to_pylist()
        if rows:
            return rows
    return []


def export_reranker(cfg, run, rec, devices: list[str]) -> dict:
    """The shipped reranker's graph, its parity gate, and its int8 variant kept only within the NDCG tolerance."""
    model_dir, out_dir = run.root / "rerank" / "model", rec.dir / "reranker"
    shutil.rmtree(out_dir, ignore_errors=True)
    export_reranker_onnx(model_dir, out_dir, cfg.export.opset)
    rows = split_rows(run, max(cfg.export.parity_texts, cfg.rerank.val_max_queries))
    pairs = [(r["query"], t) for r in rows for t in (r["positive_text"], *r["negative_texts"])][:cfg.export.parity_texts]
    report = reranker_parity_gate(model_dir, out_dir, pairs, cfg.export.reranker_max_score_diff, devices)
    (rec.dir / "reranker-parity.json").write_text(json.dumps(report, indent=2))
    if not report["passed"]:
        raise ParityError(f"the reranker's {report['worst']} graph diverges from torch: a score differs by "
                          f"{report['max_abs_diff'][report['worst']]:.6f} > {cfg.export.reranker_max_score_diff} "
                          f"over {report['pairs']} pairs (see {rec.dir / 'reranker-parity.json'})")
    summary = {"parity": report}
    if cfg.export.int8:
        summary["int8"] = reranker_int8_variant(cfg, run, rec, rows[:cfg.rerank.val_max_queries])
    return summary


def reranker_int8_variant(cfg, run, rec, rows: list[dict]) -> dict:
    """Quantise the reranker; keep it if reranking `rows`' candidates (the test split) costs at most the tolerance."""
    from pipeline.crossencoder import OnnxReranker
    from pipeline.training import RerankValidation

    int8_dir = quantize_int8(rec.dir / "reranker", rec.dir / "reranker-int8")
    ranking = RerankValidation(rows, len(rows))
    fp32, int8 = (ranking.ndcg10(OnnxReranker(d).score_pairs) for d in (rec.dir / "reranker", int8_dir))
    return int8_verdict(cfg, run, rec, "reranker-int8", fp32, int8, {"queries": len(ranking)})


def run_stage(cfg, run, rec) -> None:
    import pyarrow.parquet as pq

    model_dir = run.root / "merge" / "model"  # the shipped model
    out_dir = rec.dir / "onnx"
    shutil.rmtree(out_dir, ignore_errors=True)
    export_onnx(model_dir, out_dir, cfg.export.opset)
    rec.phase("export")
    chunks = pq.read_table(run.root / "corpus" / "chunks.parquet").slice(0, cfg.export.parity_texts).to_pylist()
    queries = pq.read_table(run.root / "sdg" / "qa.parquet").slice(0, cfg.export.parity_texts).column("query")
    texts = [passage_text(c["title"], c["text"]) for c in chunks] + queries.to_pylist()
    devices = []
    if cfg.export.tensorrt != "off":
        why_not = tensorrt_unavailable()
        if why_not and cfg.export.tensorrt == "required":
            raise RetrofitError(f"export.tensorrt is 'required' but {why_not}")
        if why_not:
            print(f"[export] TensorRT engine skipped: {why_not}", flush=True)
        else:
            devices.append("tensorrt")  # building its session builds (and caches) the fp16 engine
    report = parity_gate(model_dir, out_dir, texts, cfg.export.min_cosine, devices)
    report["tensorrt"] = "built" if devices else ("off" if cfg.export.tensorrt == "off" else why_not)
    (rec.dir / "parity.json").write_text(json.dumps(report, indent=2))
    rec.manifest.counts = {"parity": report}
    if not report["passed"]:
        raise ParityError(f"the {report['worst']} graph diverges from torch: min cosine {report['min_cosine']:.6f} "
                          f"< {cfg.export.min_cosine} over {report['texts']} texts (see {rec.dir / 'parity.json'})")
    rec.phase("parity")
    if cfg.export.int8:
        rec.manifest.counts["int8"] = int8_variant(cfg, run, rec)
        rec.phase("int8")
    if (run.root / "rerank" / "model").is_dir():  # the rerank stage's gate shipped one
        rec.manifest.counts["reranker"] = export_reranker(cfg, run, rec, devices)
        rec.phase("reranker")


def int8_variant(cfg, run, rec) -> dict:
    """Quantise, measure the NDCG@10 it costs on the test split, keep it only within the tolerance."""
    int8_dir = quantize_int8(rec.dir / "onnx", rec.dir / "onnx-int8")
    for variant in ("onnx", "onnx-int8"):  # Ray workers on other nodes fetch a bucket run's models themselves
        run.push(f"export/{variant}")
    result = evaluate_models(run.root / "prep" / "beir_test", {"fp32": f"{run.location}/export/onnx",
                                                             "int8": f"{run.location}/export/onnx-int8"},
                             cfg.eval.top_k, run.root / "cache" / "eval", cfg.eval.texts_per_batch, references=False)
    return int8_verdict(cfg, run, rec, "onnx-int8", result.means["fp32"]["ndcg@10"], result.means["int8"]["ndcg@10"])


def int8_verdict(cfg, run, rec, variant: str, fp32: float, int8: float, extra: dict | None = None) -> dict:
    """Keep export/VARIANT only if its NDCG@10 is within export.int8_max_ndcg_loss of fp32; the figures go to
    the variant's JSON file (int8.json for the embedder's onnx-int8, VARIANT.json otherwise) and the console."""
    loss = fp32 - int8
    kept = loss <= cfg.export.int8_max_ndcg_loss
    summary = {**(extra or {}), "ndcg@10_fp32": fp32, "ndcg@10_int8": int8, "ndcg@10_loss": round(loss, 5),
               "tolerance": cfg.export.int8_max_ndcg_loss, "kept": kept}
    name = "int8.json" if variant == "onnx-int8" else f"{variant}.json"
    (rec.dir / name).write_text(json.dumps(summary, indent=2))
    if not kept:
        run.clear(f"export/{variant}")
    what = "int8 variant: NDCG@10" if variant == "onnx-int8" else "reranker int8 variant: reranking NDCG@10"
    print(f"[export] {what} {fp32:.4f} -> {int8:.4f} "
          f"({'kept' if kept else 'dropped: loss above ' + str(cfg.export.int8_max_ndcg_loss)})", flush=True)
    return summary
