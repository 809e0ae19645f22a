"""Train stage: contrastive fine-tuning (InfoNCE over in-batch and hard negatives) on Ray Train.

`train_loop` is what each Ray Train worker runs; `run_stage` builds the TorchTrainer from config
(ScalingConfig(num_workers, use_gpu)), so scaling out means changing one number. The optimiser engine
is DeepSpeed ZeRO (bf16 on GPUs, gloo on CPUs) or plain AdamW with an all-reduce of gradients.
Checkpoints (every N steps and at each epoch end) carry the weights and the step, are scored by NDCG@10
on the val split, and are reported to Ray Train: a restarted worker group resumes from the latest,
and the stage keeps the best (or the last). GradCache keeps large batches within memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import tempfile
from pathlib import Path

TRAINER_STATE = "trainer_state.json"


def lr_lambda(step: int, total: int, warmup: int) -> float:
    """Linear warmup to the peak learning rate, then cosine decay to zero."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def info_nce(q, passages, positive_ids: list[str], passage_ids: list[str], temperature: float,
             symmetric: bool = False):
    """Cross-entropy of each query against all passages in the step; query i's positive is column i.

    Columns that hold the same chunk as query i's positive (a duplicate positive, or another
    query's hard negative that is this query's positive) are masked: they are not negatives.
    `symmetric` adds the other direction: each positive passage against all queries of the step.
    """
    import torch

    scores = q @ passages.T / temperature
    same = torch.tensor([[pid == col for col in passage_ids] for pid in positive_ids], device=scores.device)
    same[torch.arange(len(positive_ids)), torch.arange(len(positive_ids))] = False
    scores = scores.masked_fill(same, float("-inf"))
    labels = torch.arange(len(positive_ids), device=scores.device)
    loss = torch.nn.functional.cross_entropy(scores, labels)
    if symmetric:
        n = len(positive_ids)
        # Queries sharing a positive with query i are not negatives of passage i either.
        backward = scores[:, :n].T.masked_fill(same[:, :n].T, float("-inf"))
        loss = (loss + torch.nn.functional.cross_entropy(backward, labels)) / 2
    return loss


def batches(rows: list[dict], batch_size: int, seed: int, epoch: int) -> list[list[dict]]:
    """Shuffled batches in which no chunk is the positive of two queries (no false in-batch negatives)."""
    order = rows[:]
    random.Random(seed * 1000 + epoch).shuffle(order)
    out, pending = [], order
    while pending:
        batch, used, rest = [], set(), []
        for r in pending:
            if len(batch) < batch_size and r["positive_id"] not in used:
                batch.append(r)
                used.add(r["positive_id"])
            else:
                rest.append(r)
        if len(batch) < 2:  # a batch of one has no in-batch negatives; drop the leftovers
            break
        out.append(batch)
        pending = rest
    return out


def grad_cache_step(encode, queries: list[str], passages: list[str], loss_fn, backward, chunk: int,
                    seed: int) -> float:
    """One contrastive step whose activation memory is one chunk's, not the whole batch's (GradCache).

    1) embed every text in chunks without autograd graphs; 2) compute the loss on those embeddings and
    its gradient with respect to them; 3) embed each chunk again with a graph and push that gradient
    through it. Each chunk is re-run under the same RNG seed, so dropout masks repeat and the
    gradients equal the full-batch ones."""
    import torch

    def chunks(texts):
        return [(i, texts[i:i + chunk]) for i in range(0, len(texts), chunk)]

    def embed_chunk(part, kind, i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 100_003 + i * 2 + kind)
            return encode(part, kind)

    with torch.no_grad():
        q = torch.cat([embed_chunk(part, 0, i) for i, part in chunks(queries)])
        p = torch.cat([embed_chunk(part, 1, i) for i, part in chunks(passages)])
    q.requires_grad_(True)
    p.requires_grad_(True)
    loss = loss_fn(q, p)
    loss.backward()  # gradients of the loss w.r.t. the embeddings only (they are leaves)
    for kind, texts, grad in ((0, queries, q.grad), (1, passages, p.grad)):
        for i, part in chunks(texts):
            backward((embed_chunk(part, kind, i) * grad[i:i + len(part)]).sum())
    return float(loss.item())


