"""The Ray Serve endpoint, over real HTTP on 127.0.0.1."""
import base64
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests

from pipeline.config import load_config
from pipeline.embedders import OnnxEmbedder
from pipeline.export import export_onnx
from tests.conftest import free_port


RERANKER_PAIR_TOKENS = 64


@pytest.fixture(scope="module")
def exported_reranker(base_model, tmp_path_factory) -> Path:
    """An exported reranker: the base model's transformer with a new (untrained) head, 64-token pairs."""
    from pipeline.crossencoder import load_pair_model, save_reranker
    from pipeline.export import export_reranker_onnx

    folder = tmp_path_factory.mktemp("reranker")
    save_reranker(*load_pair_model(base_model), folder / "model", RERANKER_PAIR_TOKENS)
    export_reranker_onnx(folder / "model", folder / "onnx", opset=17)
    return folder / "onnx"


@pytest.fixture(scope="module")
def endpoint(base_model, tmp_path_factory, ray_local, exported_reranker):
    from serve import app

    export_dir = tmp_path_factory.mktemp("onnx")
    export_onnx(base_model, export_dir, opset=17)
    cfg = load_config(None, [f"serve.port={free_port()}", "serve.max_inputs=4", "serve.max_input_chars=20000"])
    url = app.start(str(export_dir), "test-model", cfg.serve, reranker_dir=str(exported_reranker))
    yield url, export_dir, ray_local
    app.stop()


def test_stopping_our_endpoint_leaves_other_serve_applications_running(endpoint):
    """On a shared cluster `serve.shutdown()` would remove every application; we delete only ours."""
    from ray import serve

    from serve import app

    @serve.deployment(ray_actor_options={"num_cpus": 0})  # the test's Ray has 2 CPUs; the fixture holds one
    class Other:
        def __call__(self, request) -> str:
            return "still here"

    url, export_dir, _ = endpoint
    serve.run(Other.bind(), name="someone-elses-app", route_prefix="/other")
    cfg = load_config(None, [f"serve.port={url.rsplit(':', 1)[1]}", "serve.placement.cpus_per_replica=0.1"])
    app.start(str(export_dir), "test-model", cfg.serve, app_name="retrofit-second", route_prefix="/second")
    app.stop("retrofit-second")
    apps = serve.status().applications
    assert "retrofit-second" not in apps and apps["someone-elses-app"].status == "RUNNING"
    assert requests.get(f"{url}/other", timeout=30).text == "still here"
    assert requests.post(f"{url}/v1/embeddings", json={"input": "still served"}, timeout=60).status_code == 200
    serve.delete("someone-elses-app")


def test_embeddings_match_the_exported_model(endpoint):
    url, export_dir, _ = endpoint
    r = requests.post(f"{url}/v1/embeddings", json={"input": ["hello world", "json.dumps"], "model": "test-model"})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and body["model"] == "test-model"
    got = np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])
    want = OnnxEmbedder(export_dir).encode(["hello world", "json.dumps"])
    assert got.shape == (2, 384) and np.allclose(got, want, atol=1e-5)


def test_string_input_and_base64(endpoint):
    url, _, _ = endpoint
    r = requests.post(f"{url}/v1/embeddings", json={"input": "hello world", "encoding_format": "base64"})
    assert r.status_code == 200
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert vec.shape == (384,) and abs(np.linalg.norm(vec) - 1) < 1e-4


