"""SDG: our stage's worker vs a plain per-document `model.generate` loop, same model, chunks and machine.

Ours: `QueryGenerator.process` (the Ray actor's code) on one shard: chunks in batches, one prefill per
prompt shared by its n samples. Baseline: for each chunk and each of its n queries, one
`model.generate` call on the same prompt (what a first script does). Same LLM (packaged SmolLM2-135M),
same prompts, sampling settings and reply cap, 2 threads, each in a fresh child process (model load
excluded from the time; peak RSS of the process). Replies/s counts every generated reply (before the
shape filters, which are the same for both).

    .venv/bin/python benchmarks/sdg.py [--chunks 24] [--n 3]

Prints replies/s for both, the ratio, peak memory, and the projected wall time for 100K QA pairs on
this machine with our stage (2 actors of 1 thread each, the cpu-small profile, scale linearly).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"


def chunks_file(n: int, folder: Path) -> Path:
    """The first n SciFact abstracts as chunks (title + text, cut to ~200 words)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.corpus import CHUNK_SCHEMA

    rows = []
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            text = " ".join(d["text"].split()[:200])
            rows.append({"chunk_id": f"{d['_id']}#0", "doc_id": str(d["_id"]), "title": d.get("title", ""),
                         "text": text, "chunk_index": 0, "n_tokens": len(text.split())})
            if len(rows) == n:
                break
    path = folder / "chunks.parquet"
    pq.write_table(pa.Table.from_pylist(rows, CHUNK_SCHEMA), path)
    return path


def sdg_settings(n: int):
    from pipeline.config import load_config

    cfg = load_config(None, ["sdg.query_types.question=0", "sdg.query_types.keyword=0", f"sdg.query_types.claim={n}",
                             "sdg.placement.cpus_per_actor=2"])
    return cfg.sdg


def run_ours(path: Path, n_chunks: int, n: int, work: Path) -> int:
    from pipeline.sdg import QueryGenerator

    gen = QueryGenerator(str(path), str(work / "shards"), sdg_settings(n), seed=1)
    t0 = time.perf_counter()
    gen.process({"shard_id": 0, "start": 0, "stop": n_chunks})
    return time.perf_counter() - t0


def run_baseline(path: Path, n_chunks: int, n: int, work: Path) -> float:
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.beir import passage_text
    from pipeline.llm import prompt_messages
    from pipeline.models import resolve_llm
    from pipeline.sdg import load_prompts

    torch.set_num_threads(2)
    torch.manual_seed(1)
    sdg = sdg_settings(n)
    spec = load_prompts(None, {"claim": n})["claim"]
    llm = resolve_llm("smollm2")
    tok = AutoTokenizer.from_pretrained(llm)
    model = AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32).eval()
    chunks = pq.read_table(path).to_pylist()[:n_chunks]
    t0 = time.perf_counter()
    for c in chunks:
        prompt = tok.apply_chat_template(prompt_messages(passage_text(c["title"], c["text"]), spec), tokenize=False,
                                         add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt")
        for _ in range(n):
            with torch.inference_mode():
                model.generate(**ids, max_new_tokens=sdg.max_new_tokens, do_sample=True,
                               temperature=sdg.temperature, top_p=0.9, stop_strings=["\n"], tokenizer=tok,
                               pad_token_id=tok.eos_token_id)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=24)
    ap.add_argument("--n", type=int, default=3, help="Queries per chunk.")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            path = chunks_file(args.chunks, Path(tmp))
            run = run_ours if args.child == "ours" else run_baseline
            seconds = run(path, args.chunks, args.n, Path(tmp))
        print("RESULT " + json.dumps({"method": args.child, "seconds": round(seconds, 2),
                                      "replies": args.chunks * args.n,
                                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
        return 0

    from benchmarks.common import write_result

    results = {}
    for method in ("ours", "per-document generate"):
        proc = subprocess.run([sys.executable, __file__, "--child", "ours" if method == "ours" else "baseline",
                               "--chunks", str(args.chunks), "--n", str(args.n)], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            return 1
        r = json.loads(line[len("RESULT "):])
        r["replies_per_s"] = round(r["replies"] / r["seconds"], 3)
        results[method] = r
        print(f"{method:24} {r['replies']} replies in {r['seconds']:.1f}s = {r['replies_per_s']:.2f}/s, "
              f"peak RSS {r['peak_rss_mib']} MiB")
    ours, base = results["ours"], results["per-document generate"]
    ratio = round(ours["replies_per_s"] / base["replies_per_s"], 2)
    # The stage runs two 1-thread actors on this 2-core machine; one 2-thread worker is measured here, so
    # the projection assumes the same machine-wide rate.
    hours = 100_000 / ours["replies_per_s"] / 3600
    print(f"replies/s ours / per-document generate: {ratio}")
    print(f"projected wall time for 100K QA pairs with our stage on this machine: {hours:.1f} h "
          f"(per-document generate: {100_000 / base['replies_per_s'] / 3600:.1f} h)")
    path = write_result("sdg", {"chunks": args.chunks, "queries_per_chunk": args.n, "results": results,
                                "ratio_replies_per_s": ratio, "projected_hours_100k": round(hours, 1),
                                "command": f"benchmarks/sdg.py --chunks {args.chunks} --n {args.n}"})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