class PlainEngine:
    """torch AdamW; gradients averaged across workers with an all-reduce (what DDP does)."""

    def __init__(self, model, lr: float, schedule, world: int):
        import torch

        self.model, self.world = model, world
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def forward(self, features):
        return self.model(features)

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        import torch.distributed as dist

        if self.world > 1:
            for param in self.model.parameters():
                if param.grad is not None:
                    dist.all_reduce(param.grad)
                    param.grad /= self.world
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


class DeepSpeedEngine(PlainEngine):
    """DeepSpeed ZeRO (stage 1/2) on the process group Ray Train set up (NCCL on GPUs, gloo on CPUs);
    bf16 on GPUs. ZeRO-1/2 keep full weights on every rank, so rank 0 saves the plain model."""

    def __init__(self, model, lr: float, schedule, world: int, tc: dict, on_gpu: bool):
        import deepspeed
        import torch

        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        config = {"train_micro_batch_size_per_gpu": tc["batch_size"], "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": tc["zero_stage"]},
                  "zero_allow_untested_optimizer": True,  # torch's AdamW (DeepSpeed's own needs a CUDA build)
                  "bf16": {"enabled": on_gpu}, "steps_per_print": 10**9}
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        self.model, self.world = model, world
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)

    def forward(self, features):
        return self.engine(features)

    def backward(self, loss) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()  # optimizer, scheduler and zeroing of gradients


class ValidationSet:
    """The val split as a small retrieval task: its queries against every passage of its rows
    (positives and mined negatives). NDCG@10 on it picks the best checkpoint and drives early stopping."""

    def __init__(self, rows: list[dict], max_queries: int):
        rows = rows[:max_queries]
        texts: dict[str, str] = {}
        for r in rows:
            texts[r["positive_id"]] = r["positive_text"]
            texts.update(zip(r["negative_ids"], r["negative_texts"]))
        self.passage_ids, self.passages = list(texts), list(texts.values())
        self.queries = {r["qa_id"]: r["query"] for r in rows}
        self.qrels = {r["qa_id"]: {pid: 1 for pid in (r.get("positive_ids") or [r["positive_id"]])} for r in rows}

    def __len__(self) -> int:
        return len(self.queries)

    def ndcg10(self, encode) -> float:
        import torch

        from pipeline.evaluate import compute_metrics

        with torch.no_grad():
            q = torch.cat([encode(list(self.queries.values())[i:i + 64], 0) for i in range(0, len(self.queries), 64)])
            p = torch.cat([encode(self.passages[i:i + 64], 1) for i in range(0, len(self.passages), 64)])
        scores = (q @ p.T).float().cpu().numpy()
        run = {}
        for qid, row in zip(self.queries, scores):
            top = row.argsort()[::-1][:10]
            run[qid] = {self.passage_ids[j]: float(row[j]) for j in top}
        return compute_metrics(self.qrels, run)[0]["ndcg@10"]


