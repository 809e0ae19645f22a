"""Training: our train stage (Ray Train + DeepSpeed ZeRO-2) vs sentence-transformers'
`SentenceTransformerTrainer` with `MultipleNegativesRankingLoss`, same data, model, batch and machine.

Data, built on first use under --work (nothing from an earlier run is needed): SciFact's abstracts
(those its human *train* claims cite, plus others to 2,000) as a pre-chunked corpus, the train claims as
queries (a claim citing several abstracts has several positives), then our real prep stage: document
split, hard negatives mined with the base model. Both trainers train all-MiniLM-L6-v2 for one epoch,
global batch 16, 3 hard negatives per query, lr 2e-5 with 10% warmup and cosine decay, temperature 0.05
(MNRL's scale 20). Each runs in a fresh child process; the parent samples the RSS of the child's whole
process tree (ours includes Ray's own processes) and of its largest process (the one that trains).
Both final models are scored with the same val NDCG@10 (the val queries against every val passage).

    .venv/bin/python benchmarks/training.py

Rows, in two like-for-like pairs: ours with one worker (2 threads) and no val pass (train.val_at_checkpoints
false, as bare sentence-transformers (2 threads) has none; ours still writes its resumable checkpoint), and
ours with the val pass at its checkpoint (the stage's default) against sentence-transformers given the same
duties (its IR evaluator on the same val set and a checkpoint; compare wall times: its own "in loop" figure
includes them). Plus ours with two workers (1 thread each, 8 rows each: the same global batch of 16, every
query scored against all 16 positives and 48 hard negatives through the all-gather). All of these train in
fp32 (the issue's settings; train.precision=fp32, whatever the stage's 'auto' picks). Prints examples/s
(wall, and inside the training loop), peak memory and val NDCG@10, and the ratios; writes
results/training.json.

bf16 (both trainers' autocast, fp32 weights), a third like-for-like pair, run on request: `ours-bf16`
(train.precision=bf16, what 'auto' picks on a CPU with AVX512-BF16 or AMX) against
`sentence-transformers-bf16` (bf16=True), e.g.

    .venv/bin/python benchmarks/training.py --methods ours-bf16 sentence-transformers-bf16 ours sentence-transformers

`ours-bf16-glibc-arenas` is `ours-bf16` with glibc's default malloc arenas instead of the one arena the stage
gives its Ray Train workers: `--methods ours-bf16 ours-bf16-glibc-arenas` measures that setting.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_SEED = 13  # the pipeline's default run seed
SETTINGS = {"batch_size": 16, "negatives": 3, "lr": 2e-5, "warmup_ratio": 0.1, "temperature": 0.05, "epochs": 1,
            "seed": DEFAULT_SEED}
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
CORPUS_DOCS = 2000
ST_SAME_DUTIES = "sentence-transformers-same-duties"
OURS_VALIDATED = "ours-validated"
ST_BF16 = "sentence-transformers-bf16"
METHODS = {"ours": {"workers": 1}, "sentence-transformers": {}, OURS_VALIDATED: {"workers": 1, "duties": True},
           ST_SAME_DUTIES: {"duties": True}, "ours-2-workers": {"workers": 2},
           "ours-bf16": {"workers": 1, "bf16": True}, ST_BF16: {"bf16": True},
           # The stage gives its Ray Train workers one malloc arena; with MALLOC_ARENA_MAX already set it leaves
           # the setting alone, so this row trains with glibc's default for 2 cores (8 arenas per core).
           "ours-bf16-glibc-arenas": {"workers": 1, "bf16": True, "env": {"MALLOC_ARENA_MAX": "16"}}}
DEFAULT_METHODS = [m for m in METHODS if not METHODS[m].get("bf16")]
# Duties at each checkpoint, beyond training: our stage always writes a resumable checkpoint (model, optimiser,
# scheduler, RNG) and by default scores val NDCG@10 (to keep the best checkpoint). Bare ST does neither, so
# "ours" skips the val pass; "ours-validated" keeps it and is compared with "same-duties", ST given both: its
# IR evaluator on the same val set and save_strategy "epoch".


def build_data(root: Path) -> Path:
    """A run folder whose prep stage holds train/val splits made from SciFact's human train claims."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import load_config
    from pipeline.corpus import CHUNK_SCHEMA
    from pipeline.beir import load_qrels
    from pipeline.rundir import RunDir, StageRecorder
    from pipeline.runner import run_stage
    from pipeline.sdg import QA_SCHEMA

    if (root / "prep" / "manifest.json").exists() and (root / "prep" / "train.parquet").exists():
        return root
    qrels = load_qrels(SCIFACT / "qrels" / "train.tsv")
    claims = {str(q["_id"]): q["text"] for q in map(json.loads, open(SCIFACT / "queries.jsonl"))}
    docs = {str(d["_id"]): d for d in map(json.loads, open(SCIFACT / "corpus.jsonl"))}
    cited = sorted({d for rel in qrels.values() for d in rel if d in docs})
    others = sorted(set(docs) - set(cited))
    keep = cited + random.Random(0).sample(others, max(0, CORPUS_DOCS - len(cited)))
    chunks = [{"chunk_id": d, "doc_id": d, "title": docs[d].get("title") or "", "text": docs[d]["text"],
               "chunk_index": 0, "n_tokens": len(docs[d]["text"].split())} for d in keep]
    qa = [{"qa_id": f"claim-{q}", "query": claims[q], "chunk_id": positives[0], "doc_id": positives[0],
           "query_type": "claim", "generator": "scifact-train-claims", "related_chunk_ids": positives[1:]}
          for q, rel in sorted(qrels.items()) if (positives := sorted(d for d in rel if d in docs))]
    run = RunDir(root)
    with StageRecorder(run, "corpus", "benchmark", {}) as rec:
        pq.write_table(pa.Table.from_pylist(chunks, CHUNK_SCHEMA), rec.output("chunks.parquet"))
    with StageRecorder(run, "sdg", "benchmark", {}) as rec:
        pq.write_table(pa.Table.from_pylist(qa, QA_SCHEMA), rec.output("qa.parquet"))
    cfg = load_config(None, ["prep.fixed_eval_set=false", "prep.roundtrip_top_k=0", "prep.num_negatives=5"])
    run_stage("prep", cfg, run, force=True)
    return root


