"""A real two-node Ray cluster on 127.0.0.1: `retrofit submit` sends a tiny run through the Jobs API.

Both nodes are `ray start --block` processes in their own session, so stopping them kills only this
cluster (never `ray stop`, which would kill every Ray on the machine, the tests' own included). The run
folder is in a bucket (a real S3-compatible server on 127.0.0.1) and each node has its own local mirror
folder: the nodes share no folder, as on a cloud cluster.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _alive_nodes(gcs: str, env: dict) -> int:
    code = f"import ray; ray.init(address={gcs!r}, logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0


def _kill(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=20)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def two_node_cluster(s3_server, tmp_path):
    gcs_port, dashboard_port = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must stay under 108 chars
    env = {**os.environ, **s3_server["env"], "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    # Each node, and the machine that submits, has its own mirror of bucket run folders.
    head_env, worker_env, env = ({**env, "RETROFIT_MIRROR": str(tmp_path / "mirror" / name)}
                                 for name in ("head", "worker", "client"))
    # Each node offers one 'sdg_slot'; SDG actors ask for one, so its two actors land one per node.
    head = _start(["--head", f"--port={gcs_port}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                   "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                   f"--temp-dir={temp}", '--resources={"sdg_slot": 1, "head_node": 1}'], head_env)
    nodes = [head]
    try:
        gcs = f"127.0.0.1:{gcs_port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{dashboard_port}/api/version", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(1)
        nodes.append(_start([f"--address={gcs}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                             '--resources={"sdg_slot": 1, "worker_node": 1}'], worker_env))
        while time.time() < deadline and _alive_nodes(gcs, env) < 2:
            time.sleep(2)
        assert _alive_nodes(gcs, env) == 2, "the two-node cluster did not come up"
        yield f"http://127.0.0.1:{dashboard_port}", env, tmp_path / "mirror"
    finally:
        for proc in reversed(nodes):
            _kill(proc)
        shutil.rmtree(temp, ignore_errors=True)


def test_submitted_run_in_a_bucket_succeeds_with_sdg_actors_on_both_nodes(two_node_cluster, s3_server, tmp_path):
    from pipeline.storage import Mirror

    address, env, mirrors = two_node_cluster
    run = f"{s3_server['bucket']}/cluster-run"
    settings = ["corpus.sample_docs=4", "corpus.chunk_tokens=128", "corpus.chunk_overlap=16",
                "sdg.query_types.question=1", "sdg.query_types.keyword=0", "sdg.shard_size=2",
                "sdg.placement.num_actors=2", "sdg.placement.resources.sdg_slot=1", "prep.roundtrip_top_k=0",
                f"prep.eval_set_root={s3_server['bucket']}/cluster-sets", "train.epochs=1",
                "train.queries_per_worker=4", "train.max_passage_tokens=128", "export.int8=false",
                "export.parity_texts=20"]
    args = [a for s in settings for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", "--out", run, "--address", address,
                           "--follow", *args], capture_output=True, text=True, timeout=1200, env=env, cwd=ROOT)
    (tmp_path / "submit.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    job_id = proc.stdout.split("submitted ", 1)[1].split()[0]
    assert f"job {job_id}: SUCCEEDED" in proc.stdout

    status = subprocess.run([sys.executable, "-m", "pipeline.cli", "job", "status", job_id, "--address", address],
                            capture_output=True, text=True, timeout=120, env=env)
    assert json.loads(status.stdout)["status"] == "SUCCEEDED" and json.loads(status.stdout)["run_dir"] == run

    def in_bucket(key: str) -> bytes:
        return s3_server["client"].get_object(Bucket="retrofit-test", Key=f"cluster-run/{key}")["Body"].read()

    for stage in ("corpus", "sdg", "prep", "train", "merge", "rerank", "eval", "export"):
        assert json.loads(in_bucket(f"{stage}/manifest.json"))["status"] == "completed", stage
    sdg = json.loads(in_bucket("sdg/manifest.json"))["counts"]
    assert len(sdg["ray_nodes"]) == 2, sdg  # one SDG actor per node, each wrote shards
    assert in_bucket("export/onnx/model.onnx") and json.loads(in_bucket("eval/metrics.json"))
    # The worker node read the chunks and wrote its shards in its own mirror, and sent them to the bucket.
    worker_copy = mirrors / "worker" / Mirror.folder_name(run)
    made_there = sorted(p.name for p in (worker_copy / "sdg" / "shards").glob("shard-*.parquet"))
    assert (worker_copy / "corpus" / "chunks.parquet").exists() and made_there
    assert all(in_bucket(f"sdg/shards/{name}") == (worker_copy / "sdg" / "shards" / name).read_bytes()
               for name in made_there)
    assert not (mirrors / "client").exists()  # the submitting machine never held the run
