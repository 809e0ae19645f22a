import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def base_model() -> str:
    from pipeline.models import resolve_embedder

    return resolve_embedder("minilm")


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the tests that need it (start-up costs ~5-9 s); yields its metrics port."""
    import ray

    from pipeline.ray_runtime import ensure_ray

    port = free_port()
    ensure_ray(num_cpus=2, metrics_port=port)
    yield port
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto's server mode) on 127.0.0.1 with one bucket; yields the
    environment a client needs (credentials and endpoint, as users give them) and the bucket's URI."""
    import subprocess
    import sys
    import time

    import boto3
    import requests

    port = free_port()
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ACCESS_KEY_ID": "retrofit-test", "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        deadline = time.time() + 60
        while True:
            try:
                requests.get(env["AWS_ENDPOINT_URL"], timeout=2)
                break
            except requests.RequestException:
                assert proc.poll() is None and time.time() < deadline, f"moto_server did not start: {log.read_text()}"
                time.sleep(0.3)
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=S3_SECRET, region_name="us-east-1")
        client.create_bucket(Bucket="retrofit-test")
        yield {"env": env, "bucket": "s3://retrofit-test", "client": client}
    finally:
        proc.kill()
        proc.wait()


S3_SECRET = "retrofit-secret-4f2a9c"  # a value no log, manifest or console may ever show
