"""map_shards on a real embedded Ray: a slow shard that reports progress is never cut off (Ray Data's own
no-progress timeout counts finished blocks only), and a shard that stops reporting fails the stage by name
with the finished shards kept."""
import sys
import time
from pathlib import Path

import pytest
from ray import cloudpickle

from pipeline.errors import RetrofitError
from pipeline.ray_runtime import map_shards


class TimedWorker:
    """Takes `seconds` per shard, reporting progress each second; shard `hang` reports once, then is silent
    for `hang_s` (an engine that stopped answering). Each finished shard leaves a file, as real workers do."""

    def __init__(self, out: str, seconds: int, hang: int | None = None, hang_s: float = 0):
        self.out, self.seconds, self.hang, self.hang_s = Path(out), seconds, hang, hang_s

    def process(self, task: dict) -> dict:
        shard_id = int(task["shard_id"])
        self.on_progress(0, self.seconds)
        if shard_id == self.hang:
            time.sleep(self.hang_s)
        for step in range(self.seconds):
            time.sleep(1)
            self.on_progress(step + 1, self.seconds)
        (self.out / f"shard-{shard_id}").write_text("done")
        return {"shard_id": shard_id, "items": 1}


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module


def _tasks(n: int) -> list[dict]:
    return [{"shard_id": i, "start": i, "stop": i + 1} for i in range(n)]


def test_a_slow_shard_that_reports_progress_outlives_ray_datas_no_progress_timeout(ray_local, tmp_path, capsys):
    from ray.data import DataContext

    # What RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S=3 would set (Ray's default is 1800 s): each 8 s shard
    # finishes no block for longer than that, which made Ray Data end the SDG stage.
    DataContext.get_current().execution_no_progress_timeout_s = 3
    try:
        results = list(map_shards(TimedWorker, _tasks(2), ctor_kwargs={"out": str(tmp_path), "seconds": 8},
                                  num_actors=1, label="slow", stall_timeout_s=5))
    finally:
        DataContext.get_current().execution_no_progress_timeout_s = -1
    assert sorted(r["shard_id"] for r in results) == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-0", "shard-1"]


def test_a_shard_that_stops_reporting_fails_the_stage_by_name_and_finished_shards_stay(ray_local, tmp_path):
    finished = []
    t0 = time.monotonic()
    with pytest.raises(RetrofitError, match=r"\[stuck\] shard 1 is stuck: no progress for \d+s .*finished shard is kept"):
        for result in map_shards(TimedWorker, _tasks(3), ctor_kwargs={"out": str(tmp_path), "seconds": 1,
                                                                      "hang": 1, "hang_s": 30},
                                 num_actors=2, label="stuck", stall_timeout_s=3):
            finished.append(result["shard_id"])
    assert time.monotonic() - t0 < 30, "the stuck shard was waited for instead of reported"
    assert 0 in finished and (tmp_path / "shard-0").exists() and not (tmp_path / "shard-1").exists()
    time.sleep(max(0.0, 30 - (time.monotonic() - t0)) + 2)  # let the silent actor finish and free its CPU for later tests
