"""The training loop every trained model shares, on Ray Train: engines, the worker, checkpoints, resume.

`LoopWorker` is what each Ray Train worker runs (through `run_worker`); `fit_on_ray_train` builds the
TorchTrainer from a TrainingLoopConfig (ScalingConfig(num_workers, use_gpu)), so scaling out means changing
one number. The optimiser engine is DeepSpeed ZeRO (gloo on CPUs) or plain AdamW with an all-reduce of
gradients, in bf16 where the hardware multiplies it natively (`use_bf16`). Checkpoints (every N steps and at
each epoch end) carry everything a resumed run needs to continue exactly where it stopped: the weights, the
optimiser moments and schedule, every worker's RNG state and the step (which fixes the sampler's position).
They can be scored by NDCG@10 on the val split and are reported to Ray Train: a restarted worker group
resumes from the latest, and the stage keeps the best (or the last). What a kind of model decides (its
loss, its validation, how it is saved) lives in its stage: pipeline/train.py (the embedder) and
pipeline/rerank.py (the reranker).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from pipeline.config import TrainingLoopConfig
from pipeline.beir import compute_metrics
from pipeline.contrastive import BatchSampler, positive_set, warmup_then_cosine
from pipeline.models import native_bf16_cpu
from pipeline.ray_runtime import check_resources, set_threads
from pipeline.rundir import RunDir
from pipeline.storage import cache_dir

TRAINER_STATE = "trainer_state.json"
MODEL_DIR, ENGINE_DIR, RNG_DIR = "model", "engine", "rng"


def use_bf16(precision: str, on_gpu: bool) -> bool:
    """train.precision resolved on this worker. 'auto' picks bf16 where it is native: on this box's AVX512-BF16
    CPU a matmul runs 4.3x faster in bf16 and the training benchmark 1.4x, at the same val NDCG@10
    (benchmarks/README.md); where bf16 is emulated (CPUs without those instructions) it would be slower."""
    import torch

    if precision != "auto":
        return precision == "bf16"
    if on_gpu:
        return torch.cuda.is_bf16_supported()
    return native_bf16_cpu()


class PlainEngine:
    """torch AdamW; gradients averaged across workers with an all-reduce (what DDP does); bf16 as autocast
    (fp32 weights and optimiser, as sentence-transformers' trainer does with bf16=True)."""

    def __init__(self, model, lr: float, schedule, world: int, bf16: bool = False, max_grad_norm: float = 0.0,
                 weight_decay: float = 0.0):
        import torch

        self.model, self.world, self.autocast_bf16, self.max_grad_norm = model, world, bf16, max_grad_norm
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def forward(self, features):
        return self._autocast(self.model, features)

    def _autocast(self, module, features):
        import torch

        device = next(self.model.parameters()).device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            return module(features)

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        import torch.distributed as dist

        if self.world > 1:
            for param in self.model.parameters():
                if param.grad is not None:
                    dist.all_reduce(param.grad)
                    param.grad /= self.world
        if self.max_grad_norm:
            import torch

            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_state(self, folder: Path, rank: int) -> None:
        """Optimiser moments and schedule (identical on every worker: rank 0 writes them)."""
        import torch

        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       folder / "optimizer.pt")

    def load_state(self, folder: Path) -> None:
        import torch

        state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def own_torch_extensions_dir() -> str:
    """Where DeepSpeed's CPU op is built and found for this Python environment (warmup builds it, training
    loads it). Torch's default folder is shared by all of a user's environments, but the op's build file names
    the environment's own paths: two checkouts' venvs rebuilt it for each other at every switch (20 s each on
    this 2-core box, measured). A TORCH_EXTENSIONS_DIR the user set wins."""
    key = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions" / key))


