"""Training: our train stage (Ray Train + DeepSpeed ZeRO-2, one worker) vs sentence-transformers'
`SentenceTransformerTrainer` with `MultipleNegativesRankingLoss`, same data, model, batch and machine.

Data: the train/val splits of a SciFact run (default benchmarks/work/scifact-300, made by
benchmarks/scifact.py: synthetic claims with 3 mined hard negatives each). Both train all-MiniLM-L6-v2
for one epoch, batch 16, 3 hard negatives per query, lr 2e-5 with 10% warmup, temperature 0.05 (MNRL's
scale 20). Each runs in a fresh child process; the parent samples the RSS of the child's whole process
tree (ours includes Ray's own processes) and of its largest process (the one that trains).
Both final models are scored with the same val NDCG@10 (the val queries against every val passage).

    .venv/bin/python benchmarks/training.py [--run benchmarks/work/scifact-300]

Ours runs twice: with the DeepSpeed ZeRO-2 engine (the default) and with the plain AdamW engine.
Prints examples/s, peak memory and val NDCG@10 for each and the ratios; writes results/training.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {"batch_size": 16, "negatives": 3, "lr": 2e-5, "warmup_ratio": 0.1, "temperature": 0.05, "epochs": 1}


def make_run(source: Path, root: Path):
    """A run folder whose prep stage holds the source run's train/val splits."""
    from pipeline.rundir import RunDir, StageRecorder

    shutil.rmtree(root, ignore_errors=True)
    run = RunDir(root)
    for stage in ("corpus", "sdg"):
        with StageRecorder(run, stage, "benchmark", {}) as rec:
            (rec.dir / "source.txt").write_text(str(source))
    with StageRecorder(run, "prep", "benchmark", {}) as rec:
        for split in ("train", "val"):
            shutil.copy(source / "prep" / f"{split}.parquet", rec.output(f"{split}.parquet"))
    return run


def train_ours(work: Path, source: Path, engine: str) -> tuple[str, int, float]:
    from pipeline.config import load_config
    from pipeline.runner import run_stage

    run = make_run(source, work / f"ours-{engine}")
    cfg = load_config(None, [f"train.batch_size={SETTINGS['batch_size']}", f"train.epochs={SETTINGS['epochs']}",
                             f"train.negatives_per_query={SETTINGS['negatives']}", f"train.lr={SETTINGS['lr']}",
                             f"train.temperature={SETTINGS['temperature']}", "train.cpus_per_worker=2",
                             "train.keep=last", "ray.num_cpus=2", f"train.engine={engine}"])
    run_stage("train", cfg, run, force=True)
    log = [json.loads(x) for x in (run.root / "train" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r and "event" not in r]
    # Time inside the training loop (the sum of step times), as the ST trainer's own figure counts it.
    loop_s = sum(SETTINGS["batch_size"] / r["examples_per_s"] for r in steps)
    return str(run.root / "train" / "model"), len(steps), len(steps) * SETTINGS["batch_size"] / loop_s


def train_sentence_transformers(work: Path, source: Path) -> tuple[str, int, float]:
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers

    from pipeline.encode import load_model
    from pipeline.models import resolve_embedder

    torch.set_num_threads(2)
    rows = pq.read_table(source / "prep" / "train.parquet").to_pylist()
    k = SETTINGS["negatives"]
    rows = [r for r in rows if len(r["negative_texts"]) >= k]  # MNRL needs the same number per row
    data = {"anchor": [r["query"] for r in rows], "positive": [r["positive_text"] for r in rows]}
    for i in range(k):
        data[f"negative_{i}"] = [r["negative_texts"][i] for r in rows]
    model = load_model(resolve_embedder("minilm"), device="cpu")
    out = work / "st"
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "checkpoints"), num_train_epochs=SETTINGS["epochs"],
        per_device_train_batch_size=SETTINGS["batch_size"], learning_rate=SETTINGS["lr"],
        warmup_ratio=SETTINGS["warmup_ratio"], lr_scheduler_type="cosine", save_strategy="no", report_to=[],
        batch_sampler=BatchSamplers.NO_DUPLICATES, logging_steps=10, use_cpu=True, seed=13)
    loss = MultipleNegativesRankingLoss(model, scale=1 / SETTINGS["temperature"])
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_dict(data), loss=loss)
    metrics = trainer.train().metrics
    model.save(str(out / "model"))
    return str(out / "model"), trainer.state.global_step, metrics["train_samples_per_second"]


