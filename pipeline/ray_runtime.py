"""How stages use Ray: start or join it, and stream shard tasks through an actor pool.

Stage logic lives in plain worker classes (constructor loads a model, ``__call__`` processes one shard
and writes its output file). Ray Data composes them: one dataset row per pending shard, an actor
pool of workers, results streamed back to the driver for progress. ``use_ray=False`` runs the very
same worker in-process, which is what unit tests and Ray-less machines use.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from contextlib import nullcontext
from typing import Iterator

log = logging.getLogger("retrofit.ray")
_started_here = False  # an embedded Ray this process started: no autoscaler will ever add resources
_settings: dict = {}  # the run's [ray] section, for stages that start Ray only past a size threshold


def configure(ray_section) -> None:
    """Remember the run's `ray` config section (address, num_cpus, metrics_export_port, serve_ingress) without
    starting Ray: whichever stage needs Ray first (SDG, or prep/eval/export past their size thresholds)
    starts it with these, never with Ray's defaults."""
    _settings.update(address=ray_section.address, num_cpus=ray_section.num_cpus,
                     metrics_port=ray_section.metrics_export_port, serve_ingress=ray_section.serve_ingress,
                     stall_timeout_s=ray_section.shard_stall_timeout_s)


def ensure_ray(address: str | None = None, num_cpus: int | None = None, metrics_port: int | None = None,
               serve_ingress: str | None = None) -> None:
    """Join RAY_ADDRESS (or `address`) when set; otherwise start an embedded local Ray. Unset arguments
    come from configure(); serve_ingress (default "haproxy", see serve/ingress.py) applies to an embedded Ray."""
    import ray

    if ray.is_initialized():
        return
    address = address or _settings.get("address") or os.environ.get("RAY_ADDRESS")
    num_cpus = num_cpus if num_cpus is not None else _settings.get("num_cpus")
    metrics_port = metrics_port if metrics_port is not None else _settings.get("metrics_port")
    # Workers must import our packages the same way the driver does (a source checkout included).
    project_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join([project_root, os.environ.get("PYTHONPATH", "")]),
                        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                        "TOKENIZERS_PARALLELISM": "false"}}
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        # Inside a Ray Job (`retrofit submit`): the job's runtime env (our packages as its working_dir,
        # same env vars) already applies to every worker; passing ours too would conflict.
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    elif address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=env, logging_level=logging.WARNING, log_to_driver=False)
    else:
        log.info("starting embedded local Ray")
        global _started_here
        _started_here = True
        from serve.ingress import haproxy_for_ray_start

        use_haproxy = (serve_ingress or _settings.get("serve_ingress") or "haproxy") == "haproxy"
        with haproxy_for_ray_start() if use_haproxy else nullcontext():
            # metrics_port: where Prometheus scrapes Ray's metrics (ours included); None lets Ray pick one.
            ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env, logging_level=logging.WARNING,
                     _node_ip_address="127.0.0.1", _metrics_export_port=metrics_port, log_to_driver=False)
    # Workers' own output (Ray Train's controller chatter, weight-loading bars, library warnings) stays in
    # Ray's log files; the console gets each stage's progress from the driver, and failures as exceptions.
    print(f"[ray] worker logs: {_logs_dir() if _started_here else '`ray logs` on the cluster (or its dashboard)'}",
          file=sys.stderr, flush=True)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # we print our own progress line per shard
    # Ray Data's no-progress guard counts finished blocks only: one shard that a 1.5B LLM on a CPU works on
    # for an hour looks hung to it (ExecutionTimeoutError after 1800 s, the stage lost). map_shards watches
    # the workers' own progress reports instead.
    ctx.execution_no_progress_timeout_s = -1
    ctx.print_on_execution_start = False
    # Ray Data's own lines ("Progress bars disabled", "Dataset ... execution finished") go to its log file
    # (ray-data/ray-data.log in the worker logs folder) only; its errors still reach the console.
    from ray.data._internal.logging import SessionFileHandler

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, SessionFileHandler):
            handler.setLevel(logging.ERROR)


def _logs_dir() -> str:
    import ray

    try:
        return ray._private.worker._global_node.get_logs_dir_path()  # no public API for the local session's path
    except AttributeError:
        return "/tmp/ray/session_latest/logs"