@pytest.mark.parametrize("body, status, words", [
    ({"input": []}, 400, "empty"),
    ({"input": ""}, 400, "empty string"),
    ({"input": [1, 2]}, 400, "string"),
    ({"text": "x"}, 400, "'input'"),
    ({"input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
    ({"input": "x", "input_type": "document"}, 400, "input_type"),
    ({"input": ["a"] * 5}, 413, "limit of 4"),
    ({"input": "y" * 20001}, 413, "20000 characters"),
    ({"input": "x", "model": "not-this-model"}, 404, "'not-this-model' does not exist"),
    ({"input": "x", "truncate": "MIDDLE"}, 400, "'truncate' must be"),
    ({"input": "数据" * 3500}, 413, "input 0 has 7000 tokens; this model reads at most 254"),
])
def test_bad_requests_get_clear_errors(endpoint, body, status, words):
    url, _, _ = endpoint
    r = requests.post(f"{url}/v1/embeddings", json=body)
    assert r.status_code == status
    assert words in r.json()["error"]["message"]


def test_models_and_health(endpoint):
    url, _, _ = endpoint
    assert requests.get(f"{url}/health").json() == {"status": "ok"}
    models = requests.get(f"{url}/v1/models").json()["data"]
    assert models[0]["id"] == "test-model" and models[0]["dimension"] == 384
    assert models[1] == {"id": "test-model-reranker", "object": "model", "owned_by": "retrofit", "type": "reranker",
                         "max_pair_tokens": RERANKER_PAIR_TOKENS}
    assert requests.post(f"{url}/v1/embeddings", data="not json").status_code == 400


def test_eval_through_the_endpoint_reproduces_in_process_metrics(endpoint, tmp_path):
    from pipeline.retrieval import evaluate_models
    from tests.test_eval import _small_beir

    url, export_dir, _ = endpoint
    beir = _small_beir(tmp_path / "beir", n_queries=10)
    result = evaluate_models(beir, {"onnx": str(export_dir), "endpoint": url}, 100, tmp_path / "cache", 4,
                             references=False)
    for metric, value in result.means["onnx"].items():
        assert result.means["endpoint"][metric] == pytest.approx(value, abs=1e-4), metric


def test_truncate_on_request(endpoint):
    url, export_dir, _ = endpoint
    r = requests.post(f"{url}/v1/embeddings", json={"input": "y" * 20001, "truncate": True})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
    # Under the character limit but over the model's 256 tokens: cut where the request says, count real tokens.
    text = "zebra crossings near the station. " * 45 + "the quarterly report covers revenue. " * 45 + "penguins"

    def embed(truncate):
        r = requests.post(f"{url}/v1/embeddings", json={"input": [text, "hello world"], "truncate": truncate})
        assert r.status_code == 200, r.text
        return np.array([d["embedding"] for d in r.json()["data"]]), r.json()["usage"]["prompt_tokens"]

    end, used = embed("END")
    start, _ = embed("START")
    assert used == 256 + 4  # [CLS] ... [SEP] at the model's limit, and [CLS] hello world [SEP]
    onnx_model = OnnxEmbedder(export_dir)
    assert np.allclose(end[0], onnx_model.encode([text])[0], atol=1e-5)  # the model's own cut: the end
    tail = onnx_model.encode(["the quarterly report covers revenue. " * 42 + "penguins"])[0]
    assert float(start[0] @ tail) > 0.99 > float(end[0] @ tail)  # START keeps the end of the text


def test_bearer_token_auth(endpoint):
    from serve import app

    _, export_dir, _ = endpoint
    cfg = load_config(None, ["serve.api_key=s3cret"])
    assert "s3cret" not in str(cfg.model_dump())  # never dumped to config.yaml or logs
    cfg.serve.port = int(endpoint[0].rsplit(":", 1)[1])
    url = app.start(str(export_dir), "secure-model", cfg.serve, app_name="secure", route_prefix="/secure")
    try:
        body = {"input": "hello"}
        assert requests.post(f"{url}/v1/embeddings", json=body).status_code == 401
        bad = {"Authorization": "Bearer wrong"}
        assert requests.post(f"{url}/v1/embeddings", json=body, headers=bad).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert requests.post(f"{url}/v1/embeddings", json=body, headers=good).status_code == 200
        assert requests.get(f"{url}/v1/models", headers=good).status_code == 200
        assert requests.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["d"]}).status_code == 401
        assert requests.get(f"{url}/health").status_code == 200  # probes need no token
    finally:
        from ray import serve

        serve.delete("secure")


