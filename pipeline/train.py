"""Train stage: contrastive fine-tuning (InfoNCE over in-batch and hard negatives) on Ray Train.

`train_loop` is what each Ray Train worker runs; `run_stage` builds the TorchTrainer from config
(ScalingConfig(num_workers, use_gpu)), so scaling out means changing one number. Gradients are
averaged across workers with an all-reduce after each backward. Each epoch ends with a checkpoint
reported to Ray Train; a restarted worker resumes from the latest one.
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


def train_loop(config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist
    import pyarrow.parquet as pq

    from pipeline.encode import load_model
    from pipeline.ray_runtime import set_threads

    tc = config["train"]
    set_threads(tc["cpus_per_worker"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = "cuda" if tc["use_gpu"] and torch.cuda.is_available() else "cpu"
    torch.manual_seed(tc["seed"])

    model = load_model(config["base_model"], device=device)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model = load_model(d, device=device)
            start_epoch = json.loads((Path(d) / TRAINER_STATE).read_text())["epoch"] + 1
    model.train()

    rows = pq.read_table(config["train_path"]).to_pylist()
    all_batches = batches(rows, tc["batch_size"] * world, tc["seed"], 0)
    steps_per_epoch = len(all_batches)
    total = steps_per_epoch * tc["epochs"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total, int(tc["warmup_ratio"] * total)))
    for _ in range(start_epoch * steps_per_epoch):  # resume: bring the schedule to where it was
        scheduler.step()

    def embed(texts: list[str], max_len: int):
        model.max_seq_length = max_len
        features = {k: v.to(device) if hasattr(v, "to") else v for k, v in model.tokenize(texts).items()}
        return torch.nn.functional.normalize(model(features)["sentence_embedding"], dim=-1)

    log_path = Path(config["log_path"])
    for epoch in range(start_epoch, tc["epochs"]):
        losses = []
        for step, batch in enumerate(batches(rows, tc["batch_size"] * world, tc["seed"], epoch)):
            mine = batch[rank::world]  # each worker takes its slice of the global batch
            k = tc["negatives_per_query"]
            passages = [r["positive_text"] for r in mine] + [t for r in mine for t in r["negative_texts"][:k]]
            passage_ids = [r["positive_id"] for r in mine] + [i for r in mine for i in r["negative_ids"][:k]]
            q = embed([r["query"] for r in mine], tc["max_query_tokens"])
            p = embed(passages, tc["max_passage_tokens"])
            loss = info_nce(q, p, [r["positive_id"] for r in mine], passage_ids, tc["temperature"], tc["symmetric"])
            optimizer.zero_grad()
            loss.backward()
            if world > 1:
                for param in model.parameters():
                    if param.grad is not None:
                        dist.all_reduce(param.grad)
                        param.grad /= world
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"epoch": epoch, "step": epoch * steps_per_epoch + step,
                                        "loss": round(loss.item(), 5), "lr": scheduler.get_last_lr()[0]}) + "\n")
        metrics = {"epoch": epoch, "loss": float(sum(losses) / max(1, len(losses))), "steps": len(losses)}
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                model.save(tmp, safe_serialization=True)
                (Path(tmp) / TRAINER_STATE).write_text(json.dumps(metrics))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics)


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
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"train": tc.model_dump(), "lr": tc.effective_lr, "base_model": resolve_embedder(tc.base_model),
                           "train_path": str(train_path), "log_path": str(log_path)},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(name=f"train-{identity}", storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=2)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    model_dir = rec.output("model")
    shutil.rmtree(model_dir, ignore_errors=True)
    with result.checkpoint.as_directory() as d:
        shutil.copytree(d, model_dir)
    (model_dir / TRAINER_STATE).unlink(missing_ok=True)
    log = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    rec.manifest.counts = {"train_rows": n_rows, "steps": len(log), "workers": tc.num_workers,
                           "first_loss": log[0]["loss"] if log else None,
                           "last_loss": log[-1]["loss"] if log else None}
