"""Scale: 100K QA pairs through SDG, prep and train, to show that our pipeline is never the bottleneck.

A real LLM on this CPU writes ~2.4 queries/s (100K would take ~11 h); a GPU fleet writes hundreds per
second. So the LLM here is a LOAD GENERATOR: an OpenAI-compatible server on 127.0.0.1 that answers at
once with queries made of the chunk's own words (never used for quality; its queries train nothing
worth keeping). What is measured is everything around the LLM, through the real CLI (`python -m
pipeline.cli sdg|prep|train`, an embedded Ray, the `openai` backend's HTTP client):

- SDG's ceiling: queries/s our orchestration writes when the LLM costs nothing (the rate a real LLM
  fleet can be fed at), at 10K and 100K pairs; driver and worker peak RSS at both sizes.
- Kill -9 of the whole SDG process group at ~60% of 100K, then a rerun: every finished shard kept
  untouched, only the missing ones written, 100K unique qa_ids in the final table, nothing lost.
- Prep over the 100K queries and the whole corpus (HNSW index): time and memory.
- Train: a bounded number of steps (`train.max_steps`) on the 100K-query split: examples/s and memory.

The corpus is real text that installs with the project: docstrings of the standard library, then of
numpy, pandas, pyarrow, torch, transformers and ray (parsed with `ast`, files in sorted order, test
packages skipped), one chunk per paragraph of 12-80 words, exact duplicates dropped; the versions are
recorded (other versions give other text).

    .venv/bin/python benchmarks/scale.py [--qa-pairs 100000] [--small 10000] [--kill-at 0.6] [--train-steps 40]

Writes benchmarks/results/scale.json; the run folders stay in benchmarks/work/scale/.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "benchmarks" / "work" / "scale"
LOAD_MODEL = "instant-load-generator"  # the served model's name: says what it is in every manifest
QUERY_TYPES = {"question": 3, "keyword": 2}  # 5 queries per chunk: 100K pairs from 20K chunks


# ---------------------------------------------------------------- the corpus

# Whose docstrings make the corpus, in this order: the standard library, then packages the project installs.
SOURCES = ("stdlib", "numpy", "pandas", "pyarrow", "torch", "transformers", "ray")


def source_files(name: str) -> tuple[Path, list[Path]]:
    import importlib.util

    if name == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
    else:
        root = Path(importlib.util.find_spec(name).submodule_search_locations[0])
    skip = {"site-packages", "dist-packages", "test", "tests", "testing", "idlelib"}
    return root, [p for p in sorted(root.rglob("*.py")) if not skip & set(p.relative_to(root).parts)]


def docstring_chunks(n: int) -> tuple[list[dict], dict]:
    """n chunks of docstrings (SOURCES in order, files sorted): one per paragraph of 12-80 words (longer ones
    cut), exact duplicates and paragraphs with fewer than 6 distinct identifiers dropped."""
    chunks, seen, used = [], set(), {}
    for source in SOURCES:
        root, files = source_files(source)
        used[source] = version_of(source)
        for path in files:
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            module = ".".join((source, *path.relative_to(root).parts)).removesuffix(".py").removesuffix(".__init__")
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                doc = ast.get_docstring(node) or ""
                name = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                for para in doc.split("\n\n"):
                    words = para.split()
                    text = " ".join(words[:80])
                    if len(words) < 12 or text in seen or len(set(identifiers(text))) < 6:
                        continue
                    seen.add(text)
                    chunks.append({"id": f"c{len(chunks):06d}", "doc_id": module, "title": name, "text": text})
                    if len(chunks) == n:
                        return chunks, used
    raise SystemExit(f"{', '.join(SOURCES)} gave only {len(chunks)} chunks; ask for fewer QA pairs")


def version_of(source: str) -> str:
    if source == "stdlib":
        return sys.version.split()[0]
    from importlib.metadata import version

    return version(source)


def identifiers(text: str) -> list[str]:
    return re.findall(r"[A-Za-z_][A-Za-z0-9_.]{3,}[A-Za-z0-9_]", text)


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- the instant LLM (a load generator)

def instant_replies(prompt: str, n: int) -> list[str]:
    """n distinct queries that pass SDG's filters, made of the chunk's own words (seeded by the text, so a
    rerun gets the same replies): a question, or a keyword query when the prompt asks for one."""
    from pipeline.sdg import repetitive

    text = prompt[len("Text: "):prompt.rfind("\n\n")] if prompt.startswith("Text: ") else prompt
    keyword = "keyword" in prompt[prompt.rfind("\n\n"):]
    words = list(dict.fromkeys(identifiers(text))) or ["python", "module", "function"]
    rng = random.Random(zlib.crc32(text.encode()))
    replies: list[str] = []
    for attempt in range(50 * n):  # three words at a time; skip picks that repeat a word (SDG drops those)
        a, b, c = rng.sample(words * 3 if len(words) < 3 else words, 3)
        query = f"{a} {b} {c}" if keyword else f"What does {a} do with {b} and {c}?"
        if not repetitive(query) and query.lower() not in (r.lower() for r in replies):
            replies.append(query)
            if len(replies) == n:
                break
    return replies + [f"{words[0]} {i}" if keyword else f"What is {words[0]} number {i}?"
                      for i in range(n - len(replies))]


class InstantLLM(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the backend's pooled connections are reused

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": LOAD_MODEL, "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        replies = instant_replies(prompt, int(body.get("n", 1)))
        self._send({"object": "chat.completion", "model": body["model"],
                    "choices": [{"index": i, "message": {"role": "assistant", "content": r}, "finish_reason": "stop"}
                                for i, r in enumerate(replies)],
                    "usage": {"prompt_tokens": len(prompt.split()),
                              "completion_tokens": sum(len(r.split()) for r in replies)}})

    def _send(self, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def serve_instant_llm(port: int) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", port), InstantLLM)
    server.daemon_threads = True
    server.serve_forever()


def start_instant_llm() -> tuple[subprocess.Popen, int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "--instant-llm-server", str(port)])
    import requests

    for _ in range(100):
        try:
            requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).raise_for_status()
            return proc, port
        except requests.RequestException:
            time.sleep(0.1)
    raise SystemExit("the instant LLM server did not start")


# ---------------------------------------------------------------- running the CLI, watching memory

class TreeWatch(threading.Thread):
    """Samples the RSS of a process and all its descendants every 0.2 s: the driver (the CLI process),
    Ray's workers (processes titled `ray::...`: SDG and encoding actors, Ray Train workers) and the rest
    of Ray (GCS, raylet, agents)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stop = pid, threading.Event()
        self.peak = {"driver_mib": 0.0, "worker_mib": 0.0, "ray_system_mib": 0.0}
        self.descendants: dict[int, object] = {}

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop.wait(0.2):
            try:
                driver = root.memory_info().rss
                children = root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            worker, system = 0, 0
            for child in children:
                self.descendants[child.pid] = child
                try:
                    rss, title = child.memory_info().rss, " ".join(child.cmdline()[:1])
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if title.startswith("ray::"):
                    worker = max(worker, rss)
                else:
                    system += rss
            for key, value in (("driver_mib", driver), ("worker_mib", worker), ("ray_system_mib", system)):
                self.peak[key] = max(self.peak[key], round(value / 2**20, 1))