def test_overload_answers_503_quickly_and_the_server_stays_healthy(endpoint):
    from concurrent.futures import ThreadPoolExecutor

    from serve import app

    _, export_dir, _ = endpoint
    port = int(endpoint[0].rsplit(":", 1)[1])
    cfg = load_config(None, [f"serve.port={port}", "serve.requests_per_batch=1", "serve.max_ongoing_requests=1",
                             "serve.max_queued_requests=1"])
    url = app.start(str(export_dir), "tiny", cfg.serve, app_name="tiny", route_prefix="/tiny")
    try:
        body = {"input": ["a long passage about routers and firmware " * 40] * 16, "truncate": "END"}
        with ThreadPoolExecutor(max_workers=24) as pool:
            codes = list(pool.map(lambda _: requests.post(f"{url}/v1/embeddings", json=body, timeout=120).status_code,
                                  range(24)))
        assert codes.count(503) >= 1 and codes.count(200) >= 1 and set(codes) <= {200, 503}
        assert requests.get(f"{url}/health").status_code == 200
        assert requests.post(f"{url}/v1/embeddings", json={"input": "after the storm"}).status_code == 200
    finally:
        from ray import serve

        serve.delete("tiny")


def test_input_type_applies_the_model_prompts(endpoint, base_model, tmp_path):
    from pipeline.embedders import load_model
    from serve import app

    # Serve is up (the endpoint fixture); this deploys a second app beside it.
    st = load_model(base_model, device="cpu")
    st.prompts = {"query": "query: ", "passage": "passage: "}
    st.save(str(tmp_path / "prompted"))
    export_onnx(tmp_path / "prompted", tmp_path / "onnx", opset=17)
    cfg = load_config(None, [f"serve.port={endpoint[0].rsplit(':', 1)[1]}"])
    url = app.start(str(tmp_path / "onnx"), "prompted", cfg.serve, app_name="prompted", route_prefix="/prompted")

    def embed(**extra):
        r = requests.post(f"{url}/v1/embeddings", json={"input": ["reset the router"], **extra})
        assert r.status_code == 200, r.text
        return np.array(r.json()["data"][0]["embedding"])

    try:
        onnx_model = OnnxEmbedder(tmp_path / "onnx")
        assert np.allclose(embed(input_type="query"), onnx_model.encode(["query: reset the router"])[0], atol=1e-5)
        assert np.allclose(embed(input_type="passage"), onnx_model.encode(["passage: reset the router"])[0],
                           atol=1e-5)
        assert np.allclose(embed(), onnx_model.encode(["reset the router"])[0], atol=1e-5)
        # This app was started without a reranker: /v1/rerank says so instead of failing.
        r = requests.post(f"{url}/v1/rerank", json={"query": "reset", "documents": ["the router"]})
        assert r.status_code == 404 and "no reranker is served here" in r.json()["error"]["message"]
    finally:  # its replica holds a CPU that later tests on this Ray need
        app.stop("prompted")


def test_prometheus_metrics_count_requests_by_status(endpoint):
    url, _, metrics_port = endpoint
    for body in ({"input": "metrics check"}, {"input": []}):
        requests.post(f"{url}/v1/embeddings", json=body)
    for body in ({"query": "metrics", "documents": ["check"]}, {"query": "metrics", "documents": []}):
        requests.post(f"{url}/v1/rerank", json=body)

    def counts(endpoint_name):
        text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        found = {}
        for line in text.splitlines():
            if line.startswith(f"ray_retrofit_{endpoint_name}_requests_total{{"):
                status = line.split('status="')[1].split('"')[0]
                found[status] = found.get(status, 0) + float(line.rsplit(" ", 1)[1])
        return found, text

    for name in ("embedding", "rerank"):
        deadline = time.time() + 60  # Ray exports metrics every few seconds
        while time.time() < deadline:
            found, text = counts(name)
            if found.get("200", 0) >= 1 and found.get("400", 0) >= 1:
                break
            time.sleep(2)
        assert found.get("200", 0) >= 1 and found.get("400", 0) >= 1, (name, found)
    assert "ray_retrofit_embedding_latency_seconds_bucket" in text
    assert "ray_retrofit_embedding_batch_texts_bucket" in text
    assert "ray_retrofit_rerank_latency_seconds_bucket" in text
    assert "ray_retrofit_rerank_batch_pairs_bucket" in text
    assert "ray_retrofit_rerank_pairs_total" in text


