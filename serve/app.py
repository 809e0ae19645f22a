"""Ray Serve application: the exported ONNX embedder behind an OpenAI-compatible /v1/embeddings, and the
exported reranker (when the run shipped one) behind /v1/rerank (Cohere's and Jina's shape) and /rerank (TEI's).

Requests are batched across callers with @serve.batch; each replica holds one ONNX Runtime session per model.
Prometheus metrics (ours, per endpoint: requests by status, inputs, latency, batch sizes; Ray Serve's own:
queue, replicas, HTTP errors including 503s) are Ray metrics: Ray aggregates them across replicas and nodes
and serves them in Prometheus format on each node's metrics export port (`ray.metrics_export_port`).
"""


import asyncio
import base64
import hmac
import logging
import os
import time

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from serve.rerank_request import TRUNCATE, BadRequest, RerankRequest
from serve.rerank_request import parse as parse_rerank

log = logging.getLogger("retrofit.serve")
APP_NAME = "retrofit"

api = FastAPI(title="Retrofit embeddings and reranking")


def _json(content) -> Response:
    """The response body written by orjson straight from numpy, not through FastAPI's encoder and json
    (CPU time the replica's event loop would not spend forming batches; benchmarks/README.md, "Serving"), and
    float32's shortest text (exact for a float32 model) halves the bytes the proxy relays."""
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": code}})


def _split(values: np.ndarray, requests: list[list]) -> list[np.ndarray]:
    """One batched model call's outputs back into each request's share, in order."""
    out, i = [], 0
    for items in requests:
        out.append(values[i:i + len(items)])
        i += len(items)
    return out


