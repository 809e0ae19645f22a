"""Training on Ray Train: a killed worker resumes exactly; every epoch reaches the kept model."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.prep import SPLIT_SCHEMA

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


def _parsed(text: str) -> dict | None:
    """JSON that another process may be writing right now: None until it is whole."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _worker_pids() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]


def test_killed_worker_resumes_exactly_with_two_deepspeed_workers(tmp_path, ray_local):
    """2 DeepSpeed ZeRO-2 workers on CPU; SIGKILL one mid-epoch, a few steps after a checkpoint. Ray Train
    restarts the group from that checkpoint, and the resumed run redoes those steps with the same losses
    (weights, optimiser moments, schedule, dropout RNG and sampler position all restored)."""
    from pipeline.config import load_config
    from pipeline.runner import run_stage

    run = _prep_run(tmp_path / "run")
    cfg = load_config(None, ["corpus.chunk_tokens=32", "corpus.chunk_overlap=8",
                             "train.num_workers=2", "train.engine=deepspeed", "train.queries_per_worker=2",
                             "train.epochs=2", "train.checkpoint_every_steps=4", "train.max_query_tokens=48",
                             "train.max_passage_tokens=32", "train.negatives_per_query=1", "train.keep=last",
                             # A hard task (loss ~2, not ~1e-4), so equal losses mean something.
                             "train.loss_temperature=1.0", "train.lr=1e-3"])
    log = run.root / "train" / "train_log.jsonl"
    from pipeline.training import own_torch_extensions_dir

    op = next(Path(own_torch_extensions_dir()).glob("deepspeed_shm_comm/*.so"), None)
    assert op is not None, "DeepSpeed's CPU op is built by `make venv` (.venv/bin/python -m pipeline.warmup)"
    built = op.stat().st_mtime
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("status", run_stage("train", cfg, run)), daemon=True)
    worker.start()

    def records():
        return [r for r in map(_parsed, log.read_text().splitlines()) if r is not None] if log.exists() else []

    def registered_step() -> int:
        # The newest checkpoint Ray Train's controller has registered, i.e. what a restart resumes from. Its
        # files appear earlier (rank 0's before rank 1's report): a kill between the two resumes from the one before.
        snapshots = (run.root / "cache" / "ray_train").glob("train-*/checkpoint_manager_snapshot.json")
        states = [_parsed(p.read_text()) for p in snapshots]  # a file being written reads as partial: skipped
        return max((s["latest_checkpoint_result"]["metrics"]["global_step"] for s in states
                    if s and s.get("latest_checkpoint_result")), default=-1)

    deadline = time.time() + 600
    while time.time() < deadline:
        ckpt = registered_step()
        steps = [r["step"] for r in records() if "step" in r]
        if 0 < ckpt < 10 and steps and steps[-1] >= ckpt + 1:  # mid-epoch, two steps past the checkpoint:
            break                                                # the second redone step needs the moments
        time.sleep(0.2)
    pids = _worker_pids()
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGKILL)
    worker.join(timeout=900)
    assert outcome.get("status") == "completed"

    recs = records()
    starts = [i for i, r in enumerate(recs) if r.get("event") == "start"]
    assert len(starts) == 2
    first, second = recs[:starts[1]], recs[starts[1]:]
    resumed_at = second[0]["global_step"]
    assert 0 < resumed_at < 10 and second[0]["global_batch"] == 4 and second[0]["steps_per_epoch"] == 10
    before = {r["step"]: r["loss"] for r in first if "step" in r}
    after = {r["step"]: r["loss"] for r in second if "step" in r}
    redone = sorted(set(before) & set(after))
    assert len(redone) >= 2 and redone[0] == resumed_at  # continues where the checkpoint left off...
    for step in redone:                                  # ...with the same loss curve, not only the step number
        assert before[step] > 0.1 and abs(before[step] - after[step]) < 1e-5 * before[step], (step, before, after)
    assert sorted(after) == list(range(resumed_at, 20))
    manifest = json.loads((run.root / "train" / "manifest.json").read_text())
    assert manifest["counts"]["steps"] == 20 and manifest["counts"]["restarts"] == 1  # 2 epochs x 40 rows / 4
    assert op.stat().st_mtime == built  # every worker start, before and after the kill, loaded warmup's build
    assert manifest["counts"]["engine"] == "deepspeed" and manifest["counts"]["global_batch"] == 4
    assert len(manifest["counts"]["val_ndcg@10"]) >= 2
    assert list((run.root / "train" / "tensorboard").glob("events.out.tfevents.*"))
    from pipeline.embedders import load_model

    # The saved length is the longer of the two (queries here), not the one encode() used last (passages).
    assert load_model(str(run.root / "train" / "model"), device="cpu").max_seq_length == 48


