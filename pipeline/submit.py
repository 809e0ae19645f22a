"""Send a run to a Ray cluster as a Ray Job (Jobs API), and follow, inspect or stop it.

The job's working directory is a staged copy of this project (pipeline/, serve/, pyproject.toml) plus
the resolved config as job_config.yaml, uploaded by Ray with the job; its entrypoint is
`python -m pipeline.cli run` on the cluster. The cluster's Python must have Retrofit's dependencies
(the images in cluster/ do), and the run directory must be a path every node can read and write (a
shared filesystem mounted at the same place), because stages on different nodes share it.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.errors import RetrofitError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("pipeline", "serve", "pyproject.toml")
JOB_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
AGENT_WAIT_S = 120  # how long a submission waits for a just-started head's job agent


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, or a RuntimeError naming the address
        raise RetrofitError(f"cannot reach the Ray Jobs API at {address}: {e}") from None


def stage_project(config_yaml: str, into: Path) -> Path:
    """A folder holding what the job needs: our packages and the resolved config."""
    for name in SHIPPED:
        src = PROJECT_ROOT / name
        if src.is_dir():
            shutil.copytree(src, into / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, into / name)
    (into / "job_config.yaml").write_text(config_yaml)
    return into


def submit(cfg, out: str, address: str) -> str:
    """Submit the run; returns the job id. `out` is the run directory as the cluster sees it."""
    from pipeline.config import dump_config

    if not Path(out).is_absolute() and "://" not in out:
        raise RetrofitError(f"--out {out!r}: give the run directory as an absolute path that every cluster node sees")
    cfg = cfg.model_copy(deep=True)
    cfg.ray.address = None  # inside the job, Ray Jobs sets RAY_ADDRESS to the cluster itself
    client = _client(address)
    # The driver runs from its own copy of the working dir: Ray may garbage-collect the unpacked working
    # dir once the first stage's actors exit, which left the driver without a current directory.
    entrypoint = ('code=$(mktemp -d) && cp -r . "$code" && cd "$code" && '
                  f"python -m pipeline.cli run --config job_config.yaml --out {shlex.quote(out)} --no-serve")
    with tempfile.TemporaryDirectory(prefix="retrofit-job-") as tmp:
        staged = stage_project(dump_config(cfg), Path(tmp))
        # A freshly started head answers HTTP before its job agent is up ("No available agent to submit
        # job"); that is worth waiting for, any other refusal is not.
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return client.submit_job(entrypoint=entrypoint, metadata={"retrofit_out": out},
                                         runtime_env={"working_dir": str(staged), "env_vars": JOB_ENV})
            except RuntimeError as e:
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise
                print(f"[submit] the cluster's job agent is not up yet; retrying ({e})", flush=True)
                time.sleep(3)


def follow(address: str, job_id: str) -> str:
    """Stream the job's logs until it ends; return its final status."""
    import asyncio

    client = _client(address)

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    return str(client.get_job_status(job_id).value)


def status(address: str, job_id: str) -> dict:
    info = _client(address).get_job_info(job_id)
    return {"job_id": job_id, "status": str(info.status.value), "message": info.message,
            "entrypoint": info.entrypoint, "run_dir": (info.metadata or {}).get("retrofit_out")}


def logs(address: str, job_id: str) -> str:
    return _client(address).get_job_logs(job_id)


def stop(address: str, job_id: str) -> bool:
    return _client(address).stop_job(job_id)
