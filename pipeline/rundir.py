"""The run directory: one subfolder per stage, each with a manifest.json.

A manifest records the stage's config hash, the fingerprints of its inputs, counts, timings,
library versions, its status and fingerprints of what it wrote. A completed stage whose config hash
and input fingerprints are unchanged is skipped on rerun; anything else reruns it. A run folder may be a
bucket (`s3://bucket/prefix`): the stages then work in a local mirror of it (pipeline/storage.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from pipeline.errors import RetrofitError
from pipeline.storage import Folder

STAGES = ("corpus", "sdg", "prep", "train", "merge", "rerank", "eval", "export", "serve")
# What a run folder holds, stage by stage: the docs' run-folder reference is written from this, and the
# end-to-end test checks that a run writes each path (those marked "when ..." are conditional).
LAYOUT: dict[str, str] = {
    "config.yaml": "the resolved config of the last run",
    "corpus/chunks.parquet": "chunk_id, doc_id, title, text, chunk_index, n_tokens",
    "sdg/qa.parquet": "qa_id, query, chunk_id, doc_id, query_type, generator",
    "sdg/shards/": "one Parquet file per finished shard (the unit of resume)",
    "prep/train.parquet": "training rows: query, positive, hard negatives with their scores",
    "prep/val.parquet": "val rows (held-out documents), scored at checkpoints",
    "prep/test.parquet": "test rows (held-out documents)",
    "prep/beir_test/": "the test split in BEIR format, its corpus every chunk",
    "train/model/": "the fine-tuned sentence-transformers model (safetensors)",
    "train/train_log.jsonl": "loss, lr, examples/s and val NDCG@10 per logged step",
    "train/tensorboard/": "the same, for TensorBoard",
    "merge/model/": "the shipped model (what eval scores and export exports)",
    "rerank/manifest.json": "whether a reranker was trained, its training counts and the gate's verdict",
    "rerank/candidate/": "when rerank.enabled and the gate refused it: the trained reranker (a cross-encoder folder)",
    "rerank/model/": "when rerank.enabled and the gate passed it: the shipped reranker (a cross-encoder folder)",
    "rerank/train_log.jsonl": "when rerank.enabled: the reranker's loss and lr per step",
    "eval/metrics.json": "base and shipped model per metric, deltas, significance, verdicts, per query type",
    "eval/report.md": "the same as a report, with the largest wins and losses",
    "eval/metrics.png": "the headline metrics as a bar chart",
    "eval/per_query.parquet": "every query's metrics and top hit, per model",
    "export/onnx/": "model.onnx (portable), model.opt.onnx (ORT-optimised), tokenizer, export.json (prompts)",
    "export/parity.json": "every exported graph against torch on real texts",
    "export/int8.json": "when export.int8: the int8 variant's NDCG@10 against fp32, and whether it was kept",
    "export/onnx-int8/": "when its NDCG@10 loss is within export.int8_max_ndcg_loss: the dynamic int8 variant",
    "export/reranker/": "when a reranker shipped: model.onnx (its scoring head in the graph), model.opt.onnx, "
                        "tokenizer, export.json (pair length)",
    "export/reranker-parity.json": "when a reranker shipped: each reranker graph against torch on real pairs",
    "export/reranker-int8.json": "when a reranker shipped and export.int8: its int8 variant's reranking NDCG@10",
    "export/reranker-int8/": "when that loss is within export.int8_max_ndcg_loss: the reranker's int8 variant",
    "serve/manifest.json": "when the run served: the endpoint's answer to the smoke query",
    "cache/": "embedding cache (keyed by model and data fingerprints), Ray Train's storage",
}
VERSIONED_PACKAGES = ("torch", "transformers", "sentence-transformers", "ray", "faiss-cpu", "onnxruntime", "pyarrow")


def file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def tree_fingerprint(path: Path) -> str:
    """Content hash of a file, or of every file under a folder (relative names included)."""
    path = Path(path)
    if path.is_file():
        return file_fingerprint(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode())
        h.update(file_fingerprint(p).encode())
    return h.hexdigest()[:16]


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class Manifest:
    """Each stage folder's manifest.json (the comments are the docs' run-folder reference)."""
    stage: str  # the stage's name
    status: str = "running"  # running | completed | failed
    config_hash: str = ""  # hash of the settings the stage reads: with the inputs, its identity
    config_schema: int | None = None  # config.CONFIG_SCHEMA of the Retrofit that wrote it (None: schema 1)
    settings: dict = field(default_factory=dict)  # 'section.field' -> value, what config_hash was made from
    inputs: dict = field(default_factory=dict)  # name -> fingerprint
    outputs: dict = field(default_factory=dict)  # relative path -> fingerprint
    counts: dict = field(default_factory=dict)  # what the stage made and dropped, and why (stage-specific)
    timings: dict = field(default_factory=dict)  # seconds: total, and the stage's own parts
    versions: dict = field(default_factory=dict)  # python and the main libraries
    error: str | None = None  # the failure, when status is failed
    started_at: float = 0.0  # Unix time
    finished_at: float = 0.0  # Unix time

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True, default=str)


class RunDir(Folder):
    """The run folder: a local folder or a bucket URI (see storage.Folder)."""

    def stage_dir(self, stage: str) -> Path:
        if stage not in STAGES:
            raise RetrofitError(f"unknown stage {stage!r}; stages are {STAGES}")
        d = self.root / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def manifest_path(self, stage: str) -> Path:
        return self.root / stage / "manifest.json"

    def read_manifest(self, stage: str) -> Manifest | None:
        p = self.pull(f"{stage}/manifest.json")
        if not p.exists():
            return None
        return Manifest(**json.loads(p.read_text()))

    def write_manifest(self, m: Manifest) -> None:
        p = self.manifest_path(m.stage)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(m.to_json())
        os.replace(tmp, p)  # atomic: a crash never leaves half a manifest
        self.push(f"{m.stage}/manifest.json")

    def require(self, stage: str, needed_by: str) -> Manifest:
        m = self.read_manifest(stage)
        if m is None or m.status != "completed":
            raise StageInputMissing(
                f"stage '{needed_by}' needs the output of stage '{stage}' in {self.location}/{stage}; "
                f"run `retrofit {stage} --out {self.location}` (or `retrofit run`) first")
        return m

    def outputs_fingerprint(self, stage: str, needed_by: str) -> str:
        m = self.require(stage, needed_by)
        return hashlib.sha256(json.dumps(m.outputs, sort_keys=True).encode()).hexdigest()[:16]


class StageInputMissing(RuntimeError):
    pass


class StageRecorder:
    """Context manager around one stage run: writes running/completed/failed manifests."""

    def __init__(self, run: RunDir, stage: str, config_hash: str, inputs: dict, settings: dict | None = None,
                 config_schema: int | None = None):
        self.run, self.stage = run, stage
        self.dir = run.stage_dir(stage)
        self.manifest = Manifest(stage=stage, config_hash=config_hash, config_schema=config_schema,
                                 settings=settings or {}, inputs=inputs, versions=_versions(), started_at=time.time())
        self._t0 = time.perf_counter()
        self._phase_t0 = self._t0

    def up_to_date(self) -> bool:
        old = self.run.read_manifest(self.stage)
        return (old is not None and old.status == "completed" and old.config_hash == self.manifest.config_hash
                and old.inputs == self.manifest.inputs)

    def phase(self, name: str) -> None:
        """Close the current timing phase under `name`."""
        now = time.perf_counter()
        self.manifest.timings[name] = round(now - self._phase_t0, 3)
        self._phase_t0 = now

    def output(self, relpath: str) -> Path:
        return self.dir / relpath

    def __enter__(self):
        self.run.write_manifest(self.manifest)
        return self

    def __exit__(self, exc_type, exc, tb):
        self.manifest.finished_at = time.time()
        self.manifest.timings["total"] = round(time.perf_counter() - self._t0, 3)
        if exc is None:
            self.manifest.status = "completed"
            self.manifest.outputs = {
                str(p.relative_to(self.dir)): file_fingerprint(p)
                for p in sorted(self.dir.rglob("*")) if p.is_file() and p.name != "manifest.json"
                and not p.name.endswith(".tmp")}
        else:
            self.manifest.status = "failed"
            self.manifest.error = f"{exc_type.__name__}: {exc}"
        try:
            self.run.push(self.stage, skip=("manifest.json",))  # the files first: a manifest vouches for them
            self.run.write_manifest(self.manifest)
        except Exception as e:  # a bucket out of reach must not hide why the stage itself failed
            if exc is None:
                raise
            print(f"[{self.stage}] could not record the failure in {self.run.location}: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
        return False
