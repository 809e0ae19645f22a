"""Training on Ray Train: GradCache equals the full batch; a killed worker does not lose the run."""
import json
import os
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.prep import SPLIT_SCHEMA
from pipeline.train import grad_cache_step, info_nce

TOPICS = ["json parsing", "file paths", "regular expressions", "date formats", "http requests", "sockets",
          "threads", "subprocesses", "logging", "zip archives", "csv files", "sqlite", "unit tests",
          "argument parsing", "random numbers", "hashing", "decimal arithmetic", "text wrapping",
          "temporary files", "email messages", "xml trees", "bisect search", "heap queues", "pickling"]


def _rows(prefix: str, topics: list[str]) -> list[dict]:
    rows = []
    for i, t in enumerate(topics):
        other = [topics[(i + k) % len(topics)] for k in (1, 2)]
        rows.append({"qa_id": f"{prefix}{i}", "query": f"how do I handle {t} in python?", "query_type": "question",
                     "positive_id": f"{prefix}c{i}", "positive_doc_id": f"{prefix}d{i}",
                     "positive_text": f"The module for {t} offers functions and classes for {t}.",
                     "positive_score": 0.5, "negative_ids": [f"{prefix}n{i}a", f"{prefix}n{i}b"],
                     "negative_texts": [f"Notes about {o}, unrelated to the question." for o in other],
                     "negative_scores": [0.3, 0.2], "positive_ids": [f"{prefix}c{i}"]})
    return rows


def test_grad_cache_gives_the_full_batch_loss_and_gradients(base_model):
    from pipeline.encode import load_model

    model = load_model(base_model, device="cpu").eval()  # eval: no dropout, so both paths are deterministic
    rows = _rows("g", TOPICS[:6])
    queries = [r["query"] for r in rows]
    passages = [r["positive_text"] for r in rows] + [t for r in rows for t in r["negative_texts"]]
    ids = [r["positive_id"] for r in rows] + [i for r in rows for i in r["negative_ids"]]

    def encode(texts, kind):
        features = model.tokenize(texts)
        return torch.nn.functional.normalize(model(features)["sentence_embedding"], dim=-1)

    def loss_fn(q, p):
        return info_nce(q, p, ids[:6], ids, 0.05)

    full = loss_fn(encode(queries, 0), encode(passages, 1))
    full.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    cached = grad_cache_step(encode, queries, passages, loss_fn, lambda x: x.backward(), chunk=4, seed=1)
    assert abs(cached - full.item()) < 1e-5
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6, rtol=1e-3), name


def _prep_run(root):
    """A run folder whose corpus, sdg and prep stages are complete (small real split files)."""
    from pipeline.rundir import RunDir, StageRecorder

    run = RunDir(root)
    for stage in ("corpus", "sdg"):
        with StageRecorder(run, stage, "h", {}) as rec:
            (rec.dir / "placeholder.txt").write_text(stage)
    with StageRecorder(run, "prep", "h", {}) as rec:
        pq.write_table(pa.Table.from_pylist(_rows("t", TOPICS[:20] * 2), SPLIT_SCHEMA), rec.output("train.parquet"))
        pq.write_table(pa.Table.from_pylist(_rows("v", TOPICS[20:]), SPLIT_SCHEMA), rec.output("val.parquet"))
    return run


def test_killed_worker_resumes_from_its_checkpoint_with_two_deepspeed_workers(tmp_path, ray_local):
    """2 DeepSpeed ZeRO-2 workers on CPU; SIGKILL one after the first step checkpoint; Ray Train restarts
    the group from that checkpoint, the step count continues and the stage completes."""
    from pipeline.config import load_config
    from pipeline.runner import run_stage

    run = _prep_run(tmp_path / "run")
    cfg = load_config(None, ["train.num_workers=2", "train.engine=deepspeed", "train.batch_size=2",
                             "train.epochs=2", "train.checkpoint_every_steps=3", "train.max_query_tokens=48",
                             "train.max_passage_tokens=32", "train.negatives_per_query=1", "train.keep=last"])
    log = run.root / "train" / "train_log.jsonl"
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("status", run_stage("train", cfg, run)), daemon=True)
    worker.start()

    def records():
        return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []

    def checkpointed() -> bool:  # persisted by the worker and, two steps later, registered by Ray Train
        return (any(r.get("step", -1) >= 5 for r in records())
                and any((run.root / "cache" / "ray_train").glob("train-*/checkpoint_*")))

    deadline = time.time() + 600
    while time.time() < deadline and not checkpointed():
        time.sleep(0.5)
    time.sleep(2)  # Ray Train's controller polls workers for reports: let it take the checkpoint in
    pids = json.loads((run.root / "train" / "worker_pids.json").read_text())
    os.kill(pids[1], signal.SIGKILL)
    worker.join(timeout=900)
    assert outcome.get("status") == "completed"

    recs = records()
    starts = [r for r in recs if r.get("event") == "start"]
    assert len(starts) == 2 and starts[0]["global_step"] == 0 and starts[1]["global_step"] >= 3
    after = [r for r in recs[recs.index(starts[1]):] if "step" in r]
    assert after[0]["step"] == starts[1]["global_step"]  # continues where the checkpoint left off
    manifest = json.loads((run.root / "train" / "manifest.json").read_text())
    total = 2 * (40 // 4)  # 2 epochs x (40 rows / (2 per worker x 2 workers))
    assert manifest["counts"]["steps"] == total and manifest["counts"]["restarts"] == 1
    assert manifest["counts"]["engine"] == "deepspeed"
    assert len(manifest["counts"]["val_ndcg@10"]) >= 2
    assert list((run.root / "train" / "tensorboard").glob("events.out.tfevents.*"))
    from pipeline.encode import load_model

    # The saved length is the longer of the two (queries here), not the one encode() used last (passages).
    assert load_model(str(run.root / "train" / "model"), device="cpu").max_seq_length == 48