def train_loop(config: dict) -> None:
    import os
    import time

    import pyarrow.parquet as pq
    import ray.train
    import torch
    import torch.distributed as dist

    from pipeline.encode import load_model
    from pipeline.ray_runtime import set_threads

    tc = config["train"]
    set_threads(tc["cpus_per_worker"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = tc["use_gpu"] and torch.cuda.is_available()
    device = f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu"
    torch.manual_seed(tc["seed"])

    model = load_model(config["base_model"], device=device)
    state = {"global_step": 0, "best": None, "evals_without_gain": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model = load_model(d, device=device)
            state = json.loads((Path(d) / TRAINER_STATE).read_text())
    model.prompts = {k: v for k, v in (("query", tc["query_prefix"]), ("passage", tc["passage_prefix"])) if v}
    model.train()

    rows = pq.read_table(config["train_path"]).to_pylist()
    val = ValidationSet(pq.read_table(config["val_path"]).to_pylist(), tc["val_max_queries"]) \
        if config.get("val_path") else None
    steps_per_epoch = len(batches(rows, tc["batch_size"] * world, tc["seed"], 0))
    total = steps_per_epoch * tc["epochs"]
    warmup = int(tc["warmup_ratio"] * total)
    schedule = lambda s: lr_lambda(s, total, warmup)  # noqa: E731
    if tc["engine"] == "deepspeed":
        engine = DeepSpeedEngine(model, config["lr"], schedule, world, tc, on_gpu)
    else:
        engine = PlainEngine(model, config["lr"], schedule, world)
    for _ in range(state["global_step"]):  # resume: bring the schedule to where it was
        engine.scheduler.step()
    prefixes = (tc["query_prefix"], tc["passage_prefix"])
    max_lens = (tc["max_query_tokens"], tc["max_passage_tokens"])

    def encode(texts: list[str], kind: int):
        """kind 0: queries, 1: passages (their prefix and max length)."""
        model.max_seq_length = max_lens[kind]
        features = model.tokenize([prefixes[kind] + t for t in texts])
        features = {k: v.to(device) if hasattr(v, "to") else v for k, v in features.items()}
        return torch.nn.functional.normalize(engine.forward(features)["sentence_embedding"].float(), dim=-1)

    log_path = Path(config["log_path"])
    writer = None
    if rank == 0:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(config["tensorboard_dir"])
        with open(log_path, "a") as f:  # where a run (re)started: the worker-failure test reads this
            f.write(json.dumps({"event": "start", "global_step": state["global_step"], "world": world,
                                "engine": tc["engine"]}) + "\n")
    pids = [None] * world
    if world > 1:
        dist.all_gather_object(pids, os.getpid())
    else:
        pids = [os.getpid()]
    if rank == 0:
        (log_path.parent / "worker_pids.json").write_text(json.dumps(pids))

    def checkpoint_now(epoch: int, loss: float) -> bool:
        """Evaluate on val (rank 0), report a checkpoint, and say whether to stop early."""
        metrics = {"epoch": epoch, "global_step": state["global_step"], "loss": loss}
        stop = False
        if rank == 0 and val is not None and len(val):
            model.eval()
            score = val.ndcg10(encode)
            model.train()
            metrics["val_ndcg@10"] = score
            if state["best"] is None or score > state["best"]:
                state["best"], state["evals_without_gain"] = score, 0
            else:
                state["evals_without_gain"] += 1
            stop = bool(tc["early_stopping_patience"]) and state["evals_without_gain"] >= tc["early_stopping_patience"]
            writer.add_scalar("val/ndcg@10", score, state["global_step"])
            with open(log_path, "a") as f:
                f.write(json.dumps({"event": "val", "global_step": state["global_step"], "ndcg@10": score,
                                    "early_stop": stop}) + "\n")
        if world > 1:  # every worker must take the same branch
            flag = [stop, metrics.get("val_ndcg@10")]
            dist.broadcast_object_list(flag, src=0)
            stop, metrics["val_ndcg@10"] = flag
        metrics = {k: v for k, v in metrics.items() if v is not None}
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                # encode() switches the max length between queries and passages; save the longer one, the
                # length every later user of the model (eval, export, serving) should embed passages with.
                model.max_seq_length = max(max_lens)
                model.save(tmp, safe_serialization=True)
                (Path(tmp) / TRAINER_STATE).write_text(json.dumps(state))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics)
        return stop

    every = tc["checkpoint_every_steps"]
    t_last, examples, losses = time.perf_counter(), 0, []
    start_epoch, skip = state["global_step"] // steps_per_epoch, state["global_step"] % steps_per_epoch
    for epoch in range(start_epoch, tc["epochs"]):
        for step, batch in enumerate(batches(rows, tc["batch_size"] * world, tc["seed"], epoch)):
            if epoch == start_epoch and step < skip:
                continue  # done before the restart
            mine = batch[rank::world]  # each worker takes its slice of the global batch
            k = tc["negatives_per_query"]
            passages = [r["positive_text"] for r in mine] + [t for r in mine for t in r["negative_texts"][:k]]
            passage_ids = [r["positive_id"] for r in mine] + [i for r in mine for i in r["negative_ids"][:k]]
            positive_ids = [r["positive_id"] for r in mine]
            loss_fn = lambda q, p: info_nce(q, p, positive_ids, passage_ids, tc["temperature"], tc["symmetric"])  # noqa: E731
            queries = [r["query"] for r in mine]
            if tc["grad_cache_chunk"]:
                loss = grad_cache_step(encode, queries, passages, loss_fn, engine.backward, tc["grad_cache_chunk"],
                                       tc["seed"] + state["global_step"])
            else:
                loss_t = loss_fn(encode(queries, 0), encode(passages, 1))
                engine.backward(loss_t)
                loss = float(loss_t.item())
            engine.step()
            state["global_step"] += 1
            losses.append(loss)
            examples += len(batch)
            if rank == 0:
                elapsed = time.perf_counter() - t_last
                record = {"epoch": epoch, "step": state["global_step"] - 1, "loss": round(loss, 5), "lr": engine.lr,
                          "steps_per_s": round(1 / elapsed, 4), "examples_per_s": round(len(batch) / elapsed, 3)}
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                writer.add_scalar("train/loss", loss, state["global_step"])
                writer.add_scalar("train/lr", engine.lr, state["global_step"])
                writer.add_scalar("train/examples_per_s", record["examples_per_s"], state["global_step"])
                if state["global_step"] % 10 == 0:
                    print(f"[train] step {state['global_step']}/{total} loss {loss:.4f} "
                          f"{record['examples_per_s']:.1f} examples/s", flush=True)
            t_last = time.perf_counter()
            last_in_epoch = step == steps_per_epoch - 1
            if (every and state["global_step"] % every == 0) or last_in_epoch:
                mean = sum(losses) / max(1, len(losses))
                losses = []
                if checkpoint_now(epoch, mean):
                    if writer:
                        writer.close()
                    return
    if writer:
        writer.close()


def run_stage(cfg, run, rec) -> None:
    import pyarrow.parquet as pq
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.models import resolve_embedder

    train_path = run.root / "prep" / "train.parquet"
    n_rows = pq.ParquetFile(train_path).metadata.num_rows
    if n_rows < 2:
        raise ValueError(f"{train_path} has {n_rows} rows; contrastive training needs at least 2")
    log_path = rec.output("train_log.jsonl")
    tc = cfg.train
    # The Ray Train run is named by the stage's identity: a rerun after a crash finds its checkpoints and
    # resumes; a run with other settings or inputs gets a fresh name and never resumes stale weights.
    identity = hashlib.sha256((rec.manifest.config_hash + json.dumps(rec.manifest.inputs, sort_keys=True))
                              .encode()).hexdigest()[:12]
    storage = run.root / "cache" / "ray_train"
    if not log_path.exists():  # a fresh stage folder (new, stale or --force): never resume old checkpoints
        shutil.rmtree(storage / f"train-{identity}", ignore_errors=True)
    val_path = run.root / "prep" / "val.parquet"
    has_val = val_path.exists() and pq.ParquetFile(val_path).metadata.num_rows > 0
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"train": tc.model_dump(), "lr": tc.effective_lr, "base_model": resolve_embedder(tc.base_model),
                           "train_path": str(train_path), "val_path": str(val_path) if has_val else None,
                           "log_path": str(log_path), "tensorboard_dir": str(rec.dir / "tensorboard")},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker,
                                                           **({"GPU": 1} if tc.use_gpu else {})}),
        run_config=RunConfig(name=f"train-{identity}", storage_path=str(storage),
                             # The latest checkpoint is always kept too (Ray never deletes it): resume needs it.
                             checkpoint_config=CheckpointConfig(
                                 num_to_keep=2, checkpoint_score_attribute="val_ndcg@10" if has_val else None,
                                 checkpoint_score_order="max"),
                             failure_config=FailureConfig(max_failures=tc.max_failures)),
    )
    result = trainer.fit()
    chosen = result.checkpoint
    if has_val and tc.keep == "best":
        chosen = result.get_best_checkpoint(metric="val_ndcg@10", mode="max") or chosen
    if chosen is None:
        raise RuntimeError("training finished without a checkpoint")
    model_dir = rec.output("model")
    shutil.rmtree(model_dir, ignore_errors=True)
    with chosen.as_directory() as d:
        shutil.copytree(d, model_dir)
        kept = json.loads((Path(d) / TRAINER_STATE).read_text())
    (model_dir / TRAINER_STATE).unlink(missing_ok=True)
    log = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    steps = [r for r in log if "loss" in r and "event" not in r]
    vals = [r for r in log if r.get("event") == "val"]
    rec.manifest.counts = {"train_rows": n_rows, "steps": kept["global_step"], "workers": tc.num_workers,
                           "engine": tc.engine, "restarts": sum(r.get("event") == "start" for r in log) - 1,
                           "first_loss": steps[0]["loss"] if steps else None,
                           "last_loss": steps[-1]["loss"] if steps else None,
                           "kept_checkpoint": {"global_step": kept["global_step"], "val_ndcg@10": kept.get("best")
                                               if tc.keep == "best" else None},
                           "val_ndcg@10": [(r["global_step"], round(r["ndcg@10"], 5)) for r in vals],
                           "early_stopped": any(r.get("early_stop") for r in vals)}