def test_health_answers_while_a_long_batch_is_embedding(endpoint):
    """Inference runs off the replica's event loop: a health check is not queued behind a batch."""
    import threading

    from ray import serve

    from serve import app

    _, export_dir, _ = endpoint
    port = int(endpoint[0].rsplit(":", 1)[1])
    cfg = load_config(None, [f"serve.port={port}", "serve.max_inputs=128"])
    url = app.start(str(export_dir), "busy", cfg.serve, app_name="busy", route_prefix="/busy")
    try:
        body = {"input": [f"passage {i} about routers, firmware and the quarterly report " * 30 for i in range(128)],
                "truncate": "END"}
        heavy = threading.Thread(target=lambda: requests.post(f"{url}/v1/embeddings", json=body, timeout=300))
        heavy.start()
        time.sleep(1.0)  # the batch is now in the model (seconds of work for one CPU thread)
        started = time.perf_counter()
        assert requests.get(f"{url}/health", timeout=60).status_code == 200
        waited = time.perf_counter() - started
        still_embedding = heavy.is_alive()
        heavy.join()
        assert still_embedding and waited < 1.0, (still_embedding, waited)
    finally:
        serve.delete("busy")


def test_a_lone_request_does_not_wait_out_the_batching_window(endpoint):
    """Batching waits up to batch_wait_timeout_s for more requests; with none in the replica it must not
    (at concurrency 1 that wait was most of the latency). Requests with company still batch and answer."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from serve import app

    _, export_dir, _ = endpoint
    port = int(endpoint[0].rsplit(":", 1)[1])
    cfg = load_config(None, [f"serve.port={port}", "serve.batch_wait_timeout_s=5"])
    url = app.start(str(export_dir), "patient", cfg.serve, app_name="patient", route_prefix="/patient")
    try:
        requests.post(f"{url}/v1/embeddings", json={"input": "warm up"}, timeout=60)
        started = time.perf_counter()
        assert requests.post(f"{url}/v1/embeddings", json={"input": "alone"}, timeout=60).status_code == 200
        alone_s = time.perf_counter() - started
        assert alone_s < 2.5, alone_s  # the window is 5 s
        with ThreadPoolExecutor(max_workers=4) as pool:
            codes = list(pool.map(lambda i: requests.post(f"{url}/v1/embeddings", json={"input": f"together {i}"},
                                                          timeout=60).status_code, range(4)))
        assert codes == [200] * 4
    finally:
        serve.delete("patient")


def _haproxy_listening() -> dict:
    """HAProxy processes on this machine -> the (ip, port) pairs they listen on."""
    found = {}
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "haproxy":
            try:
                found[proc] = {(c.laddr.ip, c.laddr.port) for c in proc.net_connections("tcp")
                               if c.status == psutil.CONN_LISTEN}
            except psutil.Error:  # it exited meanwhile
                pass
    return found


def test_the_endpoint_is_haproxys_and_its_side_ports_stay_on_loopback(endpoint):
    """On an embedded Ray requests reach the replica through HAProxy (no Python proxy hop), and HAProxy's
    stats page and Prometheus exporter listen on 127.0.0.1 and free ports (Ray 2.60 binds 8404 and 9101 on
    every interface)."""
    url, _, _ = endpoint
    port = int(url.rsplit(":", 1)[1])
    ours = [addrs for addrs in _haproxy_listening().values() if ("127.0.0.1", port) in addrs]
    assert len(ours) == 1, _haproxy_listening()
    assert len(ours[0]) >= 3 and {ip for ip, _ in ours[0]} == {"127.0.0.1"}, ours
    assert not {p for _, p in ours[0]} & {8404, 9101}, ours


def test_a_killed_server_leaves_no_haproxy_holding_its_port(endpoint):
    """A `retrofit serve` killed with SIGKILL takes its HAProxy with it: Ray's would live on, holding the
    endpoint's port, and the next server on that port could not start."""
    _, export_dir, _ = endpoint
    port = free_port()
    code = ("import time\nfrom pipeline.config import load_config\nfrom pipeline.ray_runtime import ensure_ray\n"
            "from serve import app\nensure_ray(num_cpus=1)\n"
            f"app.start({str(export_dir)!r}, 'doomed', load_config(None, ['serve.port={port}', "
            "'serve.placement.cpus_per_replica=0.5']).serve)\ntime.sleep(600)\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own, as `retrofit serve`
    server = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def holding_port() -> list:
        return [p for p, addrs in _haproxy_listening().items() if ("127.0.0.1", port) in addrs]

    try:
        deadline = time.time() + 240
        while time.time() < deadline and server.poll() is None:
            try:
                if requests.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": "x"}, timeout=10).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        assert holding_port(), f"the server never answered through HAProxy (exit code {server.poll()})"
        server.kill()  # the driver alone: Ray's processes follow it, no Serve shutdown runs
        server.wait()
        deadline = time.time() + 60
        while holding_port() and time.time() < deadline:
            time.sleep(1)
        assert not holding_port(), "HAProxy outlived its server"
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no listener
            s.bind(("127.0.0.1", port))  # nothing listens there: the next server can start
    finally:
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for proc in holding_port():  # an orphan must not hold the port for the rest of the suite
            proc.kill()


DOCS = ["The router's firmware 4.2 fixes the memory leak.", "Penguins live in the southern hemisphere.",
        "Firmware updates for routers ship every quarter.", "A recipe for lemon cake."]
QUERY = "which firmware fixes the router memory leak"


def _sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def test_rerank_ranks_documents_by_the_exported_rerankers_scores(endpoint, exported_reranker):
    """Cohere/Jina shape: results best first, top_n of them, relevance_score = sigmoid(logit), the texts on
    request, usage in tokens; documents as strings or {text} objects; TEI's /rerank gives the same order."""
    from pipeline.crossencoder import OnnxReranker

    url, _, _ = endpoint
    reranker = OnnxReranker(exported_reranker)
    logits = reranker.score(QUERY, DOCS)
    order = list(np.argsort(-logits))
    r = requests.post(f"{url}/v1/rerank", json={"model": "test-model-reranker", "query": QUERY, "documents": DOCS,
                                                "top_n": 3, "return_documents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "test-model-reranker"
    assert [x["index"] for x in body["results"]] == order[:3]
    assert [x["document"]["text"] for x in body["results"]] == [DOCS[i] for i in order[:3]]
    np.testing.assert_allclose([x["relevance_score"] for x in body["results"]], _sigmoid(logits[order[:3]]),
                               atol=1e-5)
    assert body["usage"]["total_tokens"] == sum(reranker.pair_tokens(QUERY, DOCS))

    objects = requests.post(f"{url}/v1/rerank", json={"query": QUERY, "documents": [{"text": d} for d in DOCS]})
    assert [x["index"] for x in objects.json()["results"]] == order  # every document when top_n is absent
    assert "document" not in objects.json()["results"][0]

    tei = requests.post(f"{url}/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True, "return_text": True})
    assert tei.status_code == 200, tei.text
    assert [x["index"] for x in tei.json()] == order and tei.json()[0]["text"] == DOCS[order[0]]
    np.testing.assert_allclose([x["score"] for x in tei.json()], logits[order], atol=1e-5)
    wrong_form = requests.post(f"{url}/rerank", json={"query": QUERY, "documents": DOCS})  # TEI's field is 'texts'
    assert wrong_form.status_code == 400 and "'texts' field" in wrong_form.json()["error"]["message"]


def test_rerank_requests_batched_together_each_get_their_own_answer(endpoint, exported_reranker):
    """Concurrent requests share model calls (dynamic batching); each still gets the scores of its own pairs."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.crossencoder import OnnxReranker

    url, _, _ = endpoint
    reranker = OnnxReranker(exported_reranker)
    asks = [(f"question {i} about {DOCS[i % 4].split()[1]}", DOCS[i % 4:] + DOCS[:i % 4]) for i in range(12)]

    def ask(query_docs):
        query, docs = query_docs
        r = requests.post(f"{url}/rerank", json={"query": query, "texts": docs, "raw_scores": True}, timeout=120)
        assert r.status_code == 200, r.text
        return sorted(r.json(), key=lambda x: x["index"])

    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(ask, asks))
    for (query, docs), answer in zip(asks, answers):
        np.testing.assert_allclose([x["score"] for x in answer], reranker.score(query, docs), atol=1e-4)


@pytest.mark.parametrize("body, status, words", [
    ({"query": QUERY, "documents": []}, 400, "'documents' is empty"),
    ({"query": QUERY}, 400, "'documents' field"),
    ({"query": "", "documents": DOCS}, 400, "'query' must be a non-empty string"),
    ({"query": QUERY, "documents": ["fine", 7]}, 400, "'documents' item 1 must be a string or an object"),
    ({"query": QUERY, "documents": ["fine", {"txt": "x"}]}, 400, "'documents' item 1 must be"),
    ({"query": QUERY, "documents": ["fine", "  "]}, 400, "'documents' item 1 is an empty string"),
    ({"query": QUERY, "documents": ["a document"] * 10000}, 413, "10000 documents exceed the limit of 1000"),
    ({"query": QUERY, "documents": ["ok", "y" * 100000]}, 413, "'documents' item 1 has more than 20000 characters"),
    ({"query": QUERY, "documents": DOCS, "top_n": 0}, 400, "'top_n' must be an integer from 1 to the number of "
                                                           "documents (4); got 0"),
    ({"query": QUERY, "documents": DOCS, "top_n": -2}, 400, "got -2"),
    ({"query": QUERY, "documents": DOCS, "top_n": 5}, 400, "got 5"),
    ({"query": QUERY, "documents": DOCS, "top_n": "2"}, 400, "'top_n' must be an integer"),
    ({"query": QUERY, "documents": DOCS, "return_documents": "yes"}, 400, "'return_documents' must be true or false"),
    ({"query": QUERY, "documents": DOCS, "truncate": "MIDDLE"}, 400, "'truncate' must be"),
    ({"query": QUERY, "documents": ["router " * 80]}, 413, "reads at most 64 per pair"),
    ({"query": "router " * 70, "documents": ["x"], "truncate": "END"}, 413, "'query' has 140 tokens"),
    ({"query": QUERY, "documents": DOCS, "model": "other"}, 404, "'other' does not exist"),
])
def test_bad_rerank_requests_get_clear_errors(endpoint, body, status, words):
    url, _, _ = endpoint
    r = requests.post(f"{url}/v1/rerank", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_rerank_truncate_cuts_long_documents_where_asked(endpoint, exported_reranker):
    """A pair over the reranker's length is cut only on request: END keeps the document's start (the model's
    own cut), START its end; the query is never cut."""
    from pipeline.crossencoder import OnnxReranker

    url, _, _ = endpoint
    reranker = OnnxReranker(exported_reranker)
    long_doc = "penguins huddle on the ice. " * 20 + "the router firmware fixes the memory leak"

    def score(truncate):
        r = requests.post(f"{url}/rerank", json={"query": QUERY, "texts": [long_doc], "raw_scores": True,
                                                 "truncate": truncate})
        assert r.status_code == 200, r.text
        return r.json()[0]["score"]

    assert score("END") == pytest.approx(float(reranker.score(QUERY, [long_doc])[0]), abs=1e-4)
    room = RERANKER_PAIR_TOKENS - reranker.special_pair_tokens - len(reranker.token_ids([QUERY])[0])
    tail = reranker.decode(reranker.token_ids([long_doc])[0][-room:])
    assert score("START") == pytest.approx(float(reranker.score(QUERY, [tail])[0]), abs=1e-4)
    assert "memory leak" in tail


def test_retrofit_query_reranks_through_the_endpoint(endpoint, capsys):
    import json

    from pipeline.cli import main

    url, _, _ = endpoint
    assert main(["query", QUERY, "--url", url, "--rerank", *DOCS, "--top-n", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["results"]) == 2 and printed["results"][0]["document"]["text"] in DOCS
    assert main(["query", QUERY, "--url", url.rsplit(":", 1)[0] + f":{free_port()}", "--rerank", "x"]) == 2
    assert "--url" in capsys.readouterr().err