class DeepSpeedEngine(PlainEngine):
    """DeepSpeed ZeRO (stage 1/2) on the process group Ray Train set up (NCCL on GPUs, gloo on CPUs).
    bf16: DeepSpeed's own mode on GPUs, autocast on CPUs (fp32 weights; gloo and DeepSpeed's CPU path keep
    fp32 gradients). ZeRO-1/2 keep full weights on every rank, so rank 0 saves the plain model."""

    def __init__(self, model, lr: float, schedule, world: int, tc: TrainingLoopConfig, on_gpu: bool, bf16: bool):
        import deepspeed
        import torch

        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=tc.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        config = {"train_micro_batch_size_per_gpu": tc.queries_per_worker, "gradient_accumulation_steps": 1,
                  "gradient_clipping": tc.max_grad_norm, "zero_optimization": {"stage": tc.zero_stage},
                  "zero_allow_untested_optimizer": True,  # torch's AdamW (DeepSpeed's own needs a CUDA build)
                  "bf16": {"enabled": bf16 and on_gpu}, "steps_per_print": 10**9}
        own_torch_extensions_dir()  # before init: on CPUs it loads (or builds) the shared-memory op
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        self.model, self.world, self.autocast_bf16 = model, world, bf16 and not on_gpu
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)

    def forward(self, features):
        # DeepSpeed's forward switches an outer autocast off only when torch.is_autocast_enabled() (CUDA's) is
        # on; the CPU's stays on (tests/test_train_logic.py checks the output is bf16).
        return self._autocast(self.engine, features)

    def backward(self, loss) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()  # optimizer, scheduler and zeroing of gradients

    def save_state(self, folder: Path, rank: int) -> None:
        """Every worker writes its ZeRO partition of the optimiser; Ray Train merges the folders."""
        folder.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(folder), tag="state", save_latest=False)

    def load_state(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag="state", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {folder}")


def save_rng(path: Path) -> None:
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def load_rng(path: Path) -> None:
    import torch

    state = torch.load(path, weights_only=False)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class LoopWorker:
    """One training process: the model, its slice of every global batch, the engine, checkpoints.

    Ray Train runs it through `run_worker` (rank, world, the checkpoint to resume from and `report`,
    which hands a checkpoint folder to Ray Train); nothing here needs Ray, so it also runs alone.
    A kind of model (the embedder: pipeline.train.Worker; the reranker: pipeline.rerank.RerankWorker)
    supplies build_model, train_step, validation_set, val_ndcg10 and save_model."""

    def __init__(self, config: dict, rank: int, world: int, resume_dir: Path | None, report):
        import pyarrow.parquet as pq
        import torch

        self.tc: TrainingLoopConfig = config["train"]  # typed: the section itself travels to the workers
        tc = self.tc
        self.rank, self.world, self.report = rank, world, report
        set_threads(tc.placement.cpus_per_worker)
        on_gpu = tc.use_gpu and torch.cuda.is_available()
        self.device = f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu"
        self.seed = config["seed"]
        torch.manual_seed(self.seed)

        # Paths in `config` are relative to the run folder when it names one ("run"): a worker on another
        # node then reads and writes its own node's mirror of a bucket run folder, and pushes what it writes.
        self.run_dir = RunDir(config["run"]) if config.get("run") else None
        # The rows stay an Arrow table (compact, no Python object per text); each step takes its own rows.
        self.rows = pq.read_table(self._input(config["train_path"]))
        self.sampler = BatchSampler(self.rows.select(BatchSampler.COLUMNS).to_pylist(), tc.queries_per_worker,
                                    self.world, self.seed, tc.negatives_per_query)
        self.total = self.sampler.steps_per_epoch * tc.epochs
        if tc.max_steps:
            self.total = min(self.total, tc.max_steps)
        schedule = warmup_then_cosine(self.total, tc.warmup_ratio)

        self.state = {"global_step": 0, "best": None, "evals_without_gain": 0}
        self.model = self.build_model(str(resume_dir / MODEL_DIR) if resume_dir else config["base_model"])
        self.model.train()
        bf16 = use_bf16(tc.precision, on_gpu)
        if tc.engine == "deepspeed":
            self.engine = DeepSpeedEngine(self.model, tc.lr, schedule, self.world, tc, on_gpu, bf16)
        else:
            self.engine = PlainEngine(self.model, tc.lr, schedule, self.world, bf16=bf16,
                                      max_grad_norm=tc.max_grad_norm, weight_decay=tc.weight_decay)
        if resume_dir:  # continue exactly: optimiser moments, schedule, dropout RNG, sampler position
            self.state = json.loads((resume_dir / TRAINER_STATE).read_text())
            self.engine.load_state(resume_dir / ENGINE_DIR)
            load_rng(resume_dir / RNG_DIR / f"rank{self.rank}.pt")

        self.val = self.validation_set(pq.read_table(self._input(config["val_path"])).to_pylist()) \
            if config.get("val_path") else None
        self.outputs = [config["log_path"], config["tensorboard_dir"]]
        self.log_path = self._local(config["log_path"])
        if self.run_dir and not self.log_path.exists():  # a restart on another node continues the bucket's log
            self.run_dir.pull(config["log_path"])
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if self.rank == 0:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(self._local(config["tensorboard_dir"])))
            self.log({"event": "start", "global_step": self.state["global_step"], "world": self.world,
                      "engine": tc.engine, "precision": "bf16" if bf16 else "fp32",
                      "global_batch": self.sampler.global_batch,
                      "steps_per_epoch": self.sampler.steps_per_epoch, "total_steps": self.total})
    # What a kind of model decides; the rest of the loop (engine, sampler, checkpoints, resume) is shared.
    def build_model(self, path: str):
        """The model to train (a torch module taking tokenised features), from the start weights or a
        checkpoint's model folder."""
        raise NotImplementedError

    def train_step(self, batch: list[int]) -> float:
        """One global step over the rows `batch` (this worker takes its slice); returns the global loss."""
        raise NotImplementedError

    def validation_set(self, rows: list[dict]):
        raise NotImplementedError

    def val_ndcg10(self) -> float:
        raise NotImplementedError

    def save_model(self, folder: Path) -> None:
        raise NotImplementedError

    def global_loss(self, loss: float) -> float:
        """The logged loss is the global batch's: the mean over workers."""
        import torch
        import torch.distributed as dist

        if self.world > 1:
            t = torch.tensor([loss], dtype=torch.float64)
            dist.all_reduce(t)
            loss = float(t.item()) / self.world
        return loss

    def _local(self, path: str) -> Path:
        return self.run_dir.root / path if self.run_dir else Path(path)

    def _input(self, path: str) -> Path:
        """A file the worker reads: fetched first when the run folder is in a bucket."""
        return self.run_dir.pull(path) if self.run_dir else Path(path)

    def publish(self) -> None:
        """Rank 0 sends the log and TensorBoard files to a bucket run folder (at checkpoints and at the end)."""
        if self.run_dir and self.rank == 0:
            self.writer.flush()
            for rel in self.outputs:
                self.run_dir.push(rel)

    def log(self, record: dict) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def validate(self) -> tuple[float | None, bool]:
        """Val NDCG@10 (rank 0, broadcast) and whether early stopping says stop."""
        import torch.distributed as dist

        score, stop = None, False
        if self.rank == 0 and self.val is not None and len(self.val):
            self.model.eval()
            score = self.val_ndcg10()
            self.model.train()
            if self.state["best"] is None or score > self.state["best"]:
                self.state["best"], self.state["evals_without_gain"] = score, 0
            else:
                self.state["evals_without_gain"] += 1
            patience = self.tc.early_stopping_patience
            stop = bool(patience) and self.state["evals_without_gain"] >= patience
            self.writer.add_scalar("val/ndcg@10", score, self.state["global_step"])
            self.log({"event": "val", "global_step": self.state["global_step"], "ndcg@10": score, "early_stop": stop})
        if self.world > 1:  # every worker must take the same branch
            flag = [stop, score, self.state["best"], self.state["evals_without_gain"]]
            dist.broadcast_object_list(flag, src=0)
            stop, score, self.state["best"], self.state["evals_without_gain"] = flag
        return score, stop

    def save_checkpoint(self, epoch: int, loss: float, score: float | None) -> None:
        """Report a checkpoint: rank 0 writes the model and the trainer state, every worker its optimiser
        partition and RNG state; Ray Train merges the workers' folders into one."""
        metrics = {"epoch": epoch, "global_step": self.state["global_step"], "loss": loss}
        if score is not None:
            metrics["val_ndcg@10"] = score
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            self.engine.save_state(folder / ENGINE_DIR, self.rank)
            save_rng(folder / RNG_DIR / f"rank{self.rank}.pt")
            if self.rank == 0:
                self.save_model(folder / MODEL_DIR)
                (folder / TRAINER_STATE).write_text(json.dumps(self.state))
            self.report(metrics, folder)
        self.publish()

    def log_step(self, epoch: int, loss: float, seconds: float) -> None:
        step, global_batch = self.state["global_step"], self.sampler.global_batch
        record = {"epoch": epoch, "step": step - 1, "loss": loss, "lr": self.engine.lr,
                  "steps_per_s": round(1 / seconds, 4), "examples_per_s": round(global_batch / seconds, 3)}
        self.log(record)
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", self.engine.lr, step)
        self.writer.add_scalar("train/examples_per_s", record["examples_per_s"], step)

    def run(self) -> None:
        per_epoch, every = self.sampler.steps_per_epoch, self.tc.checkpoint_every_steps
        losses = []
        if self.state["global_step"] >= self.total:  # resumed from the final checkpoint: nothing left to do
            return
        start_epoch, done_in_epoch = divmod(self.state["global_step"], per_epoch)
        for epoch in range(start_epoch, self.tc.epochs):
            for batch in self.sampler.epoch(epoch)[done_in_epoch if epoch == start_epoch else 0:]:
                t0 = time.perf_counter()
                losses.append(self.train_step(batch))
                if self.rank == 0:
                    self.log_step(epoch, losses[-1], time.perf_counter() - t0)
                step = self.state["global_step"]
                last = step == self.total  # train.max_steps may end training inside an epoch
                if last or step % per_epoch == 0 or (every and step % every == 0):
                    score, stop = self.validate()
                    self.save_checkpoint(epoch, sum(losses) / len(losses), score)
                    losses = []
                    if stop or last:
                        return

    def close(self) -> None:
        if self.writer:
            self.publish()
            self.writer.close()