@serve.deployment(name="RetrievalService")
@serve.ingress(api)
class RetrievalService:
    def __init__(self, export_dir: str, model_name: str, max_inputs: int, max_input_chars: int,
                 requests_per_batch: int, batch_wait_timeout_s: float, threads: int = 1, api_key: str | None = None,
                 device: str = "auto", reranker_dir: str | None = None, max_documents: int = 1000):
        from pipeline.crossencoder import OnnxReranker
        from pipeline.embedders import OnnxEmbedder
        from pipeline.onnx_models import pick_device
        from pipeline.storage import local_copy

        export_dir = str(local_copy(export_dir))  # in a bucket: each replica's node keeps its own copy
        self.embedder = OnnxEmbedder(export_dir, threads=threads, device=pick_device(device, export_dir))
        self.reranker = None
        if reranker_dir:
            reranker_dir = str(local_copy(reranker_dir))
            self.reranker = OnnxReranker(reranker_dir, threads=threads, device=pick_device(device, reranker_dir))
        from ray.util import metrics

        def by_status_and_latency(prefix: str, what: str):
            return (metrics.Counter(f"{prefix}_requests", description=f"{what} requests by status.",
                                    tag_keys=("status",)),
                    metrics.Histogram(f"{prefix}_latency_seconds", description="Request latency.",
                                      boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]))

        self.requests, self.latency = by_status_and_latency("retrofit_embedding", "Embedding")
        self.rerank_requests, self.rerank_latency = by_status_and_latency("retrofit_rerank", "Rerank")
        self.inputs = metrics.Counter("retrofit_embedding_inputs", description="Texts embedded.")
        self.rerank_pairs = metrics.Counter("retrofit_rerank_pairs", description="(query, document) pairs scored.")
        self.batch_texts = metrics.Histogram("retrofit_embedding_batch_texts", description="Texts per model call.",
                                             boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256])
        self.batch_pairs = metrics.Histogram("retrofit_rerank_batch_pairs", description="Pairs per model call.",
                                             boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024])
        self.model_name, self.max_inputs, self.max_input_chars = model_name, max_inputs, max_input_chars
        self.reranker_name, self.max_documents = f"{model_name}-reranker", max_documents
        self.api_key = api_key
        # Tokens the model reads besides the special ones ([CLS], [SEP]), fixed per model: counted once.
        self.special_tokens = self.embedder.tok.num_special_tokens_to_add()
        self.room = int(self.embedder.info["max_seq_length"]) - self.special_tokens
        # We count tokens of over-long inputs on purpose (to answer 413); transformers' warning about it is noise.
        logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
        for batched in (self._embed_batch, self._score_batch):
            batched.set_max_batch_size(requests_per_batch)
            batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.in_flight = 0  # requests (either endpoint) inside this replica now

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _embed_batch(self, requests: list[list[str]]) -> list[np.ndarray]:
        # Requests arrive with their input_type's prompt already applied, so one batch can mix them.
        flat = [t for texts in requests for t in texts]
        self.batch_texts.observe(len(flat))
        # In a worker thread (ONNX Runtime releases the GIL): the event loop keeps answering health checks
        # and forming the next batch while this one runs.
        return _split(await asyncio.to_thread(self.embedder.encode, flat), requests)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _score_batch(self, requests: list[list[tuple[str, str]]]) -> list[np.ndarray]:
        flat = [pair for pairs in requests for pair in pairs]
        self.batch_pairs.observe(len(flat))
        return _split(await asyncio.to_thread(self.reranker.score_pairs, flat), requests)

    async def _batched(self, items: list, model_call, batch_method, batch_sizes) -> np.ndarray:
        """A request with company joins a batch; one alone in the replica runs at once, since waiting out
        the batching window for requests that are not coming is pure latency (most of it at concurrency 1)."""
        self.in_flight += 1
        try:
            if self.in_flight == 1:
                batch_sizes.observe(len(items))
                return await asyncio.to_thread(model_call, items)
            return await batch_method(items)
        finally:
            self.in_flight -= 1

    async def _embed(self, texts: list[str]) -> np.ndarray:
        return await self._batched(texts, self.embedder.encode, self._embed_batch, self.batch_texts)

    async def _score(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        return await self._batched(pairs, self.reranker.score_pairs, self._score_batch, self.batch_pairs)

    def _unauthorized(self, request: Request):
        if self.api_key and not hmac.compare_digest(request.headers.get("authorization", ""),
                                                    f"Bearer {self.api_key}"):
            return _error(401, "missing or wrong bearer token", "authentication_error")
        return None

    def _validate(self, body):
        if not isinstance(body, dict) or "input" not in body:
            return _error(400, "request body must be a JSON object with an 'input' field")
        if body.get("model") not in (None, self.model_name):  # what OpenAI clients expect for another model
            return _error(404, f"the model {body['model']!r} does not exist here; this endpoint serves "
                               f"{self.model_name!r}", code="model_not_found")
        texts = body["input"]
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return _error(400, "'input' must be a string or a list of strings")
        if not texts:
            return _error(400, "'input' is empty")
        if any(not t.strip() for t in texts):
            return _error(400, f"'input' holds an empty string (index {next(i for i, t in enumerate(texts) if not t.strip())})")
        if len(texts) > self.max_inputs:
            return _error(413, f"{len(texts)} inputs exceed the limit of {self.max_inputs} per request")
        truncate = TRUNCATE.get(body.get("truncate"))
        if truncate is None:
            return _error(400, "'truncate' must be 'NONE', 'END', 'START' (or true, meaning 'END')")
        if truncate != "NONE":  # the character cap bounds tokenizer work; tokens decide below
            texts = [t[:self.max_input_chars] if truncate == "END" else t[-self.max_input_chars:] for t in texts]
        too_long = [i for i, t in enumerate(texts) if len(t) > self.max_input_chars]
        if too_long:
            return _error(413, f"input {too_long[0]} has more than {self.max_input_chars} characters "
                               "(send 'truncate': 'END' or 'START' to cut it instead)")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            return _error(400, "'encoding_format' must be 'float' or 'base64'")
        input_type = body.get("input_type")
        if input_type is not None:
            if input_type not in ("query", "passage"):
                return _error(400, "'input_type' must be 'query' or 'passage'")
            prefix = self.embedder.prompts.get(input_type, "")
            texts = [prefix + t for t in texts]
        # The model reads at most max_seq_length tokens: count them, never cut silently.
        ids = self.embedder.token_ids(texts)
        room = self.room
        over = [i for i, x in enumerate(ids) if len(x) > room]
        if over and truncate == "NONE":
            return _error(413, f"input {over[0]} has {len(ids[over[0]])} tokens; this model reads at most {room} "
                               "(send 'truncate': 'END' or 'START' to cut it instead)")
        for i in over:
            if truncate == "START":  # keep the end of the text (the ONNX tokenizer cuts the end otherwise)
                texts[i] = self.embedder.decode(ids[i][-room:])
        n_tokens = sum(min(len(x), room) + self.special_tokens for x in ids)
        return texts, fmt, n_tokens

    @api.post("/v1/embeddings")
    async def embeddings(self, request: Request):
        """Embed `input` (a string or a list), OpenAI's request and reply shape; NIM's `input_type` and `truncate`."""
        return await self._timed(self._embeddings(request), self.requests, self.latency)

    @staticmethod
    async def _timed(handling, requests, latency) -> Response:
        started = time.perf_counter()
        response = await handling
        requests.inc(tags={"status": str(response.status_code)})
        latency.observe(time.perf_counter() - started)
        return response

    async def _body(self, request: Request):
        """The request's JSON, or the response that refuses it (authentication first)."""
        denied = self._unauthorized(request)
        if denied:
            return denied
        try:
            return await request.json()
        except Exception:
            return _error(400, "request body is not valid JSON")

    async def _embeddings(self, request: Request):
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        checked = self._validate(body)
        if isinstance(checked, JSONResponse):
            return checked
        texts, fmt, n_tokens = checked
        self.inputs.inc(len(texts))
        emb = await self._embed(texts)
        data = []
        for i, vec in enumerate(emb):
            value = (base64.b64encode(vec.astype("<f4").tobytes()).decode() if fmt == "base64"
                     else np.ascontiguousarray(vec, dtype=np.float32))
            data.append({"object": "embedding", "index": i, "embedding": value})
        return _json({"object": "list", "data": data, "model": self.model_name,
                      "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    @api.post("/v1/rerank")
    async def rerank(self, request: Request):
        """Reorder `documents` (strings or {text} objects) by relevance to `query`: Cohere's and Jina's request
        and reply shape (`top_n`, `return_documents`; `relevance_score` is the sigmoid of the model's logit)."""
        return await self._timed(self._rerank(request, "cohere"), self.rerank_requests, self.rerank_latency)

    @api.post("/rerank")
    async def rerank_tei(self, request: Request):
        """The same for TEI clients: `query`, `texts` (`return_text`, `raw_scores`) -> [{index, score}]."""
        return await self._timed(self._rerank(request, "tei"), self.rerank_requests, self.rerank_latency)

    async def _rerank(self, request: Request, form: str) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        if self.reranker is None:
            return _error(404, "no reranker is served here: the run's rerank stage shipped none (its gate refused "
                               "the candidate, or rerank.enabled is off; see rerank/manifest.json)",
                          code="model_not_found")
        r = self.reranker
        try:
            req = parse_rerank(body, form, self.reranker_name, self.max_documents, self.max_input_chars,
                               r.max_tokens, r.special_pair_tokens, r.token_ids, r.decode)
        except BadRequest as e:
            return _error(e.status, str(e), code=e.code)
        self.rerank_pairs.inc(len(req.documents))
        logits = await self._score([(req.query, d) for d in req.documents])
        return _json(self._ranked(req, form, logits))

    def _ranked(self, req: RerankRequest, form: str, logits: np.ndarray):
        scores = logits if req.raw_scores else 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        top = np.argsort(-scores, kind="stable")[:req.top_n]
        if form == "tei":
            return [{"index": int(i), "score": float(scores[i]),
                     **({"text": req.originals[i]} if req.return_documents else {})} for i in top]
        results = [{"index": int(i), "relevance_score": float(scores[i]),
                    **({"document": {"text": req.originals[i]}} if req.return_documents else {})} for i in top]
        return {"object": "list", "model": self.reranker_name, "results": results,
                "usage": {"total_tokens": req.tokens}}

    @api.get("/v1/models")
    async def models(self, request: Request):
        """The models served: the embedder with its dimension, and the reranker when there is one."""
        denied = self._unauthorized(request)
        if denied:
            return denied
        data = [{"id": self.model_name, "object": "model", "owned_by": "retrofit", "type": "embedding",
                 "dimension": self.embedder.dimension}]
        if self.reranker is not None:
            data.append({"id": self.reranker_name, "object": "model", "owned_by": "retrofit", "type": "reranker",
                         "max_pair_tokens": self.reranker.max_tokens})
        return {"object": "list", "data": data}

    @api.get("/health")
    async def health(self):
        """Liveness, without authentication: for load balancers and proxies."""
        return {"status": "ok"}


def build_app(export_dir: str, model_name: str, serve_cfg, reranker_dir: str | None = None):
    where = serve_cfg.placement
    replicas = {"num_replicas": where.num_replicas}
    if where.autoscaling:
        replicas = {"autoscaling_config": {"min_replicas": where.min_replicas, "max_replicas": where.max_replicas,
                                           "target_ongoing_requests": where.target_ongoing_requests}}
    deployment = RetrievalService.options(
        **replicas,
        ray_actor_options={"num_cpus": where.cpus_per_replica, "num_gpus": where.gpus_per_replica},
        # Ray's default of 5 ongoing requests per replica would silently cap batch sizes.
        max_ongoing_requests=serve_cfg.max_ongoing_requests or 2 * serve_cfg.requests_per_batch,
        # A bounded queue: overload answers 503 at once instead of growing memory and latency.
        max_queued_requests=serve_cfg.max_queued_requests,
    )
    return deployment.bind(export_dir, model_name, serve_cfg.max_inputs, serve_cfg.max_input_chars,
                           serve_cfg.requests_per_batch, serve_cfg.batch_wait_timeout_s,
                           threads=max(1, int(where.cpus_per_replica)),
                           api_key=serve_cfg.api_key or os.environ.get("RETROFIT_API_KEY") or None,
                           device=serve_cfg.device, reranker_dir=reranker_dir, max_documents=serve_cfg.max_documents)


def start(export_dir: str, model_name: str, serve_cfg, app_name: str = APP_NAME, route_prefix: str = "/",
          reranker_dir: str | None = None) -> str:
    """Deploy on the current Ray (embedded or cluster) and return the endpoint's base URL; with `reranker_dir`
    (an export/reranker folder) the same replicas serve /v1/rerank too."""
    # Serve's driver-side INFO lines ("Started Serve", "Connecting to existing Serve app ... New http_options
    # will not be applied": serve.run's own start call, after ours applied them) are not for users; the
    # replicas' logs are configured in their own processes and keep everything.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": serve_cfg.host, "port": serve_cfg.port})
    serve.run(build_app(export_dir, model_name, serve_cfg, reranker_dir), name=app_name, route_prefix=route_prefix)
    return f"http://{serve_cfg.host}:{serve_cfg.port}{route_prefix.rstrip('/')}"


def stop(app_name: str = APP_NAME) -> None:
    """Delete our application only: on a shared cluster other Serve applications keep running. When
    nothing else is served, Serve itself stops too (its controller and proxies free their resources)."""
    serve.delete(app_name)
    if not serve.status().applications:
        serve.shutdown()