def val_ndcg(model_path: str, source: Path) -> float:
    import pyarrow.parquet as pq
    import torch

    from pipeline.encode import load_model
    from pipeline.train import ValidationSet

    model = load_model(model_path, device="cpu").eval()
    val = ValidationSet(pq.read_table(source / "prep" / "val.parquet").to_pylist(), 10_000)

    def encode(texts, kind):
        return torch.nn.functional.normalize(torch.as_tensor(model.encode(texts, batch_size=64)), dim=-1)

    return val.ndcg10(encode)


def child(method: str, work: Path, source: Path) -> dict:
    """method: 'ours-deepspeed', 'ours-ddp' or 'sentence-transformers'."""
    import pyarrow.parquet as pq

    n_rows = pq.ParquetFile(source / "prep" / "train.parquet").metadata.num_rows
    t0 = time.perf_counter()
    if method.startswith("ours"):
        model, steps, loop_rate = train_ours(work, source, method.split("-", 1)[1])
    else:
        model, steps, loop_rate = train_sentence_transformers(work, source)
    seconds = time.perf_counter() - t0
    examples = steps * SETTINGS["batch_size"]
    return {"method": method, "train_rows": n_rows, "steps": steps, "seconds": round(seconds, 1),
            "examples_per_s": round(examples / seconds, 3), "loop_examples_per_s": round(loop_rate, 3),
            "val_ndcg@10": round(val_ndcg(model, source), 4)}


def run_measured(cmd: list[str]) -> tuple[subprocess.CompletedProcess, dict]:
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"tree_mib": 0.0, "largest_process_mib": 0.0}

    def sample():
        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                procs = [parent, *parent.children(recursive=True)]
                rss = [p.memory_info().rss / 2**20 for p in procs if p.is_running()]
                peak["tree_mib"] = max(peak["tree_mib"], sum(rss))
                peak["largest_process_mib"] = max(peak["largest_process_mib"], max(rss))
            except psutil.Error:
                pass
            time.sleep(0.5)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), {k: round(v) for k, v in peak.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(ROOT / "benchmarks" / "work" / "scifact-300"),
                    help="A run folder with prep/train.parquet and prep/val.parquet.")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "training"))
    ap.add_argument("--methods", nargs="+", default=["ours-deepspeed", "ours-ddp", "sentence-transformers"],
                    choices=["ours-deepspeed", "ours-ddp", "sentence-transformers"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    source, work = Path(args.run), Path(args.work)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, work, source)), flush=True)
        return 0
    if not (source / "prep" / "train.parquet").exists():
        raise SystemExit(f"{source}/prep/train.parquet is missing: run benchmarks/scifact.py --docs 300 first")

    from benchmarks.common import write_result

    results = []
    for method in args.methods:
        proc, peak = run_measured([sys.executable, __file__, "--child", method, "--run", str(source),
                                   "--work", str(work)])
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
            return 1
        results.append({**json.loads(line[len("RESULT "):]), "peak_rss": peak})
    print(f"{'method':22} {'steps':>5} {'seconds':>8} {'examples/s':>10} {'in loop':>8} {'tree MiB':>9} "
          f"{'trainer MiB':>11} {'val NDCG@10':>11}")
    for r in results:
        print(f"{r['method']:22} {r['steps']:5d} {r['seconds']:8.1f} {r['examples_per_s']:10.2f} "
              f"{r['loop_examples_per_s']:8.2f} "
              f"{r['peak_rss']['tree_mib']:9d} {r['peak_rss']['largest_process_mib']:11d} {r['val_ndcg@10']:11.4f}")
    by_name = {r["method"]: r for r in results}
    st = by_name.get("sentence-transformers")
    ratios = {}
    for name, ours in by_name.items():
        if st is None or name == "sentence-transformers":
            continue
        ratios[name] = {"examples_per_s_over_st": round(ours["examples_per_s"] / st["examples_per_s"], 3),
                        "loop_examples_per_s_over_st": round(ours["loop_examples_per_s"] / st["loop_examples_per_s"], 3),
                        "peak_tree_rss_over_st": round(ours["peak_rss"]["tree_mib"] / st["peak_rss"]["tree_mib"], 3),
                        "peak_trainer_rss_over_st": round(ours["peak_rss"]["largest_process_mib"]
                                                          / st["peak_rss"]["largest_process_mib"], 3)}
        print(f"{name} / sentence-transformers: " + ", ".join(f"{k} {v}" for k, v in ratios[name].items()))
    path = write_result("training" if len(results) == 3 else "training-" + "-".join(args.methods), {"settings": SETTINGS, "source_run": str(source), "results": results,
                                     "ratios": ratios, "command": "benchmarks/training.py --methods " + " ".join(args.methods)})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
