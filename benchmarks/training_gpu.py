"""Training on one GPU, bf16: our training worker (DeepSpeed ZeRO-2, bf16) vs sentence-transformers'
`SentenceTransformerTrainer` (bf16 autocast) with `MultipleNegativesRankingLoss`; same rows, model,
global batch, epochs and schedule, one after the other in one process tree.

The worker is `pipeline.train.Worker` run directly (world 1, no Ray: Ray's wheel cannot travel to the
GPU machine), so this times exactly the step code the train stage runs on Ray Train. Data: the splits
benchmarks/training.py builds (SciFact human train claims, hard negatives from our prep stage).

    python benchmarks/training_gpu.py --data benchmarks/work/training/data --model MODEL_DIR --out FILE.json

Also runs the GradCache dropout-replay test on the CUDA generator (tests/test_train_logic.py), which the
CPU-only CI skips.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {"batch_size": 64, "negatives": 3, "lr": 2e-5, "warmup_ratio": 0.1, "temperature": 0.05, "epochs": 6,
            "max_query_tokens": 64, "max_passage_tokens": 256}


def rows_path(data: Path, work: Path, limit: int | None) -> Path:
    """The training rows both trainers use: those with the full number of hard negatives."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(data / "prep" / "train.parquet")
    table = table.filter(pc.greater_equal(pc.list_value_length(table["negative_ids"]), SETTINGS["negatives"]))
    if limit:
        table = table.slice(0, limit)
    path = work / "train.parquet"
    pq.write_table(table, path)
    return path


def run_ours(train_path: Path, model: str, work: Path, engine: str, profile: bool = False) -> dict:
    import torch

    from pipeline.config import TrainConfig, WorkerPlacement
    from pipeline.train import Worker

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29577")
    tc = TrainConfig(use_gpu=True, lr=SETTINGS["lr"], queries_per_worker=SETTINGS["batch_size"], epochs=SETTINGS["epochs"],
                     negatives_per_query=SETTINGS["negatives"], loss_temperature=SETTINGS["temperature"],
                     warmup_ratio=SETTINGS["warmup_ratio"], max_query_tokens=SETTINGS["max_query_tokens"],
                     max_passage_tokens=SETTINGS["max_passage_tokens"], engine=engine,
                     placement=WorkerPlacement(cpus_per_worker=8))
    log = work / f"ours_{engine}_{profile}.jsonl"
    config = {"train": tc, "seed": 13, "base_model": model, "train_path": str(train_path),
              "val_path": None, "log_path": str(log), "tensorboard_dir": str(work / "tb")}
    t0 = time.perf_counter()
    worker = Worker(config, rank=0, world=1, resume_dir=None, report=lambda metrics, folder: None)
    if profile:  # where a step's time goes (a separate, shorter run: the profiler slows what it watches)
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            worker.run()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
        return {}
    worker.run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    steps = [json.loads(x) for x in log.read_text().splitlines()]
    steps = [r for r in steps if "step" in r]
    examples = len(steps) * worker.sampler.global_batch
    loop = sum(worker.sampler.global_batch / r["examples_per_s"] for r in steps)
    name = {"deepspeed": "ours (Worker, DeepSpeed ZeRO-2 bf16)", "ddp": "ours (Worker, AdamW, bf16 autocast)"}[engine]
    return {"method": name, "steps": len(steps), "seconds": round(seconds, 2),
            "examples_per_s": round(examples / seconds, 1), "loop_examples_per_s": round(examples / loop, 1),
            "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"],
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None}


def run_st(train_path: Path, model_path: str, work: Path) -> dict:
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rows = pq.read_table(train_path).to_pylist()
    data = {"anchor": [r["query"] for r in rows], "positive": [r["positive_text"] for r in rows]}
    for i in range(SETTINGS["negatives"]):
        data[f"negative_{i}"] = [r["negative_texts"][i] for r in rows]
    model = SentenceTransformer(model_path, device="cuda" if torch.cuda.is_available() else "cpu")
    model.max_seq_length = SETTINGS["max_passage_tokens"]
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work / "st"), num_train_epochs=SETTINGS["epochs"],
        per_device_train_batch_size=SETTINGS["batch_size"], learning_rate=SETTINGS["lr"],
        warmup_ratio=SETTINGS["warmup_ratio"], lr_scheduler_type="cosine", save_strategy="no", report_to=[],
        batch_sampler=BatchSamplers.NO_DUPLICATES, logging_steps=10, bf16=torch.cuda.is_available(), seed=13)
    loss = MultipleNegativesRankingLoss(model, scale=1 / SETTINGS["temperature"])
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_dict(data), loss=loss)
    t0 = time.perf_counter()
    metrics = trainer.train().metrics
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    examples = trainer.state.global_step * SETTINGS["batch_size"]
    return {"method": "sentence-transformers (bf16)", "steps": trainer.state.global_step,
            "seconds": round(seconds, 2), "examples_per_s": round(examples / seconds, 1),
            "loop_examples_per_s": round(metrics["train_samples_per_second"], 1),
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None}


def grad_cache_on_cuda(model: str) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_train_logic import test_grad_cache_replays_dropout_in_train_mode

    test_grad_cache_replays_dropout_in_train_mode(model, "cuda")
    return "passed"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="A run folder with prep/train.parquet.")
    ap.add_argument("--model", required=True, help="A sentence-transformers model folder (fp32).")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, help="Use only the first N rows (a quick check of the script).")
    ap.add_argument("--batch", type=int, default=SETTINGS["batch_size"])
    ap.add_argument("--epochs", type=int, default=SETTINGS["epochs"])
    ap.add_argument("--profile", action="store_true", help="Then print where a DeepSpeed step's time goes.")
    args = ap.parse_args()
    SETTINGS.update(batch_size=args.batch, epochs=args.epochs)
    import torch

    work = Path(tempfile.mkdtemp(prefix="retrofit-gpu-"))
    train_path = rows_path(Path(args.data), work, args.rows)
    result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "settings": SETTINGS}
    result["grad_cache_cuda_test"] = grad_cache_on_cuda(args.model) if torch.cuda.is_available() else "no CUDA"
    result["ours"] = run_ours(train_path, args.model, work, "deepspeed")
    result["ours_ddp"] = run_ours(train_path, args.model, work, "ddp")
    result["sentence_transformers"] = run_st(train_path, args.model, work)
    for ours in ("ours", "ours_ddp"):
        for key in ("examples_per_s", "loop_examples_per_s"):
            result[f"{ours}_over_st_{key}"] = round(result[ours][key] / result["sentence_transformers"][key], 3)
    if args.profile:
        SETTINGS["epochs"] = 1
        run_ours(train_path, args.model, work, "deepspeed", profile=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
