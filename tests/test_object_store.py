"""Run folders in a bucket: a real S3-compatible server (moto) on 127.0.0.1, credentials from the environment.

Each "machine" is its own mirror folder (RETROFIT_MIRROR): what one machine knows, another must read
from the bucket."""
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tests.conftest import S3_SECRET, free_port

TINY = ["corpus.sample_docs=4", "corpus.chunk_tokens=128", "corpus.chunk_overlap=16", "sdg.query_types.question=1",
        "sdg.query_types.keyword=0", "sdg.shard_size=2", "sdg.placement.num_actors=2", "prep.roundtrip_top_k=0",
        "train.epochs=1", "train.queries_per_worker=4", "train.max_passage_tokens=128", "export.int8=false",
        "export.parity_texts=20"]
STAGES = ("corpus", "sdg", "prep", "train", "merge", "rerank", "eval", "export")


@pytest.fixture
def machine(s3_server, tmp_path, monkeypatch):
    """Switch this process to 'machine' NAME: its own mirror folder, the bucket's credentials."""
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)

    def use(name: str):
        monkeypatch.setenv("RETROFIT_MIRROR", str(tmp_path / name))
        return tmp_path / name
    return use


def objects(s3_server, prefix: str) -> dict:
    """key -> (size, ETag) of every object under `prefix` in the test bucket (not pyarrow's folder markers)."""
    pages = s3_server["client"].get_paginator("list_objects_v2").paginate(Bucket="retrofit-test", Prefix=prefix)
    return {o["Key"]: (o["Size"], o["ETag"]) for page in pages for o in page.get("Contents", [])
            if not o["Key"].endswith("/")}


def read_object(s3_server, key: str) -> bytes:
    return s3_server["client"].get_object(Bucket="retrofit-test", Key=key)["Body"].read()


def test_a_mirror_pulls_what_the_bucket_changed_and_pushes_what_it_changed(machine, s3_server):
    from pipeline.storage import Folder

    machine("a")
    a = Folder(f"{s3_server['bucket']}/unit")
    (a.root / "x").mkdir()
    (a.root / "x" / "one.txt").write_text("first")
    (a.root / "x" / "two.txt").write_text("second")
    a.push("x")
    assert set(objects(s3_server, "unit/")) == {"unit/x/one.txt", "unit/x/two.txt"}
    assert a.mirror.push("x") == 0  # nothing changed since: nothing sent

    machine("b")
    b = Folder(f"{s3_server['bucket']}/unit")
    assert b.root != a.root and (b.pull("x") / "one.txt").read_text() == "first"
    (b.root / "x" / "one.txt").write_text("first, rewritten on b")
    b.push("x")
    b.clear("x/two.txt")
    assert set(objects(s3_server, "unit/")) == {"unit/x/one.txt"}

    machine("a")
    assert a.mirror.pull("x") == 1  # only the changed file travels
    assert (a.root / "x" / "one.txt").read_text() == "first, rewritten on b"
    assert not (a.root / "x" / "two.txt").exists()  # the bucket is the truth
    assert a.describe("x") == "1 files, 0.0 MiB" and a.describe("nothing-here") is None


def test_a_bad_bucket_location_is_a_one_line_error(machine, tmp_path):
    machine("a")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "corpus", "--corpus", "sample", "--out",
                           "nosuchfs://bucket/run"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "nosuchfs://bucket/run: cannot open this location" in proc.stderr
    assert "Traceback" not in proc.stderr


def _retrofit(*args, env_mirror):
    import os

    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "RETROFIT_MIRROR": str(env_mirror)})
    assert proc.returncode == 0, f"retrofit {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def test_a_run_in_a_bucket_survives_a_kill_and_finishes_on_another_machine(machine, s3_server, tmp_path):
    """Machine a's SDG is SIGKILLed mid-stage (no stage end, so only what its actors pushed reaches the
    bucket); machine b, which never saw the run, finishes it from the bucket alone."""
    import io
    import os
    import signal
    import time

    run = f"{s3_server['bucket']}/runs/tiny"
    sets = f"{s3_server['bucket']}/eval-sets"
    args = [a for s in TINY + [f"prep.eval_set_root={sets}", f"serve.port={free_port()}"] for a in ("--set", s)]
    _retrofit("corpus", "--corpus", "sample", "--out", run, *args, env_mirror=machine("a"))

    def shards_in_bucket() -> dict:
        return {k: v for k, v in objects(s3_server, "runs/tiny/sdg/shards/").items() if k.endswith(".parquet")}

    with open(tmp_path / "sdg.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "sdg", "--out", run, *args],
                                start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "RETROFIT_MIRROR": str(tmp_path / "a")})
    deadline = time.time() + 600
    while time.time() < deadline and len(shards_in_bucket()) < 2:
        assert proc.poll() is None, f"retrofit sdg exited early:\n{(tmp_path / 'sdg.log').read_text()[-3000:]}"
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stable, last = 0, None  # an actor may finish the shard it was on as Ray goes down
    while stable < 3:
        now = shards_in_bucket()
        stable, last = (stable + 1 if now == last else 0), now
        time.sleep(1)
    finished = shards_in_bucket()
    n_chunks = pq.read_table(io.BytesIO(read_object(s3_server, "runs/tiny/corpus/chunks.parquet"))).num_rows
    total_shards = (n_chunks + 1) // 2
    assert 2 <= len(finished) < total_shards, "the kill must land mid-stage"
    assert json.loads(read_object(s3_server, "runs/tiny/sdg/manifest.json"))["status"] == "running"

    output = _retrofit("run", "--corpus", "sample", "--out", run, *args, env_mirror=machine("b"))
    assert f"{len(finished)} finished shard(s) kept, {total_shards - len(finished)} to go" in output
    assert all(shards_in_bucket()[k] == v for k, v in finished.items())  # untouched in the bucket
    assert "/v1/embeddings answered" in output  # the endpoint served the model from the bucket

    # Everything a stage wrote is in the bucket, as its manifest (in the bucket) records it.
    stored = objects(s3_server, "runs/tiny/")
    for stage in STAGES:
        m = json.loads(read_object(s3_server, f"runs/tiny/{stage}/manifest.json"))
        assert m["status"] == "completed", stage
        missing = [rel for rel in m["outputs"] if f"runs/tiny/{stage}/{rel}" not in stored]
        assert not missing, (stage, missing)
    assert "runs/tiny/config.yaml" in stored
    assert any(k.startswith("runs/tiny/cache/ray_train/") for k in stored)  # checkpoints: any node can resume
    assert any(k.endswith("/split.json") for k in objects(s3_server, "eval-sets/"))  # the fixed evaluation set
    assert S3_SECRET not in output and not any(S3_SECRET.encode() in read_object(s3_server, k) for k in stored
                                                if k.endswith((".json", ".yaml", ".jsonl")))
    qa = pq.read_table(io.BytesIO(read_object(s3_server, "runs/tiny/sdg/qa.parquet")))
    ids = qa.column("qa_id").to_pylist()
    shard_rows = sum(pq.read_table(io.BytesIO(read_object(s3_server, k))).num_rows for k in shards_in_bucket())
    assert len(set(ids)) == len(ids) == shard_rows and len(shards_in_bucket()) == total_shards