def make_run(source: Path, root: Path):
    """A fresh run folder whose prep stage holds the data's train/val splits."""
    import pyarrow.parquet as pq

    from pipeline.rundir import RunDir, StageRecorder

    shutil.rmtree(root, ignore_errors=True)
    run = RunDir(root)
    for stage in ("corpus", "sdg"):
        with StageRecorder(run, stage, "benchmark", {}) as rec:
            (rec.dir / "source.txt").write_text(str(source))
    with StageRecorder(run, "prep", "benchmark", {}) as rec:
        shutil.copy(source / "prep" / "val.parquet", rec.output("val.parquet"))
        pq.write_table(train_table(source), rec.output("train.parquet"))
    return run


def train_table(source: Path):
    """The training rows both trainers use: those with the full number of hard negatives (MNRL needs the
    same number on every row)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(source / "prep" / "train.parquet")
    return table.filter(pc.greater_equal(pc.list_value_length(table["negative_ids"]), SETTINGS["negatives"]))


def train_ours(run_dir: Path, source: Path, workers: int, validated: bool = False,
               bf16: bool = False) -> tuple[str, int, float, int]:
    from pipeline.config import load_config
    from pipeline.runner import run_stage

    run = make_run(source, run_dir)
    per_worker = SETTINGS["batch_size"] // workers  # the same global batch whatever the worker count
    cfg = load_config(None, [f"train.queries_per_worker={per_worker}", f"train.epochs={SETTINGS['epochs']}",
                             f"train.negatives_per_query={SETTINGS['negatives']}", f"train.lr={SETTINGS['lr']}",
                             f"train.warmup_ratio={SETTINGS['warmup_ratio']}",
                             f"train.loss_temperature={SETTINGS['temperature']}", f"train.num_workers={workers}",
                             f"train.placement.cpus_per_worker={2 // workers}", "train.keep=last", "ray.num_cpus=2",
                             "train.engine=deepspeed", f"seed={SETTINGS['seed']}",
                             f"train.val_at_checkpoints={str(validated).lower()}",
                             f"train.precision={'bf16' if bf16 else 'fp32'}"])
    run_stage("train", cfg, run, force=True)
    log = [json.loads(x) for x in (run.root / "train" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r and "event" not in r]
    global_batch = next(r["global_batch"] for r in log if r.get("event") == "start")
    # Time inside the training loop (the sum of step times), as the ST trainer's own figure counts it.
    loop_s = sum(global_batch / r["examples_per_s"] for r in steps)
    return str(run.root / "train" / "model"), len(steps), len(steps) * global_batch / loop_s, global_batch


def train_sentence_transformers(work: Path, source: Path, duties: bool = False,
                                bf16: bool = False) -> tuple[str, int, float]:
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers

    from pipeline.embedders import load_model
    from pipeline.models import resolve_embedder

    torch.set_num_threads(2)
    rows = train_table(source).to_pylist()
    k = SETTINGS["negatives"]
    data = {"anchor": [r["query"] for r in rows], "positive": [r["positive_text"] for r in rows]}
    for i in range(k):
        data[f"negative_{i}"] = [r["negative_texts"][i] for r in rows]
    model = load_model(resolve_embedder("minilm"), device="cpu")
    out = work / (("st-same-duties" if duties else "st") + ("-bf16" if bf16 else ""))
    shutil.rmtree(out, ignore_errors=True)
    evaluator = None
    if duties:
        import pyarrow.parquet as pq
        from sentence_transformers.evaluation import InformationRetrievalEvaluator

        from pipeline.config import TrainConfig
        from pipeline.train import ValidationSet

        val = ValidationSet(pq.read_table(source / "prep" / "val.parquet").to_pylist(), TrainConfig().val_max_queries)
        evaluator = InformationRetrievalEvaluator(val.queries, dict(zip(val.passage_ids, val.passages)),
                                                  {q: set(rel) for q, rel in val.qrels.items()}, name="val",
                                                  show_progress_bar=False)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "checkpoints"), num_train_epochs=SETTINGS["epochs"],
        per_device_train_batch_size=SETTINGS["batch_size"], learning_rate=SETTINGS["lr"],
        warmup_ratio=SETTINGS["warmup_ratio"], lr_scheduler_type="cosine", report_to=[],
        save_strategy="epoch" if duties else "no", eval_strategy="epoch" if duties else "no",
        batch_sampler=BatchSamplers.NO_DUPLICATES, logging_steps=10, use_cpu=True, seed=SETTINGS["seed"],
        bf16=bf16)
    loss = MultipleNegativesRankingLoss(model, scale=1 / SETTINGS["temperature"])
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_dict(data), loss=loss,
                                         evaluator=evaluator)
    metrics = trainer.train().metrics
    model.save(str(out / "model"))
    return str(out / "model"), trainer.state.global_step, metrics["train_samples_per_second"]


def val_ndcg(model_path: str, source: Path) -> dict[str, float]:
    """Val NDCG@10 of each val query (the val queries against every val passage)."""
    import pyarrow.parquet as pq
    import torch

    from pipeline.embedders import load_model
    from pipeline.train import ValidationSet

    model = load_model(model_path, device="cpu").eval()
    val = ValidationSet(pq.read_table(source / "prep" / "val.parquet").to_pylist(), 10_000)

    def encode(texts, kind):
        return torch.nn.functional.normalize(torch.as_tensor(model.encode(texts, batch_size=64)), dim=-1)

    return val.per_query(encode)


def child(method: str, work: Path, source: Path) -> dict:
    n_rows = train_table(source).num_rows
    t0 = time.perf_counter()
    spec = METHODS[method]
    if method.startswith("ours"):
        model, steps, loop_rate, global_batch = train_ours(work / method, source, spec["workers"],
                                                           spec.get("duties", False), spec.get("bf16", False))
    else:
        model, steps, loop_rate = train_sentence_transformers(work, source, spec.get("duties", False),
                                                              spec.get("bf16", False))
        global_batch = SETTINGS["batch_size"]
    seconds = time.perf_counter() - t0
    examples = steps * global_batch
    per_query = val_ndcg(model, source)
    return {"method": method, "train_rows": n_rows, "steps": steps, "global_batch": global_batch,
            "seconds": round(seconds, 1), "examples_per_s": round(examples / seconds, 3),
            "loop_examples_per_s": round(loop_rate, 3),
            "val_ndcg@10": round(sum(per_query.values()) / len(per_query), 4), "val_per_query": per_query}


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, dict]:
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})
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


def compare(by_name: dict) -> dict:
    """Each of our rows against bare sentence-transformers in the same round (same seed)."""
    st = by_name.get("sentence-transformers")
    ratios = {}
    for name, ours in by_name.items():
        if st is None or name.startswith("sentence-transformers"):
            continue
        ratios[name] = {**against(ours, st, "st"),
                        "peak_tree_rss_over_st": round(ours["peak_rss"]["tree_mib"] / st["peak_rss"]["tree_mib"], 3),
                        "peak_trainer_rss_over_st": round(ours["peak_rss"]["largest_process_mib"]
                                                          / st["peak_rss"]["largest_process_mib"], 3)}
        if ST_SAME_DUTIES in by_name:
            # Wall only: HF's in-loop figure for that run includes its evaluation and checkpoint.
            ratios[name]["examples_per_s_over_st_same_duties"] = round(
                ours["examples_per_s"] / by_name[ST_SAME_DUTIES]["examples_per_s"], 3)
        if METHODS[name].get("bf16") and ST_BF16 in by_name:  # the same precision
            ratios[name].update(against(ours, by_name[ST_BF16], "st_bf16"))
    return ratios


def against(ours: dict, base: dict, suffix: str) -> dict:
    """Speed ratios and the val difference of one of our rows over a baseline row; the val difference is tested
    paired over the val queries (is it more than this val set's noise?)."""
    from pipeline.report import paired_test

    qids = sorted(base["val_per_query"])
    val_test = paired_test([base["val_per_query"][q] for q in qids], [ours["val_per_query"][q] for q in qids])
    return {f"examples_per_s_over_{suffix}": round(ours["examples_per_s"] / base["examples_per_s"], 3),
            f"loop_examples_per_s_over_{suffix}": round(ours["loop_examples_per_s"] / base["loop_examples_per_s"], 3),
            f"val_ndcg10_minus_{suffix}": round(ours["val_ndcg@10"] - base["val_ndcg@10"], 4),
            f"val_ndcg10_p_vs_{suffix}": round(val_test["p_value"], 4),
            f"val_ndcg10_ci95_vs_{suffix}": [round(x, 4) for x in val_test["ci95"]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "training"),
                    help="Scratch folder: the data (built on first use) and each method's run.")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    ap.add_argument("--seed", type=int, default=SETTINGS["seed"], help="Both trainers' seed (shuffle, dropout).")
    ap.add_argument("--rounds", type=int, default=1, help="Run every method this many times, round r with seed "
                    "SEED + r and the methods' order reversed every other round (timing noise on a shared "
                    "machine, and one seed's batch order, are both larger than the gaps measured); the "
                    "headline figures are medians over rounds, the val difference a mean.")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    SETTINGS["seed"] = args.seed
    work = Path(args.work).resolve()
    source = work / "data"
    if args.child:
        print("RESULT " + json.dumps(child(args.child, work, source)), flush=True)
        return 0
    build_data(source)

    from benchmarks.common import write_result

    results, rounds = [], []
    for r in range(args.rounds):
        seed = args.seed + r
        order = args.methods if r % 2 == 0 else args.methods[::-1]
        by_name = {}
        for method in order:
            proc, peak = run_measured([sys.executable, __file__, "--child", method, "--work", str(work),
                                       "--seed", str(seed)], METHODS[method].get("env", {}))
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
                return 1
            by_name[method] = {**json.loads(line[len("RESULT "):]), "peak_rss": peak, "round": r, "seed": seed}
            print(f"round {r} (seed {seed}) {method}: {by_name[method]['seconds']} s", flush=True)
        rounds.append({"round": r, "seed": seed, "order": order, "ratios": compare(by_name)})
        results += by_name.values()
    print(f"{'round':>5} {'method':22} {'batch':>5} {'steps':>5} {'seconds':>8} {'examples/s':>10} {'in loop':>8} "
          f"{'tree MiB':>9} {'trainer MiB':>11} {'val NDCG@10':>11}")
    for r in results:
        print(f"{r['round']:5d} {r['method']:22} {r['global_batch']:5d} {r['steps']:5d} {r['seconds']:8.1f} "
              f"{r['examples_per_s']:10.2f} {r['loop_examples_per_s']:8.2f} {r['peak_rss']['tree_mib']:9d} "
              f"{r['peak_rss']['largest_process_mib']:11d} {r['val_ndcg@10']:11.4f}")
    for r in rounds:
        for name, ratio in r["ratios"].items():
            print(f"round {r['round']} {name} / sentence-transformers: " + ", ".join(f"{k} {v}" for k, v in ratio.items()))
    for r in results:
        r.pop("val_per_query")  # the paired tests above used them; the file keeps the means
    # Over rounds: median speed ratios (each round's pair ran back to back), mean val difference.
    ratios = {}
    for name, first in rounds[0]["ratios"].items():
        ratios[name] = {}
        for key in first:
            values = [r["ratios"][name][key] for r in rounds]
            if "examples_per_s" in key:
                ratios[name][key] = round(median(values), 3)
            elif key.startswith("val_ndcg10_minus"):
                ratios[name][key] = round(sum(values) / len(values), 4)
    by_method = {m: [r for r in results if r["method"] == m] for m in args.methods}
    headline = {}
    if "ours" in by_method and "sentence-transformers" in by_method:
        ours, st = by_method["ours"], by_method["sentence-transformers"]
        headline = {"ours_examples_per_s": median([r["examples_per_s"] for r in ours]),
                    "ours_loop_examples_per_s": median([r["loop_examples_per_s"] for r in ours]),
                    "st_examples_per_s": median([r["examples_per_s"] for r in st]),
                    "st_loop_examples_per_s": median([r["loop_examples_per_s"] for r in st]),
                    "ours_val_ndcg10": round(sum(r["val_ndcg@10"] for r in ours) / len(ours), 4),
                    "st_val_ndcg10": round(sum(r["val_ndcg@10"] for r in st) / len(st), 4), "rounds": args.rounds}
        for method, key in ((OURS_VALIDATED, "ours_validated_examples_per_s"),
                            (ST_SAME_DUTIES, "st_same_duties_examples_per_s"),
                            ("ours-bf16", "ours_bf16_examples_per_s"), (ST_BF16, "st_bf16_examples_per_s")):
            if method in by_method:
                headline[key] = median([r["examples_per_s"] for r in by_method[method]])
    name = "training" if set(args.methods) == set(DEFAULT_METHODS) else "training-" + "-".join(args.methods)
    extra = f" --seed {args.seed}" if args.seed != DEFAULT_SEED else ""
    if extra:
        name += f"-seed{args.seed}"
    if args.rounds > 1:
        extra += f" --rounds {args.rounds}"
        name += f"-{args.rounds}rounds"
    path = write_result(name, {**headline, "settings": SETTINGS, "data": str(source.relative_to(ROOT))
                               if source.is_relative_to(ROOT) else "--work/data (outside the repository)",
                               "results": results, "rounds": rounds, "ratios": ratios,
                               "command": "benchmarks/training.py --methods " + " ".join(args.methods) + extra})
    print(f"wrote {path.relative_to(ROOT)}")
    if headline:
        print(f"examples/s ours/ST (median of {args.rounds} round(s)): wall {ratios['ours']['examples_per_s_over_st']:.3f}x, "
              f"in loop {ratios['ours']['loop_examples_per_s_over_st']:.3f}x; val NDCG@10 (mean) "
              f"{headline['ours_val_ndcg10']:.4f} vs {headline['st_val_ndcg10']:.4f}")
    if "examples_per_s_over_st_same_duties" in ratios.get(OURS_VALIDATED, {}):
        print(f"examples/s {OURS_VALIDATED}/{ST_SAME_DUTIES}: wall "
              f"{ratios[OURS_VALIDATED]['examples_per_s_over_st_same_duties']:.3f}x")
    if "examples_per_s_over_st_bf16" in ratios.get("ours-bf16", {}):
        bf16 = ratios["ours-bf16"]
        print(f"examples/s ours-bf16/{ST_BF16}: wall {bf16['examples_per_s_over_st_bf16']:.3f}x, in loop "
              f"{bf16['loop_examples_per_s_over_st_bf16']:.3f}x; val NDCG@10 {bf16['val_ndcg10_minus_st_bf16']:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
