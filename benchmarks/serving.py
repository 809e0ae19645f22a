"""Serving: our Ray Serve endpoint vs in-process sentence-transformers vs infinity-emb, same machine.

Embeddings by default; with --rerank the reranking endpoints (see "Reranking" below).

All three serve the packaged all-MiniLM-L6-v2 (ours: its ONNX export, the artifact the pipeline
serves). Load comes from this process (a separate one from the servers): a fixed number of requests,
one SciFact claim each, at concurrency 1, 4, 16 and 64. For in-process encoding, "concurrency c" means
`SentenceTransformer.encode` on batches of c texts (the best an application without a server can
do), and each text's latency is its batch's time.

infinity-emb pins numpy<2 and sentence-transformers<4, which clash with ours, so it runs from its own
virtual environment (made once):

    python3 -m venv benchmarks/work/infinity-venv
    benchmarks/work/infinity-venv/bin/pip install torch==2.13.0 "infinity-emb[server,torch]==0.0.78"

    .venv/bin/python benchmarks/serving.py [--requests 512] [--rounds 3] [--skip-infinity]

Prints throughput (requests/s) and p50/p99 latency per system and concurrency, the ratios
ours/infinity and ours/in-process (throughput; p99 against infinity too), and writes
benchmarks/results/serving.json.

Reranking (--rerank): one request is one SciFact claim with 20 abstracts (each cut to its first 1,200
characters, so no pair exceeds the 512 tokens both servers read and neither truncates), reordered by the same
cross-encoder: all-MiniLM-L6-v2's transformer with a one-label head (weights as saved, untrained: speed does
not depend on them). Ours serves its ONNX export at /v1/rerank, infinity-emb the torch folder at /rerank,
in-process is sentence-transformers' CrossEncoder.predict on one request's pairs. Throughput is in pairs/s;
writes benchmarks/results/serving-rerank.json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
WORK = ROOT / "benchmarks" / "work" / "serving"
INFINITY_VENV = ROOT / "benchmarks" / "work" / "infinity-venv"
CONCURRENCY = (1, 4, 16, 64)
DOCS_PER_QUERY = 20
DOC_CHARS = 1200
RERANK_PAIR_TOKENS = 512


def rerank_requests(n: int) -> list[dict]:
    """n (claim, 20 abstracts) requests, the abstracts rotating through the corpus."""
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line)["text"][:DOC_CHARS] for _, line in zip(range(4000), f)]
    return [{"query": q, "documents": [docs[(i * DOCS_PER_QUERY + j) % len(docs)] for j in range(DOCS_PER_QUERY)]}
            for i, q in enumerate(claims(n))]


def claims(n: int) -> list[str]:
    with open(SCIFACT / "queries.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return [texts[i % len(texts)] for i in range(n)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def embedding_body(text: str, model: str) -> dict:
    return {"input": [text], "model": model}


def embedding_answered(reply) -> bool:
    return len(reply["data"][0]["embedding"]) == 384


def rerank_answered(reply) -> bool:
    return len(reply["results"]) == DOCS_PER_QUERY and {"index", "relevance_score"} <= set(reply["results"][0])


def load(url: str, bodies: list[dict], answered, concurrency: int, pairs_per_request: int = 1,
         warm_up: int = 8) -> dict:
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=concurrency, pool_maxsize=concurrency)
    session.mount("http://", adapter)

    def one(body: dict) -> float:
        t0 = time.perf_counter()
        r = session.post(url, json=body, timeout=300)
        r.raise_for_status()
        assert answered(r.json()), r.text[:300]
        return time.perf_counter() - t0

    for body in bodies[:warm_up]:
        one(body)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, bodies))
    return summarise(latencies, time.perf_counter() - t0, pairs_per_request)


def summarise(latencies: list[float], wall: float, pairs_per_request: int = 1) -> dict:
    out = {"requests_per_s": round(len(latencies) / wall, 2)}
    if pairs_per_request > 1:
        out["pairs_per_s"] = round(len(latencies) * pairs_per_request / wall, 2)
    return {**out, "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 2),
            "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 2)}


def in_process_rerank(bodies: list[dict], concurrency: int, model) -> dict:
    """CrossEncoder.predict on the pairs of `concurrency` requests at once; each request's latency is that call's."""
    def pairs(batch):
        return [(b["query"], d) for b in batch for d in b["documents"]]

    model.predict(pairs(bodies[:2]))  # warm-up
    latencies, t0 = [], time.perf_counter()
    for i in range(0, len(bodies), concurrency):
        batch = bodies[i:i + concurrency]
        b0 = time.perf_counter()
        model.predict(pairs(batch), batch_size=32)
        latencies += [time.perf_counter() - b0] * len(batch)
    return summarise(latencies, time.perf_counter() - t0, DOCS_PER_QUERY)


def in_process(model_path: str, texts: list[str], concurrency: int, model=None) -> dict:
    model.encode(texts[:8])  # warm-up
    latencies, t0 = [], time.perf_counter()
    for i in range(0, len(texts), concurrency):
        b0 = time.perf_counter()
        model.encode(texts[i:i + concurrency], batch_size=concurrency, normalize_embeddings=True)
        latencies += [time.perf_counter() - b0] * len(texts[i:i + concurrency])
    return summarise(latencies, time.perf_counter() - t0)


def start_ours(export_dir: Path, port: int, overrides: list[str], env: dict[str, str],
               reranker_dir: Path | None = None) -> subprocess.Popen:
    settings = [f"serve.port={port}", "serve.placement.cpus_per_replica=2", "serve.max_queued_requests=256", *overrides]
    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "from pipeline.config import load_config\nfrom pipeline.ray_runtime import ensure_ray\nfrom serve import app\n"
            "cfg = load_config(None, %r)\n"
            "ensure_ray(num_cpus=2, serve_ingress=cfg.ray.serve_ingress)\n"
            "app.start(%r, 'minilm', cfg.serve, reranker_dir=%r)\nprint('ready', flush=True)\n"
            "while True: time.sleep(60)\n") % (str(ROOT), settings, str(export_dir),
                                                reranker_dir and str(reranker_dir))
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True, env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_infinity(model_path: str, port: int, served_name: str = "minilm") -> subprocess.Popen:
    exe = INFINITY_VENV / "bin" / "infinity_emb"
    if not exe.exists():
        raise SystemExit(f"{exe} is missing: make its venv first (see this script's docstring) or --skip-infinity")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    return subprocess.Popen([str(exe), "v2", "--model-id", model_path, "--served-model-name", served_name,
                             "--port", str(port), "--host", "127.0.0.1", "--engine", "torch", "--device", "cpu",
                             "--batch-size", "32", "--no-bettertransformer"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def progress(system: str, concurrency: int, row: dict) -> dict:
    """Print one measured level as it finishes (a round of rerank levels takes many minutes)."""
    speed = f"{row['pairs_per_s']:.1f} pairs/s" if "pairs_per_s" in row else f"{row['requests_per_s']:.1f} req/s"
    print(f"  {system} c={concurrency}: {speed}, p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms", flush=True)
    return row


def print_table(table: dict, title: str) -> None:
    print(f"-- {title}")
    print(f"{'system':12} {'conc':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, rows in table.items():
        for c, r in rows.items():
            print(f"{name:12} {c:5d} {r['requests_per_s']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f}", flush=True)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, help="Requests per concurrency level (default 512; --rerank: "
                    "max(level, 16)).")
    ap.add_argument("--rerank", action="store_true", help="Measure the reranking endpoints instead (see above).")
    ap.add_argument("--skip-infinity", action="store_true")
    ap.add_argument("--rounds", type=int, default=1, help="Measure every system this many times, the order of the "
                    "servers alternating per round; the table holds medians, ratios are medians of per-round ratios.")
    ap.add_argument("--set", action="append", default=[], dest="overrides",
                    help="serve.FIELD=VALUE (or ray.serve_ingress=python) for ours.")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE in our server's environment (Ray's).")
    ap.add_argument("--concurrency", type=int, action="append", help="Only these levels (default: 1, 4, 16, 64).")
    args = ap.parse_args()
    levels = args.concurrency or CONCURRENCY
    env = dict(item.split("=", 1) for item in args.env)

    from benchmarks.common import write_result
    from pipeline.embedders import load_model
    from pipeline.export import export_onnx
    from pipeline.models import resolve_embedder

    model_path = resolve_embedder("minilm")
    export_dir = WORK / "onnx"
    if not (export_dir / "export.json").exists():
        export_onnx(model_path, export_dir, opset=17)
    # A rerank request is 20 pairs of ~300 tokens (~seconds on 2 cores): a fixed count per level would take
    # hours, so each level gets max(level, --requests) requests, enough to keep every worker busy.
    n = args.requests or (16 if args.rerank else 512)
    count = (lambda c: max(c, n)) if args.rerank else (lambda c: n)

    import torch

    torch.set_num_threads(2)
    if args.rerank:
        from sentence_transformers import CrossEncoder

        from pipeline.crossencoder import load_pair_model, save_reranker
        from pipeline.export import export_reranker_onnx

        reranker_dir, reranker_export = WORK / "reranker", WORK / "reranker-onnx"
        if not (reranker_export / "export.json").exists():
            save_reranker(*load_pair_model(model_path), reranker_dir, RERANK_PAIR_TOKENS)
            export_reranker_onnx(reranker_dir, reranker_export, opset=17)
        bodies = rerank_requests(max(count(c) for c in levels))
        infinity_bodies = [{**b, "model": "reranker"} for b in bodies]
        cross = CrossEncoder(str(reranker_dir), device="cpu", max_length=RERANK_PAIR_TOKENS)
        baseline = lambda c: in_process_rerank(bodies[:count(c)], c, cross)  # noqa: E731
        servers = [("ours", lambda port: start_ours(export_dir, port, args.overrides, env, reranker_export),
                    "/v1/rerank", "/health", bodies)]
        if not args.skip_infinity:
            servers.append(("infinity", lambda port: start_infinity(str(reranker_dir), port, "reranker"), "/rerank",
                            "/health", infinity_bodies))
        answered, per_request = rerank_answered, DOCS_PER_QUERY
    else:
        texts = claims(n)
        bodies = [embedding_body(t, "minilm") for t in texts]
        st = load_model(model_path, device="cpu")
        baseline = lambda c: in_process(model_path, texts, c, st)  # noqa: E731
        servers = [("ours", lambda port: start_ours(export_dir, port, args.overrides, env), "/v1/embeddings",
                    "/health", bodies)]
        if not args.skip_infinity:
            servers.append(("infinity", lambda port: start_infinity(model_path, port), "/embeddings", "/health",
                            bodies))
        answered, per_request = embedding_answered, 1
    speed = "pairs_per_s" if args.rerank else "requests_per_s"
    rounds = []
    for r in range(args.rounds):
        table = {"in-process": {c: progress("in-process", c, baseline(c)) for c in levels}}
        # This VM's speed drifts within minutes: alternate which server goes first.
        for name, start, route, health, requests_of in (servers if r % 2 == 0 else servers[::-1]):
            port = free_port()
            proc = start(port)
            try:
                wait_ready(f"http://127.0.0.1:{port}{health}", proc)
                url = f"http://127.0.0.1:{port}{route}"
                table[name] = {c: progress(name, c, load(url, requests_of[:count(c)], answered, c, per_request,
                                                         warm_up=2 if args.rerank else 8))
                               for c in levels}
            finally:
                stop(proc)
        rounds.append(table)
        print_table(table, f"round {r + 1} of {args.rounds}")

    # Per system and level, the median of each figure over the rounds; ratios are taken within a round.
    table = {name: {c: {k: round(statistics.median(t[name][c][k] for t in rounds), 2) for k in rounds[0][name][c]}
                    for c in levels} for name in rounds[0]}
    if args.rounds > 1:
        print_table(table, f"median over {args.rounds} rounds")
    ratios = {}
    for other in ("infinity", "in-process"):
        if other in table:
            ratios[f"ours/{other}"] = {c: round(statistics.median(t["ours"][c][speed] / t[other][c][speed]
                                                                  for t in rounds), 3) for c in levels}
            print(f"throughput ours/{other}: " + ", ".join(f"c={c}: {v:.2f}" for c, v in ratios[f"ours/{other}"].items()))
    extra = {}
    if "infinity" in table:
        extra["ours_over_infinity"] = ratios["ours/infinity"]
        extra["p99_ours_over_infinity"] = {c: round(statistics.median(t["ours"][c]["p99_ms"] / t["infinity"][c]["p99_ms"]
                                                                      for t in rounds), 3) for c in levels}
        print("p99 ours/infinity: " + ", ".join(f"c={c}: {v:.2f}" for c, v in extra["p99_ours_over_infinity"].items()))
    command = "benchmarks/serving.py" + (" --rerank" if args.rerank else "") + \
        (f" --rounds {args.rounds}" if args.rounds > 1 else "") + (" --skip-infinity" if args.skip_infinity else "")
    if args.rerank:
        extra.update(docs_per_query=DOCS_PER_QUERY, doc_chars=DOC_CHARS, max_pair_tokens=RERANK_PAIR_TOKENS,
                     throughput="pairs_per_s")
    path = write_result("serving-rerank" if args.rerank else "serving",
                        {"requests": {c: count(c) for c in levels}, "rounds": args.rounds, "table": table,
                                    "per_round": rounds if args.rounds > 1 else None, "ratios": ratios, **extra,
                                    "ours_settings": args.overrides, "ours_env": env, "command": command})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