def test_ray_encoders_fetch_a_model_from_a_bucket(machine, s3_server, base_model, tmp_path):
    """Encoding through Ray Data actors: texts go to the actors and vectors come back (no folder shared with
    the driver), and a model given as a bucket location is fetched by the actor itself."""
    import os
    import shutil

    machine("a")
    from pipeline.storage import Folder, Mirror

    models = Folder(f"{s3_server['bucket']}/models")
    shutil.copytree(base_model, models.root / "minilm")
    models.push("minilm")
    script = f"""
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from pipeline.encode import encode_parquet
pq.write_table(pa.table({{"query": [f"how do I parse date number {{i}}" for i in range(40)]}}), {str(tmp_path / 'q.parquet')!r})
here = encode_parquet({base_model!r}, {str(tmp_path / 'q.parquet')!r}, "query", {str(tmp_path / 'c1')!r})
there = encode_parquet("{s3_server['bucket']}/models/minilm", {str(tmp_path / 'q.parquet')!r}, "query",
                       {str(tmp_path / 'c2')!r}, use_ray=True, num_actors=1)
print("max difference", float(np.abs(here - there).max()), here.shape)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RETROFIT_MIRROR": str(tmp_path / "b")})
    assert proc.returncode == 0, proc.stderr[-4000:]
    diff = float(proc.stdout.split("max difference ")[1].split()[0])
    assert diff < 1e-5 and "(40, 384)" in proc.stdout
    # In machine b's mirror of the model's parent folder (the "models" prefix), fetched from the bucket.
    fetched = tmp_path / "b" / Mirror.folder_name(f"{s3_server['bucket']}/models") / "minilm" / "model.safetensors"
    assert fetched.exists()


def test_documents_in_a_bucket_are_read_and_a_change_there_redoes_the_corpus_stage(machine, s3_server, tmp_path):
    client = s3_server["client"]

    def put(i: int) -> None:
        client.put_object(Bucket="retrofit-test", Key=f"docs/note{i}.md", Body=(
            f"# Release note {i}\n\nFirmware 7.{i}.2 fixes CSC-{1000 + i}: the bootloader hung after a warm "
            f"reset when the watchdog fired during flash verification on board revision {i}.").encode())

    for i in range(3):
        put(i)
    args = ["corpus", "--corpus", f"{s3_server['bucket']}/docs", "--out", f"{s3_server['bucket']}/runs/docs"]
    machine("a")
    assert "[corpus] 3 documents" in _retrofit(*args, env_mirror=tmp_path / "a")
    # Another machine sees the same bucket listing: nothing to redo.
    assert "[corpus] up to date, skipped" in _retrofit(*args, env_mirror=tmp_path / "b")
    put(3)  # a document added in the bucket changes the stage's input
    assert "[corpus] 4 documents" in _retrofit(*args, env_mirror=tmp_path / "b")


def test_a_stage_error_is_not_hidden_by_a_bucket_out_of_reach(machine, s3_server, monkeypatch, capsys):
    from pipeline.rundir import RunDir, StageRecorder

    machine("a")
    run = RunDir(f"{s3_server['bucket']}/runs/unreachable")
    rec = StageRecorder(run, "prep", "hash", {})

    def bucket_gone(*args, **kwargs):
        raise OSError("connection refused")

    with pytest.raises(ValueError, match="the stage's own error"):
        with rec:
            monkeypatch.setattr(run.mirror, "push", bucket_gone)
            raise ValueError("the stage's own error")
    assert "could not record the failure in s3://retrofit-test/runs/unreachable: OSError" in capsys.readouterr().err