def test_last_epoch_reaches_the_kept_model_without_step_checkpoints(tmp_path, ray_local):
    """checkpoint_every_steps=0: the only checkpoints are epoch ends, and the last one is the kept model."""
    from pipeline.config import load_config
    from pipeline.runner import run_stage

    run = _prep_run(tmp_path / "run")
    cfg = load_config(None, ["corpus.chunk_tokens=32", "corpus.chunk_overlap=8",
                             "train.engine=ddp", "train.queries_per_worker=16", "train.epochs=3", "train.keep=last",
                             "train.max_query_tokens=32", "train.max_passage_tokens=32", "train.negatives_per_query=1"])
    assert run_stage("train", cfg, run) == "completed"
    counts = json.loads((run.root / "train" / "manifest.json").read_text())["counts"]
    assert counts["steps"] == 3 * 3  # 3 epochs x ceil(40 rows / 16)
    assert [s for s, _ in counts["val_ndcg@10"]] == [3, 6, 9]


def test_val_off_checkpoints_for_resume_only_and_keeps_the_last(tmp_path, ray_local):
    """train.val_at_checkpoints=false (with keep=last): every checkpoint is still written, none is scored."""
    from pipeline.config import load_config
    from pipeline.runner import run_stage

    run = _prep_run(tmp_path / "run")
    cfg = load_config(None, ["corpus.chunk_tokens=32", "corpus.chunk_overlap=8", "train.engine=ddp",
                             "train.queries_per_worker=16", "train.epochs=2", "train.keep=last",
                             "train.val_at_checkpoints=false", "train.max_query_tokens=32",
                             "train.max_passage_tokens=32", "train.negatives_per_query=1"])
    assert run_stage("train", cfg, run) == "completed"
    counts = json.loads((run.root / "train" / "manifest.json").read_text())["counts"]
    assert counts["val_ndcg@10"] == [] and counts["kept_checkpoint"]["global_step"] == counts["steps"] == 2 * 3
    log = [json.loads(line) for line in (run.root / "train" / "train_log.jsonl").read_text().splitlines()]
    assert not [r for r in log if r.get("event") == "val"] and len([r for r in log if "loss" in r]) == 6
    # Ray Train registered both epochs' checkpoints (what a restart resumes from), neither with a val score.
    snapshot = json.loads(next((run.root / "cache" / "ray_train").glob("train-*/checkpoint_manager_snapshot.json"))
                          .read_text())
    assert sorted(c["metrics"]["global_step"] for c in snapshot["checkpoint_results"]) == [3, 6]
    assert not any("val_ndcg@10" in c["metrics"] for c in snapshot["checkpoint_results"])


def test_workers_this_ray_can_never_place_are_a_clear_error_not_a_hang(tmp_path, ray_local):
    """The embedded Ray has 2 CPUs; 2 workers x 4 CPUs would wait forever for a placement."""
    import pytest

    from pipeline.config import load_config
    from pipeline.errors import RetrofitError
    from pipeline.runner import run_stage

    run = _prep_run(tmp_path / "run")
    cfg = load_config(None, ["corpus.chunk_tokens=32", "corpus.chunk_overlap=8", "train.num_workers=2",
                             "train.placement.cpus_per_worker=4", "train.max_passage_tokens=32"])
    with pytest.raises(RetrofitError, match=r"train needs \{'CPU': 8.0\}.*in all"):
        run_stage("train", cfg, run)


def test_max_steps_ends_training_inside_an_epoch_with_a_checkpoint_there(tmp_path, base_model):
    """train.max_steps=2 of 3 steps per epoch: training stops at step 2, that step is checkpointed (and
    validated), and the schedule is sized for 2 steps (its lr reaches 0 there), not for the 9 of 3 epochs."""
    from pipeline.config import load_config
    from pipeline.train import Worker

    run = _prep_run(tmp_path / "run")
    cfg = load_config(None, ["corpus.chunk_tokens=32", "corpus.chunk_overlap=8", "train.engine=ddp",
                             "train.queries_per_worker=16", "train.epochs=3", "train.max_steps=2",
                             "train.max_query_tokens=32", "train.max_passage_tokens=32", "train.negatives_per_query=1"])
    reports = []
    config = {"train": cfg.train, "seed": 13, "base_model": base_model,
              "train_path": str(run.root / "prep" / "train.parquet"), "val_path": str(run.root / "prep" / "val.parquet"),
              "log_path": str(tmp_path / "log.jsonl"), "tensorboard_dir": str(tmp_path / "tb")}
    worker = Worker(config, rank=0, world=1, resume_dir=None,
                    report=lambda metrics, folder: reports.append((metrics, sorted(p.name for p in folder.iterdir()))))
    try:
        worker.run()
    finally:
        worker.close()
    assert worker.sampler.steps_per_epoch == 3  # ceil(40 rows / 16): the limit falls inside epoch 0
    assert [(m["global_step"], m["epoch"]) for m, _ in reports] == [(2, 0)]
    assert "val_ndcg@10" in reports[0][0] and "model" in reports[0][1]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[0]["total_steps"] == 2
    assert [r["step"] for r in log if "loss" in r and "event" not in r] == [0, 1]
    assert worker.engine.lr == 0.0  # cosine schedule over the 2 steps run, ended