def check_resources(label: str, bundles: list[dict]) -> None:
    """Say why a stage would wait instead of letting it hang silently: on our embedded Ray, resources it
    can never have are an error; resources other Ray work holds right now get a warning naming them."""
    import ray

    from pipeline.errors import RetrofitError

    need: dict[str, float] = {}
    for bundle in bundles:
        for key, amount in bundle.items():
            need[key] = need.get(key, 0.0) + amount
    total, free = ray.cluster_resources(), ray.available_resources()
    short = {k: v for k, v in need.items() if total.get(k, 0.0) < v}
    if short and _started_here:
        raise RetrofitError(f"{label} needs {short}; this machine's Ray has {({k: total.get(k, 0.0) for k in short})} "
                            f"in all (lower the workers or the resources per worker)")
    busy = {k: free.get(k, 0.0) for k, v in need.items() if free.get(k, 0.0) < v}
    if busy:
        print(f"[{label}] waiting for {need}: free now {busy} (other Ray work holds the rest"
              f"{'' if _started_here else ', or the autoscaler has yet to add it'})", file=sys.stderr, flush=True)


def set_threads(n: int) -> None:
    """Ray sets OMP_NUM_THREADS=1 in workers; set the thread count we were actually given."""
    import torch

    torch.set_num_threads(max(1, int(n)))


class Progress:
    """A one-line progress report: done/total, rate and ETA (stderr, readable in logs too)."""

    def __init__(self, label: str, total: int, unit: str = "shards"):
        self.label, self.total, self.unit = label, total, unit
        self.done, self.t0 = 0, time.perf_counter()

    def advance(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        print(f"[{self.label}] {self.done}/{self.total} {self.unit} | {rate:.2f} {self.unit}/s | "
              f"ETA {eta:.0f}s {extra}", file=sys.stderr, flush=True)


def map_shards(worker_cls: type, tasks: list[dict], *, ctor_kwargs: dict, use_ray: bool = True,
               num_actors: int = 1, num_cpus: float = 1, num_gpus: float = 0, resources: dict | None = None,
               label: str = "stage", stall_timeout_s: float | None = None) -> Iterator[dict]:
    """Run worker_cls over shard tasks and yield one result dict per finished shard.

    Each task is a small dict of scalars (a shard id and row range); the worker reads its rows,
    writes its output file and returns a summary. Only summaries travel back to the driver, so the
    driver's memory does not grow with the corpus.

    A worker may report progress inside a shard: map_shards sets `worker.on_progress(done, total)` before
    each shard. Those reports are printed (at most once a minute) while shards are in flight, and a shard
    that has reported once and then stays silent for `stall_timeout_s` (default: the run's
    ray.shard_stall_timeout_s) stops the stage with an error naming it; finished shards are kept.
    """
    progress = Progress(label, len(tasks))
    if not tasks:
        return
    if not use_ray:
        worker = worker_cls(**ctor_kwargs)
        for task in tasks:
            worker.on_progress = _InShardLine(label, task["shard_id"])
            result = worker.process(task)
            progress.advance(extra=_summary(result))
            yield result
        return

    import ray.data
    from ray.util.queue import Queue

    ensure_ray()  # Ray Data would otherwise start a default Ray that ignores the run's settings
    stall_timeout_s = stall_timeout_s or _settings.get("stall_timeout_s") or 1800.0
    beats = Queue(actor_options={"num_cpus": 0})  # workers -> driver: (shard_id, done, total)
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    ds.context.execution_no_progress_timeout_s = -1  # see ensure_ray; this dataset's own copy of the context
    with warnings.catch_warnings():
        # max_restarts has no named parameter in Ray 2.60, only the deprecated ray_remote_args it warns about.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(_BatchAdapter, fn_constructor_kwargs={"worker_cls": worker_cls, "ctor_kwargs": ctor_kwargs,
                                                                  "beats": beats},
                            batch_size=1, batch_format="pandas",
                            compute=ray.data.ActorPoolStrategy(size=min(num_actors, len(tasks))),
                            num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None,
                            # Ray Data restarts a dead actor forever by default: an actor that dies the same way
                            # each time (out of memory loading the LLM) would hang the stage, and Ray logs an "E"
                            # line for every pool (ray#57733). A failed shard fails the stage; a rerun resumes.
                            max_restarts=0)
    watch = _ShardWatch(label, stall_timeout_s)
    try:
        for result in _rows_while_watching(ds, beats, watch):
            watch.finished(result.get("shard_id"))
            progress.advance(extra=_summary(result))
            yield result
    finally:
        ray.kill(beats.actor)


