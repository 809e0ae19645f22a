"""All six stages on ~20 real documents with the packaged models, through the CLI, on an embedded Ray."""
import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.rundir import LAYOUT
from tests.conftest import free_port

SETTINGS = ["corpus.sample_docs=20", "corpus.chunk_tokens=256", "corpus.chunk_overlap=16",
            "sdg.query_types.question=1", "sdg.query_types.keyword=1", "sdg.shard_size=8", "sdg.placement.num_actors=2", "train.queries_per_worker=8",
            "train.max_passage_tokens=256", "train.epochs=1", "train.negatives_per_query=2", "export.parity_texts=50"]


def retrofit(*args, timeout=1500):
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"retrofit {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    eval_sets = tmp_path_factory.mktemp("eval_sets")
    overrides = [a for s in SETTINGS + [f"serve.port={free_port()}", f"prep.eval_set_root={eval_sets}"]
                 for a in ("--set", s)]
    output = retrofit("run", "--corpus", "sample", "--out", str(run), *overrides)
    return run, output, overrides


def test_the_console_shows_progress_not_library_chatter(run_dir):
    _, output, _ = run_dir
    assert "[sdg] " in output and "[train] " in output and "[serve] " in output
    for chatter in ("DEBUG bm25s", "Connecting to existing Serve app", "Started Serve in namespace",
                    "ray_remote_args", "Progress bars disabled", "Setting accelerator to CPU"):
        assert chatter not in output, chatter


def test_the_console_prints_the_metrics_table_once_with_whole_headers(run_dir):
    _, output, _ = run_dir
    lines = output.splitlines()
    headers = [line for line in lines if line.startswith("metric ")]
    assert len(headers) == 1, headers
    assert "bm25+base RRF (reference)" in headers[0] and "fine-tuned - base" in headers[0]
    for i, line in enumerate(lines):  # a "Largest wins/losses" heading always has rows under it
        if line.startswith("Largest "):
            assert i + 1 < len(lines) and lines[i + 1].startswith("  "), line


def manifest(run, stage):
    return json.loads((run / stage / "manifest.json").read_text())


