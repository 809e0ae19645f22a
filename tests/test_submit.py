"""`retrofit submit` against a head whose job agent is still starting (seen under load on a fresh cluster)."""
import pytest

from pipeline import submit
from pipeline.config import load_config


class _Head:
    """Answers the Jobs API like a head node: refuses `refusals` submissions with `error`, then accepts."""

    def __init__(self, refusals: int, error: str):
        self.refusals, self.error, self.calls = refusals, error, 0

    def submit_job(self, **kwargs):
        self.calls += 1
        if self.calls <= self.refusals:
            raise RuntimeError(f"Request failed with status code 500: {self.error}")
        assert (submit.Path(kwargs["runtime_env"]["working_dir"]) / "job_config.yaml").exists()
        return "raysubmit_123"


@pytest.fixture
def no_wait(monkeypatch):
    monkeypatch.setattr(submit.time, "sleep", lambda s: None)


def test_submit_waits_for_the_job_agent(monkeypatch, no_wait):
    head = _Head(2, "No available agent to submit job, please try again later..")
    monkeypatch.setattr(submit, "_client", lambda address: head)
    assert submit.submit(load_config(None, []), "/shared/run", "http://head:8265") == "raysubmit_123"
    assert head.calls == 3


def test_submit_does_not_retry_other_refusals(monkeypatch, no_wait):
    head = _Head(1, "Runtime env setup failed")
    monkeypatch.setattr(submit, "_client", lambda address: head)
    with pytest.raises(RuntimeError, match="Runtime env setup failed"):
        submit.submit(load_config(None, []), "/shared/run", "http://head:8265")
    assert head.calls == 1


def test_submit_gives_up_when_the_agent_never_comes(monkeypatch, no_wait):
    head = _Head(10**6, "No available agent to submit job")
    monkeypatch.setattr(submit, "_client", lambda address: head)
    monkeypatch.setattr(submit, "AGENT_WAIT_S", 0)
    with pytest.raises(RuntimeError, match="No available agent"):
        submit.submit(load_config(None, []), "/shared/run", "http://head:8265")