def run_worker(worker_class, config: dict) -> None:
    """One Ray Train worker: a `worker_class` (Worker or a subclass) resumed from Ray Train's checkpoint."""
    import ray.train

    def report(metrics: dict, folder: Path) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))

    ctx = ray.train.get_context()
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume_dir:
        worker = worker_class(config, ctx.get_world_rank(), ctx.get_world_size(),
                              Path(resume_dir) if resume_dir else None, report)
    try:
        worker.run()
    finally:
        worker.close()


@contextlib.contextmanager
def follow_progress(log_path: Path, epochs: int, every_s: float = 2.0, every_steps: int = 10, stage: str = "train"):
    """Print the workers' progress on the driver's console, read from the training log they write (their
    own output stays in Ray's log files): a step line every `every_steps` steps, and each val score."""
    stop = threading.Event()
    # From the log's end: a resumed stage's earlier lines were shown by the run that wrote them.
    state = {"offset": log_path.stat().st_size if log_path.exists() else 0, "total": None, "first": 0,
             "t0": time.perf_counter()}

    def show(r: dict) -> None:
        if r.get("event") == "start":  # also after a restart: the rate counts from where it resumed
            state.update(total=r.get("total_steps") or r["steps_per_epoch"] * epochs, first=r["global_step"],
                         t0=time.perf_counter())
        elif r.get("event") == "val":
            print(f"[{stage}] val NDCG@10 {r['ndcg@10']:.4f} at step {r['global_step']}", flush=True)
        elif "loss" in r and (r["step"] + 1) % every_steps == 0:
            done, total = r["step"] + 1, state["total"]
            rate = (done - state["first"]) / max(time.perf_counter() - state["t0"], 1e-9)
            eta = f" | ETA {(total - done) / rate:.0f}s" if total and rate > 0 else ""
            print(f"[{stage}] step {done}/{total or '?'} loss {r['loss']:.4f} | {r['examples_per_s']:.1f} examples/s"
                  f"{eta}", flush=True)

    def follow() -> None:
        while True:
            stopped = stop.wait(every_s)
            if log_path.exists():
                with open(log_path) as f:
                    f.seek(state["offset"])
                    for line in iter(f.readline, ""):
                        if not line.endswith("\n"):  # half-written: read it whole next time
                            break
                        state["offset"] = f.tell()
                        show(json.loads(line))
            if stopped:
                return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def worker_malloc_env() -> dict[str, str]:
    """Ray Train runs the training loop in a thread of its own, and glibc gives each thread its own malloc
    arena: the activations' allocations then map and unmap heaps at every step. One arena for the worker
    process: the bf16 training benchmark 1.20x faster (wall; 1.22x in the loop) than with glibc's default on
    this 2-core box (benchmarks/README.md). A MALLOC_ARENA_MAX already set is left alone."""
    return {} if "MALLOC_ARENA_MAX" in os.environ else {"MALLOC_ARENA_MAX": "1"}