def test_every_stage_completed_with_its_artifacts(run_dir):
    run, output, _ = run_dir
    for stage in ("corpus", "sdg", "prep", "train", "merge", "rerank", "eval", "export"):
        m = manifest(run, stage)
        assert m["status"] == "completed", stage
        assert m["config_hash"] and m["versions"]["torch"]
        assert m["timings"]["total"] > 0 or stage == "rerank"  # off by default: it only records that
    assert manifest(run, "corpus")["counts"]["documents"] == 20
    assert manifest(run, "rerank")["counts"] == {"enabled": False, "shipped": False}  # off by default
    for path, what in LAYOUT.items():  # the docs' run-folder reference: every unconditional path is written
        if not what.startswith("when "):
            assert (run / path).exists(), path
    sdg_counts = manifest(run, "sdg")["counts"]
    assert sdg_counts["generated_by"] == {"transformers:smollm2": sdg_counts["shards"]}

    chunks = pq.read_table(run / "corpus" / "chunks.parquet")
    qa = pq.read_table(run / "sdg" / "qa.parquet")
    assert chunks.num_rows >= 20 and qa.num_rows >= chunks.num_rows // 2  # most chunks keep a query
    assert set(qa.column("chunk_id").to_pylist()) <= set(chunks.column("chunk_id").to_pylist())
    assert len(set(qa.column("qa_id").to_pylist())) == qa.num_rows

    splits = {s: pq.read_table(run / "prep" / f"{s}.parquet").to_pylist() for s in ("train", "val", "test")}
    assert all(splits[s] for s in splits)
    docs = {s: {r["positive_id"].split("#")[0] for r in rows} for s, rows in splits.items()}
    assert docs["train"].isdisjoint(docs["test"]) and docs["train"].isdisjoint(docs["val"])
    train_negs = {n.split("#")[0] for r in splits["train"] for n in r["negative_ids"]}
    assert train_negs.isdisjoint(docs["test"])  # no test chunk in any training row
    assert any(r["negative_ids"] for r in splits["train"])
    beir = run / "prep" / "beir_test"
    assert sum(1 for _ in open(beir / "queries.jsonl")) == len(splits["test"])

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(run / "train" / "model"), device="cpu")
    assert (run / "train" / "model" / "model.safetensors").exists()
    assert model.encode(["hello"]).shape == (1, 384)
    assert manifest(run, "train")["counts"]["steps"] >= 1

    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert {"base", "fine-tuned", "delta"} <= set(metrics)
    assert np.isclose(metrics["delta"]["ndcg@10"], metrics["fine-tuned"]["ndcg@10"] - metrics["base"]["ndcg@10"],
                      atol=1e-4)
    assert "ndcg@10" in output and "fine-tuned" in output  # the table was printed
    sig = metrics["comparison"]["fine-tuned"]["ndcg@10"]
    assert 0 < sig["p_value"] <= 1 and sig["ci95"][0] <= sig["delta"] <= sig["ci95"][1]
    assert set(metrics["by_query_type"]) == {"question", "keyword"}
    report = (run / "eval" / "report.md").read_text()
    assert "paired randomisation test" in report and "| ndcg@10 |" in report and "## By query type" in report
    assert (run / "eval" / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert metrics["references"] == ["bm25 (reference)", "bm25+base RRF (reference)"]
    assert "bm25 (reference)" in report and metrics["verdicts"][0].startswith("fine-tuned vs base: NDCG@10")
    per_query = pq.read_table(run / "eval" / "per_query.parquet")
    # one row per model (base, fine-tuned, the reference rows) and test query
    assert per_query.num_rows == (2 + len(metrics["references"])) * len(splits["test"])
    assert "Largest wins of fine-tuned" in output or "Largest losses of fine-tuned" in output

    parity = json.loads((run / "export" / "parity.json").read_text())
    assert parity["passed"] and parity["min_cosine"] >= 0.9999 and parity["texts"] >= 50
    assert (run / "export" / "onnx" / "model.onnx").stat().st_size > 1_000_000
    int8 = json.loads((run / "export" / "int8.json").read_text())
    assert int8["kept"] == (int8["ndcg@10_loss"] <= int8["tolerance"])
    assert (run / "export" / "onnx-int8" / "model.onnx").exists() == int8["kept"]

    served = json.loads((run / "serve" / "manifest.json").read_text())
    assert served["status"] == "answered" and served["dimension"] == 384
    assert "/v1/embeddings answered" in output


def test_rerun_skips_every_up_to_date_stage(run_dir):
    run, _, overrides = run_dir
    before = {s: manifest(run, s)["finished_at"] for s in ("corpus", "sdg", "prep", "train", "merge", "rerank", "eval",
                                                          "export")}
    output = retrofit("run", "--corpus", "sample", "--out", str(run), "--no-serve", *overrides)
    assert output.count("up to date, skipped") == len(before)
    assert before == {s: manifest(run, s)["finished_at"] for s in before}


def test_interrupted_sdg_resumes_only_missing_shards(run_dir):
    run, _, overrides = run_dir
    shards = sorted((run / "sdg" / "shards").glob("shard-*.parquet"))
    assert len(shards) >= 3
    lost = shards[1]
    kept = {p: p.stat().st_mtime_ns for p in shards if p != lost}
    lost_rows = pq.read_table(lost).num_rows
    total = pq.read_table(run / "sdg" / "qa.parquet").num_rows
    # Simulate a crash mid-stage: the manifest still says running, one shard never got written.
    m = manifest(run, "sdg")
    m["status"] = "running"
    (run / "sdg" / "manifest.json").write_text(json.dumps(m))
    lost.unlink()
    output = retrofit("sdg", "--out", str(run), *overrides)
    assert f"{len(kept)} finished shard(s) kept, 1 to go" in output
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished shards untouched
    qa = pq.read_table(run / "sdg" / "qa.parquet")
    assert qa.num_rows == total - lost_rows + pq.read_table(lost).num_rows
    assert len(set(qa.column("qa_id").to_pylist())) == qa.num_rows  # nothing duplicated


def test_sdg_killed_mid_run_resumes_without_losing_or_duplicating(tmp_path):
    """SIGKILL the `retrofit sdg` process group (the driver; Ray and the LLM actors die with it) once some
    shards are written; the rerun keeps every finished shard, makes only the missing ones, duplicates nothing."""
    import os
    import signal
    import time

    run = tmp_path / "run"
    settings = ["corpus.sample_docs=6", "corpus.chunk_tokens=128", "corpus.chunk_overlap=16",
                "sdg.query_types.question=1", "sdg.query_types.keyword=0", "sdg.shard_size=2", "sdg.placement.num_actors=2"]
    args = [a for s in settings for a in ("--set", s)]
    retrofit("corpus", "--corpus", "sample", "--out", str(run), *args)
    shard_dir = run / "sdg" / "shards"
    log = tmp_path / "sdg.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "sdg", "--out", str(run), *args],
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline and len(list(shard_dir.glob("shard-*.parquet"))) < 2:
        assert proc.poll() is None, f"retrofit sdg exited early:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Ray's own processes die with the driver (fate sharing), a moment later: an actor may still finish the
    # shard it was on. Wait until the shard set stops changing before taking stock.
    stable, last = 0, None
    while stable < 3:
        now = sorted(p.name for p in shard_dir.glob("shard-*.parquet"))
        stable, last = (stable + 1 if now == last else 0), now
        time.sleep(1)
    finished = {p: p.stat().st_mtime_ns for p in shard_dir.glob("shard-*.parquet")}
    n_chunks = pq.read_table(run / "corpus" / "chunks.parquet").num_rows
    total_shards = (n_chunks + 1) // 2
    assert 2 <= len(finished) < total_shards, "the kill must land mid-run"
    assert manifest(run, "sdg")["status"] == "running"

    output = retrofit("sdg", "--out", str(run), *args)
    assert f"{len(finished)} finished shard(s) kept, {total_shards - len(finished)} to go" in output
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    qa = pq.read_table(run / "sdg" / "qa.parquet")
    ids = qa.column("qa_id").to_pylist()
    assert len(set(ids)) == len(ids) and manifest(run, "sdg")["status"] == "completed"
    shard_rows = sum(pq.read_table(p).num_rows for p in shard_dir.glob("shard-*.parquet"))
    assert qa.num_rows == shard_rows and len(list(shard_dir.glob("shard-*.parquet"))) == total_shards
    assert not list(shard_dir.glob(".*.tmp"))  # no half-written shard survives as a shard


def test_a_reranker_trains_passes_its_gate_and_eval_scores_it_beside_the_embedder(run_dir):
    """Last in this module: it changes the run's rerank settings. One step of training (gate 'always', so it
    ships whatever the tiny val split says), then eval: a reranked row, compared with the shipped model alone."""
    run, _, overrides = run_dir
    rerank = ["--set", "rerank.enabled=true", "--set", "rerank.max_steps=1", "--set", "rerank.gate=always",
              "--set", "rerank.max_pair_tokens=128", "--set", "rerank.top_k=10"]
    output = retrofit("rerank", "--out", str(run), *overrides, *rerank)
    counts = manifest(run, "rerank")["counts"]
    assert counts["enabled"] and counts["shipped"] and counts["steps"] == 1 and counts["rerank_top_k"] == 10
    assert counts["gate_queries"].endswith("val queries (synthetic, documents training never saw)")
    assert "gate 'always': ships" in output and (run / "rerank" / "model" / "reranker.json").exists()
    assert not (run / "rerank" / "candidate").exists()

    retrofit("eval", "--out", str(run), *overrides, *rerank)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert "fine-tuned + reranker" in metrics and "fine-tuned + reranker vs fine-tuned" in metrics["comparisons"]
    assert any(v.startswith("fine-tuned + reranker vs fine-tuned: NDCG@10") for v in metrics["verdicts"])
    # Only the top 10 are reordered: what the embedder found below them is not lost.
    assert metrics["fine-tuned + reranker"]["recall@100"] == metrics["fine-tuned"]["recall@100"]
    assert manifest(run, "eval")["counts"]["rerank_ms_per_query"] > 0
    # The same reranker on any BEIR folder: a row reordering the last --model's hits, compared with it too.
    report = run / "beir-report"
    retrofit("eval", "--beir", str(run / "prep" / "beir_test"), "--model", "minilm", "--model", str(run / "merge" / "model"),
             "--reranker", str(run / "rerank" / "model"), "--report", str(report), *overrides, *rerank)
    beir = json.loads((report / "beir_test" / "metrics.json").read_text())
    label = f"{run / 'merge' / 'model'} + reranker"
    assert label in beir and f"{label} vs {run / 'merge' / 'model'}" in beir["comparisons"]
    # A shipped reranker is exported too: one graph with its head, checked against torch on real pairs.
    retrofit("export", "--out", str(run), *overrides, *rerank)
    exported = manifest(run, "export")["counts"]["reranker"]
    assert exported["parity"]["passed"] and exported["parity"]["pairs"] > 0
    assert (run / "export" / "reranker" / "model.onnx").exists()
    assert (run / "export" / "reranker-int8" / "model.onnx").exists() == exported["int8"]["kept"]
    # ... and served beside the embedder: the smoke check reranks two texts for its query over HTTP.
    output = retrofit("serve", "--once", "--out", str(run), *overrides, *rerank)
    served = json.loads((run / "serve" / "manifest.json").read_text())
    assert served["reranker"] and sorted(x["index"] for x in served["rerank"]) == [0, 1]
    assert "/v1/rerank scored" in output