def _rows_while_watching(ds, beats, watch: "_ShardWatch", poll_s: float = 2.0) -> Iterator[dict]:
    """ds's rows, read in a thread so that the driver keeps reading the workers' progress reports (and
    can tell a stuck shard) while no shard finishes."""
    import queue
    import threading

    rows: queue.Queue = queue.Queue()
    end = object()

    def read():
        try:
            for row in ds.iter_rows():
                rows.put(dict(row))
        except BaseException as e:  # noqa: BLE001 - re-raised in the driver's thread
            rows.put(e)
        rows.put(end)

    threading.Thread(target=read, daemon=True, name="map_shards-rows").start()
    while True:
        try:
            item = rows.get(timeout=poll_s)
        except queue.Empty:
            item = None
        pending = beats.qsize()
        for report in beats.get_nowait_batch(pending) if pending else ():
            watch.beat(*report)
        if item is end:
            return
        if isinstance(item, BaseException):
            raise item
        if item is not None:
            yield item
        watch.check()


class _ShardWatch:
    """The driver's view of shards in flight: last report per shard, a progress line now and then, and
    the stuck-shard check."""

    def __init__(self, label: str, stall_timeout_s: float, print_every_s: float = 60.0,
                 clock=time.monotonic):
        self.label, self.stall_timeout_s, self.print_every_s, self.clock = label, stall_timeout_s, print_every_s, clock
        self.in_flight: dict[int, tuple[int, int, float]] = {}  # shard -> (done, total, time of last report)
        self.last_print = clock()

    def beat(self, shard_id: int, done: int, total: int) -> None:
        self.in_flight[int(shard_id)] = (done, total, self.clock())

    def finished(self, shard_id) -> None:
        if shard_id is not None:
            self.in_flight.pop(int(shard_id), None)

    def check(self) -> None:
        from pipeline.errors import RetrofitError

        now = self.clock()
        for shard_id, (done, total, at) in sorted(self.in_flight.items()):
            if done < total and now - at >= self.stall_timeout_s:  # done == total: Ray is delivering the result
                raise RetrofitError(
                    f"[{self.label}] shard {shard_id} is stuck: no progress for {now - at:.0f}s (at {done}/{total}; "
                    f"ray.shard_stall_timeout_s={self.stall_timeout_s:.0f}). Every finished shard is kept: rerun "
                    "to resume; check the engine (a hung LLM server?) or raise the timeout")
        if self.in_flight and now - self.last_print >= self.print_every_s:
            self.last_print = now
            parts = ", ".join(f"shard {s} {d}/{t} ({now - at:.0f}s ago)"
                              for s, (d, t, at) in sorted(self.in_flight.items()))
            print(f"[{self.label}] in flight: {parts}", file=sys.stderr, flush=True)


class _InShardLine:
    """on_progress for a worker run in-process: a line at most every `every_s` seconds."""

    def __init__(self, label: str, shard_id: int, every_s: float = 60.0):
        self.label, self.shard_id, self.every_s, self.last = label, shard_id, every_s, time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            print(f"[{self.label}] shard {self.shard_id}: {done}/{total}", file=sys.stderr, flush=True)


def _summary(result: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in result.items() if isinstance(v, (int, float)) and k != "shard_id")


class _BatchAdapter:
    """Turns a plain worker (process(task) -> dict) into a Ray Data batch UDF; its progress reports go to
    the driver through `beats`."""

    def __init__(self, worker_cls: type, ctor_kwargs: dict, beats=None):
        self.worker, self.beats = worker_cls(**ctor_kwargs), beats

    def __call__(self, batch):
        import pandas as pd

        results = []
        for task in batch.to_dict("records"):
            if self.beats is not None:
                shard_id = int(task["shard_id"])
                self.worker.on_progress = lambda done, total: self.beats.put_nowait((shard_id, done, total))
            results.append(self.worker.process(task))
        return pd.DataFrame(results)
