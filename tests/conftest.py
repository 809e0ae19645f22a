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