def cli(command: str, run_dir: Path, settings: list[str], log: Path, kill_when=None) -> dict:
    """`python -m pipeline.cli COMMAND --out RUN_DIR --set ...` in its own process group. With kill_when,
    the whole group (and any descendant that left it) gets SIGKILL once kill_when() is true."""
    args = [sys.executable, "-m", "pipeline.cli", command, "--out", str(run_dir)]
    for s in settings:
        args += ["--set", s]
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(args)}\n")
        out.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        watch = TreeWatch(proc.pid)
        watch.start()
        killed, survivors = None, 0
        while proc.poll() is None:
            if kill_when is not None and kill_when():
                killed = time.perf_counter() - t0
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                time.sleep(1.0)
                for child in list(watch.descendants.values()):  # Ray daemons that started their own session
                    if child.is_running():
                        survivors += 1
                        child.kill()
                break
            time.sleep(0.1)
        rc = proc.wait()
        watch.stop.set()
        watch.join()
    if killed is None and rc != 0:
        raise SystemExit(f"`{command}` failed (exit {rc}); see {log}")
    return {"seconds": round(time.perf_counter() - t0, 1), "exit": rc, "peak_rss": watch.peak,
            "killed_at_s": None if killed is None else round(killed, 1),
            "left_the_group": survivors}


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


def stage_seconds(log: Path, stage: str) -> float | None:
    """The stage's own time ('[prep] completed in 123.4s'), without the CLI's start-up."""
    found = re.findall(rf"\[{stage}\] completed in ([0-9.]+)s", log.read_text())
    return float(found[-1]) if found else None