def fit_on_ray_train(stage: str, loop, tc, loop_config: dict, run, rec, has_val: bool):
    """Run `loop` on a Ray Train TorchTrainer sized by `tc` (a TrainingLoopConfig) and return the checkpoint
    to keep (the best by val NDCG@10 or the last). The worker logs to STAGE/train_log.jsonl, followed here."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    log_path = rec.output("train_log.jsonl")
    # The Ray Train run is named by the stage's identity: a rerun after a crash finds its checkpoints and
    # resumes; a run with other settings or inputs gets a fresh name and never resumes stale weights.
    identity = hashlib.sha256((rec.manifest.config_hash + json.dumps(rec.manifest.inputs, sort_keys=True))
                              .encode()).hexdigest()[:12]
    # In a bucket run folder the checkpoints live in the bucket too: any node (or a later machine) resumes.
    storage = f"{run.location}/cache/ray_train"
    if not log_path.exists():  # a fresh stage folder (new, stale or --force): never resume old checkpoints
        run.clear(f"cache/ray_train/{stage}-{identity}")
    per_worker = {"CPU": tc.placement.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})}
    check_resources(stage, [per_worker] * tc.num_workers)
    trainer = TorchTrainer(
        loop,
        train_loop_config={**loop_config, "log_path": f"{stage}/train_log.jsonl",
                           "tensorboard_dir": f"{stage}/tensorboard"},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=f"{stage}-{identity}", storage_path=storage,
                             # The latest checkpoint is always kept too (Ray never deletes it): resume needs it.
                             checkpoint_config=CheckpointConfig(
                                 num_to_keep=2, checkpoint_score_attribute="val_ndcg@10" if has_val else None,
                                 checkpoint_score_order="max"),
                             failure_config=FailureConfig(max_failures=tc.placement.max_failures),
                             worker_runtime_env={"env_vars": worker_malloc_env()}),
    )
    # Ray Train's controller polls the workers every 2 s, so it saw the end of training 2.6-3.3 s late here
    # (0.8-1.2 s at 0.5 s; benchmarks/README.md, issue 14). A user's own setting wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    with follow_progress(log_path, tc.epochs, stage=stage):
        result = trainer.fit()
    chosen = result.checkpoint
    if has_val and tc.keep == "best":
        chosen = result.get_best_checkpoint(metric="val_ndcg@10", mode="max") or chosen
    if chosen is None:
        raise RuntimeError(f"{stage}: training finished without a checkpoint")
    return chosen


def keep_checkpoint(chosen, model_dir: Path) -> dict:
    """Copy the kept checkpoint's model to `model_dir`; its trainer state (step, best val score) is returned."""
    shutil.rmtree(model_dir, ignore_errors=True)
    with chosen.as_directory() as d:
        shutil.copytree(Path(d) / MODEL_DIR, model_dir)
        return json.loads((Path(d) / TRAINER_STATE).read_text())