def settings_for(corpus: Path, port: int, train_steps: int) -> list[str]:
    return [f"corpus.path={corpus}", "corpus.format=jsonl", "corpus.prechunked=true",
            "sdg.backend=openai", f"sdg.llm={LOAD_MODEL}", f"sdg.server.base_url=http://127.0.0.1:{port}/v1",
            *(f"sdg.query_types.{t}={n}" for t, n in QUERY_TYPES.items()),
            "prep.index=hnsw", "prep.placement.num_actors=2", f"prep.eval_set_root={WORK / 'eval_sets'}",
            "train.epochs=1", f"train.max_steps={train_steps}", "train.placement.cpus_per_worker=2"]


# ---------------------------------------------------------------- the load run

def sdg_run(name: str, chunks: list[dict], port: int, train_steps: int, log: Path, kill_at: float | None) -> dict:
    """corpus + sdg on `chunks`; with kill_at, SIGKILL the SDG group once that share of shards is written,
    then rerun and check the resume."""
    import pyarrow.parquet as pq

    run_dir = WORK / name
    settings = settings_for(write_jsonl(chunks, WORK / f"{name}.jsonl"), port, train_steps)
    cli("corpus", run_dir, settings, log)
    shard_dir = run_dir / "sdg" / "shards"
    from pipeline.config import load_config

    shard_size = load_config(None, settings).sdg.shard_size
    n_shards = -(-len(chunks) // shard_size)
    out = {"chunks": len(chunks), "shards": n_shards}

    timeline: dict[str, float] = {}

    def shards_done() -> int:
        return len(list(shard_dir.glob("shard-*.parquet"))) if shard_dir.exists() else 0

    def reached_kill_point() -> bool:
        done = shards_done()
        now = time.perf_counter()
        if done and "first" not in timeline:
            timeline.update(first=now, first_done=done)
        if done >= kill_at * n_shards:
            timeline.update(kill=now, kill_done=done)
            return True
        return False

    first = cli("sdg", run_dir, settings, log, kill_when=reached_kill_point if kill_at else None)
    out["sdg"] = first
    if kill_at:
        kept = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("shard-*.parquet")}
        queries_kept = sum(json.loads(shard_dir.joinpath(n).with_suffix(".json").read_text())["queries"] for n in kept)
        steady = (timeline["kill_done"] - timeline["first_done"]) * shard_size * sum(QUERY_TYPES.values())
        out["killed"] = {"at_shards": len(kept), "of": n_shards, "queries_in_kept_shards": queries_kept,
                         "steady_queries_per_s": round(steady / (timeline["kill"] - timeline["first"]), 1),
                         **first}
        out["sdg"] = resumed = cli("sdg", run_dir, settings, log)
        after = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("shard-*.parquet")}
        out["resume"] = {"kept_shards_untouched": sum(after.get(n) == t for n, t in kept.items()),
                         "kept_shards": len(kept), "shards_written_by_rerun": len(set(after) - set(kept)),
                         "manifest_resumed_shards": manifest(run_dir, "sdg")["counts"]["resumed_shards"],
                         **resumed}
    counts = manifest(run_dir, "sdg")["counts"]
    qa = pq.read_table(run_dir / "sdg" / "qa.parquet", columns=["qa_id"]).column("qa_id").to_pylist()
    chunk_ids = pq.read_table(run_dir / "corpus" / "chunks.parquet", columns=["chunk_id"]).column("chunk_id").to_pylist()
    expected = {f"{c}::{t}{j}" for c in chunk_ids for t, n in QUERY_TYPES.items() for j in range(n)}
    filtered = sum(counts.get(k, 0) for k in ("too_short", "too_long", "wrong_shape", "repetitive",
                                               "copied_example", "leaked_example", "duplicate", "malformed"))
    missing = len(expected - set(qa))
    out.update(qa_pairs=len(qa), unique_qa_ids=len(set(qa)), duplicated=len(qa) - len(set(qa)),
               dropped_by_sdg_filters=filtered, lost=missing - filtered, unexpected_ids=len(set(qa) - expected),
               manifest_queries_per_s=counts.get("queries_per_s"), generated_by=counts.get("generated_by"))
    out["settings"] = settings
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qa-pairs", type=int, default=100_000)
    ap.add_argument("--small", type=int, default=10_000, help="The smaller run, for driver memory growth.")
    ap.add_argument("--kill-at", type=float, default=0.6, help="Share of SDG shards written before kill -9.")
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--instant-llm-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.instant_llm_server:
        return serve_instant_llm(args.instant_llm_server)

    import shutil

    per_chunk = sum(QUERY_TYPES.values())
    shutil.rmtree(WORK, ignore_errors=True)  # a fresh run: the resume check needs an empty run folder
    WORK.mkdir(parents=True)
    log = WORK / "scale.log"
    t0 = time.perf_counter()
    chunks, sources = docstring_chunks(-(-args.qa_pairs // per_chunk))
    corpus_info = {"source": "docstrings", "versions": sources, "chunks": len(chunks),
                   "words_per_chunk": round(sum(len(c["text"].split()) for c in chunks) / len(chunks), 1),
                   "modules": len({c["doc_id"] for c in chunks}), "build_seconds": round(time.perf_counter() - t0, 1)}
    print(f"corpus: {corpus_info}", flush=True)
    server, port = start_instant_llm()
    try:
        small = sdg_run("run-10k", chunks[:-(-args.small // per_chunk)], port, args.train_steps, log, kill_at=None)
        print(f"10K: {small['qa_pairs']} pairs, {small['manifest_queries_per_s']} queries/s, "
              f"driver {small['sdg']['peak_rss']['driver_mib']} MiB", flush=True)
        big = sdg_run("run-100k", chunks, port, args.train_steps, log, kill_at=args.kill_at)
        print(f"100K: {big['qa_pairs']} pairs, lost {big['lost']}, duplicated {big['duplicated']}, "
              f"resume {big['resume']['kept_shards_untouched']}/{big['resume']['kept_shards']} kept", flush=True)
    finally:
        server.terminate()
    run_dir = WORK / "run-100k"
    settings = big["settings"]
    prep = cli("prep", run_dir, settings, log)
    prep_counts = manifest(run_dir, "prep")["counts"]
    prep.update(stage_seconds=stage_seconds(log, "prep"), queries=prep_counts["queries"],
                rows={s: prep_counts[f"{s}_rows"] for s in ("train", "val", "test")},
                index=re.findall(r"\[prep\] search index: (.*)", log.read_text())[-1])
    print(f"prep: {prep['stage_seconds']} s, {prep['rows']}", flush=True)
    train = cli("train", run_dir, settings, log)
    steps = [json.loads(x) for x in (run_dir / "train" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r and "event" not in r]
    rates = sorted(r["examples_per_s"] for r in steps[1:])  # the first step pays for warm-up
    train.update(stage_seconds=stage_seconds(log, "train"), steps=len(steps),
                 median_examples_per_s=rates[len(rates) // 2] if rates else None,
                 train_rows=manifest(run_dir, "train")["counts"]["train_rows"])
    print(f"train: {train['steps']} steps, {train['median_examples_per_s']} examples/s", flush=True)

    driver = {"10k": small["sdg"]["peak_rss"]["driver_mib"],
              "100k": max(big["killed"]["peak_rss"]["driver_mib"], big["sdg"]["peak_rss"]["driver_mib"])}
    worker = {"10k": small["sdg"]["peak_rss"]["worker_mib"],
              "100k": max(big["killed"]["peak_rss"]["worker_mib"], big["sdg"]["peak_rss"]["worker_mib"])}
    ceiling = big["killed"]["steady_queries_per_s"]
    from benchmarks.common import write_result

    result = {
        "command": " ".join(["benchmarks/scale.py", *sys.argv[1:]]),
        "llm": f"{LOAD_MODEL}: an OpenAI-compatible server on 127.0.0.1 answering at once (load generator, "
               "not a model; its queries are the chunk's words)",
        "corpus": corpus_info,
        "qa_pairs": big["qa_pairs"], "lost": big["lost"], "duplicated": big["duplicated"],
        "sdg_ceiling_queries_per_s": ceiling,
        "driver_peak_rss_mib": driver, "driver_growth_10k_to_100k": round(driver["100k"] / driver["10k"], 3),
        "worker_peak_rss_mib": worker,
        "prep_seconds": prep["stage_seconds"],
        "train_examples_per_s": train["median_examples_per_s"],
        "runs": {"10k": small, "100k": big}, "prep": prep, "train": train,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    path = write_result("scale", result)
    print(f"\nSDG ceiling {ceiling} queries/s (instant LLM); driver peak {driver['10k']} -> {driver['100k']} MiB "
          f"(x{result['driver_growth_10k_to_100k']}); lost {big['lost']}, duplicated {big['duplicated']}; "
          f"prep {prep['stage_seconds']} s; train {train['median_examples_per_s']} examples/s -> {path}")


if __name__ == "__main__":
    main()