def training_counts(stage: str, run, tc, n_rows: int, kept: dict) -> dict:
    """The manifest's counts of a trained model, read from the workers' training log."""
    log_path = run.pull(f"{stage}/train_log.jsonl")  # rank 0 may have run on another node
    log = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    steps = [r for r in log if "loss" in r and "event" not in r]
    vals = [r for r in log if r.get("event") == "val"]
    starts = [r for r in log if r.get("event") == "start"]
    return {"train_rows": n_rows, "steps": kept["global_step"], "workers": tc.num_workers,
            "global_batch": starts[-1]["global_batch"] if starts else None,
            "engine": tc.engine, "precision": starts[-1].get("precision") if starts else None,
            "restarts": len(starts) - 1,
            "first_loss": steps[0]["loss"] if steps else None,
            "last_loss": steps[-1]["loss"] if steps else None,
            "kept_checkpoint": {"global_step": kept["global_step"], "val_ndcg@10": kept.get("best")
                                if tc.keep == "best" else None},
            "val_ndcg@10": [(r["global_step"], round(r["ndcg@10"], 5)) for r in vals],
            "early_stopped": any(r.get("early_stop") for r in vals)}


def has_val_rows(run, tc) -> bool:
    import pyarrow.parquet as pq

    val_path = run.root / "prep" / "val.parquet"
    return tc.val_at_checkpoints and val_path.exists() and pq.ParquetFile(val_path).metadata.num_rows > 0


class RerankValidation:
    """Split rows as a reranking task: each query's positive and mined negatives, scored and ranked (the
    reranker's val split in training, the test split in the export stage's int8 check)."""

    def __init__(self, rows: list[dict], max_queries: int):
        self.rows = rows[:max_queries]

    def __len__(self) -> int:
        return len(self.rows)

    def ndcg10(self, score_pairs) -> float:
        run, qrels = {}, {}
        for r in self.rows:
            ids = [r["positive_id"], *r["negative_ids"]]
            texts = [r["positive_text"], *r["negative_texts"]]
            scores = score_pairs([(r["query"], t) for t in texts])
            run[r["qa_id"]] = {d: float(s) for d, s in zip(ids, scores)}
            qrels[r["qa_id"]] = {p: 1 for p in positive_set(r)}
        return compute_metrics(qrels, run)[0]["ndcg@10"]
