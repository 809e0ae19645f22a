"""Typed run configuration: one YAML file (or flags), validated by pydantic.

Every field has a default that works on a 2-core laptop; profiles change a few of them for other
hardware. Errors name the field (``train.lr``) and what it accepts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import RetrofitError


# What a stage's identity is made of. 1: settings left at their defaults were not hashed (a changed default
# went unnoticed); 2: every setting, recorded in the manifest; 3: placement in sub-models, batch sizes named
# by their unit, one name for the LLM. Run folders of another schema are not reused (`retrofit migrate`).
CONFIG_SCHEMA = 3


class Section(BaseModel):
    # Unknown keys are typos, not extensions: reject them so `lerning_rate: 1e-5` is not silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Placement(Section):
    """Where a stage runs, on how many processes, and how it reaches its servers. Never part of a stage's
    identity (the same work on more actors, other nodes or another server gives the same output): every
    field that is a Placement is left out of the hash, so the structure says what counts."""


class ActorPlacement(Placement):
    num_actors: int = Field(1, ge=1, description="Ray actors working through the shards.")
    cpus_per_actor: int = Field(1, ge=1, description="CPUs per actor (its torch / llama.cpp threads).")
    gpus_per_actor: float = Field(0.0, ge=0.0, description="GPUs per actor (fractions share one GPU).")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per actor "
                                        "(e.g. {gpu_node: 1}) to pin the stage to matching nodes.")


class SDGPlacement(ActorPlacement):
    num_actors: int = Field(1, ge=1, description="LLM actors (one engine each).")
    fallback_backend: Literal["transformers"] | None = Field(
        None, description="Used, with a warning, when sdg.backend cannot start on this machine (unset: fail with "
        "the reason). Each shard records the backend that wrote it, and one run never mixes two.")
    vllm_compile: bool = Field(True, description="Backend 'vllm': compile the model with torch.compile (faster "
                               "decoding; the compile took ~3 min of each engine's start on a 2-core CPU). False: "
                               "eager mode (enforce_eager), which starts in seconds: for short runs and tests.")


class LLMServer(Placement):
    """The OpenAI-compatible server that sdg.backend 'openai' sends requests to (it serves sdg.llm)."""
    base_url: str = Field("http://127.0.0.1:8001/v1", description="API base URL (a `vllm serve`, a NIM).")
    api_key_env: str = Field("RETROFIT_LLM_API_KEY", description="Environment variable holding the API key "
                             "(the key itself is never put in the config or logs).")
    concurrency: int = Field(8, ge=1, description="Requests in flight per actor.")
    timeout_s: float = Field(120.0, gt=0.0, description="Seconds one request may take before it is retried.")
    max_retries: int = Field(5, ge=0, description="Retries (exponential backoff) on 429/5xx/timeouts.")


class WorkerPlacement(Placement):
    cpus_per_worker: int = Field(1, ge=1, description="CPUs (and torch threads) per training worker.")
    max_failures: int = Field(2, ge=0, description="Worker-group restarts (from the latest checkpoint) allowed.")


class ReplicaPlacement(Placement):
    num_replicas: int = Field(1, ge=1, description="Replicas of the endpoint (without autoscaling).")
    cpus_per_replica: float = Field(1.0, gt=0.0, description="CPUs per replica (its ONNX Runtime threads).")
    gpus_per_replica: float = Field(0.0, ge=0.0, description="GPUs per replica (CUDA / TensorRT providers).")
    autoscaling: bool = Field(False, description="Scale replicas between min_replicas and max_replicas on load.")
    min_replicas: int = Field(1, ge=0, description="Autoscaling: fewest replicas.")
    max_replicas: int = Field(4, ge=1, description="Autoscaling: most replicas.")
    target_ongoing_requests: float = Field(16.0, gt=0.0, description="Autoscaling target per replica.")

    @model_validator(mode="after")
    def _replica_range(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class JudgeChoice(Section):
    """Who gives a second opinion on (query, passage) pairs. Short forms (a YAML string or --set value):
    'none', 'llm' (the sdg.llm), 'llm:MODEL' (another LLM) or a cross-encoder folder."""
    kind: Literal["none", "llm", "cross_encoder"] = Field("none", description="No judge, an LLM asked yes/no, or "
                                                          "a cross-encoder's score.")
    model: str | None = Field(None, description="kind 'llm': a packaged LLM name or folder (unset: sdg.llm); kind "
                              "'cross_encoder': its folder (sentence-transformers CrossEncoder layout).")

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value):
        if not isinstance(value, str):
            return value
        if value in ("none", "llm"):
            return {"kind": value}
        if value.startswith("llm:"):
            return {"kind": "llm", "model": value[4:] or None}
        return {"kind": "cross_encoder", "model": value}

    @model_validator(mode="after")
    def _model_fits_kind(self):
        # Checked at load, not when prep reaches its judge after SDG's hours: a typo fails at once.
        if self.kind == "none" and self.model:
            raise ValueError(f"kind 'none' takes no model (got {self.model!r})")
        if self.kind == "cross_encoder" and not (self.model and Path(self.model).is_dir()):
            raise ValueError(f"{self.model!r} is not an existing cross-encoder folder; a judge must be 'none', 'llm', "
                             "'llm:MODEL' (a packaged LLM name or folder) or such a folder")
        return self


class CorpusConfig(Section):
    path: str = Field("sample", description="Corpus: a folder of .txt/.md files, a .jsonl or .parquet file with "
                      "id/title/text columns, a BEIR folder, a saved HF dataset, or 'sample' (stdlib docs); "
                      "any of these may be in a bucket (s3://bucket/docs).")
    format: Literal["auto", "folder", "jsonl", "parquet", "beir", "hf", "sample"] = Field(
        "auto", description="How to read corpus.path (auto: from what it is).")
    chunk_tokens: int = Field(200, ge=16, le=8192, description="Chunk length in embedder tokens.")
    chunk_overlap: int = Field(32, ge=0, description="Tokens shared by neighbouring chunks.")
    prechunked: bool = Field(False, description="Rows are already chunks: keep their ids, do not re-chunk.")
    max_docs: int | None = Field(None, ge=1, description="Use only the first N documents (demos, subsets).")
    sample_docs: int = Field(24, ge=1, description="Documents in the built-in sample corpus.")

    @model_validator(mode="after")
    def _overlap_below_length(self):
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError("chunk_overlap must be smaller than chunk_tokens")
        return self


class SDGConfig(Section):
    backend: Literal["transformers", "llamacpp", "vllm", "openai"] = Field(
        "transformers", description="LLM engine: transformers (CPU/GPU), llamacpp (llama.cpp on the GGUF, CPU), vllm "
        "(offline engine per actor), openai (any OpenAI-compatible server, e.g. `vllm serve` or a NIM).")
    llm: str = Field("smollm2", description="'smollm2', 'gemma3', 'qwen2.5-coder-0.5b', 'qwen2.5-coder-1.5b' "
                     "(packaged GGUF), a HF model folder, or (backend llamacpp) a .gguf file; with "
                     "backend 'openai', the name the server serves the model under.")
    output: Literal["line", "json"] = Field("line", description="One query per reply (n samples), or one reply "
                                            "holding a JSON list of the n queries, parsed item by item.")
    max_chunk_chars: int = Field(12000, ge=100, description="Backend 'openai': longer chunks are cut (and counted); "
                                 "the local backends cut at the model's context in tokens.")
    chunks: Literal["all", "first"] = Field("all", description="Which chunks get queries: all, or each document's "
                                            "first only (where retrieval sees a document through its first chunk, "
                                            "e.g. an index of truncated documents as BEIR evaluates them).")
    query_types: dict[str, int] = Field(default_factory=lambda: {"question": 2, "keyword": 1},
                                        description="Queries per chunk of each type (question, claim, keyword, "
                                                    "... as defined in the prompts file).")
    prompts: str | None = Field(None, description="YAML file of query-type prompts (default: pipeline/prompts.yaml).")
    example_queries: str | None = Field(None, description="A text file of real user queries, one per line (no "
                                        "labels): up to 8 go into every prompt so the LLM writes in their style.")
    max_new_tokens: int = Field(48, ge=8, le=2048, description="Reply length cap (a query is one line).")
    length_reference_tokens: int | None = Field(None, ge=1, description="Scale queries per chunk with its length: "
                                                "a chunk of this many tokens gets the full count, shorter ones fewer.")
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="0 means greedy decoding.")
    chunks_per_call: int = Field(8, ge=1, description="Chunks per generate() call.")
    shard_size: int = Field(32, ge=1, description="Chunks per output shard (the unit of resume).")
    min_query_chars: int = Field(8, ge=1, description="Shorter replies are dropped (counted as too_short).")
    max_query_chars: int = Field(300, ge=8, description="Longer replies are dropped (counted as too_long).")
    placement: SDGPlacement = SDGPlacement()
    server: LLMServer = LLMServer()

    @model_validator(mode="after")
    def _some_queries(self):
        if any(n < 0 or n > 20 for n in self.query_types.values()) or sum(self.query_types.values()) == 0:
            raise ValueError("query_types: counts must be 0-20 per type and ask for at least one query")
        return self


class PrepConfig(Section):
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of documents in the val split.")
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Share of documents in the test split.")
    num_negatives: int = Field(5, ge=0, le=64, description="Hard negatives per training row.")
    mining_model: str | None = Field(None, description="Embedder that mines negatives and runs the round-trip "
                                     "filter: unset means train.base_model; else a model folder.")
    candidates: int = Field(30, ge=1, description="Nearest chunks considered per query before filtering.")
    margin: float = Field(0.95, gt=0.0, le=1.0,
                          description="Drop candidates scoring above margin x positive score (false negatives).")
    skip_top: int = Field(0, ge=0, description="Ignore the N best-ranked candidates.")
    negative_selection: Literal["top", "sample"] = Field(
        "top", description="Take the best-ranked surviving candidates, or sample among them (seeded).")
    index: Literal["auto", "flat", "ivf", "hnsw"] = Field(
        "auto", description="FAISS index: exact (flat) up to exact_search_max_chunks, then IVF on a GPU or "
        "HNSW on CPUs.")
    exact_search_max_chunks: int = Field(100_000, ge=1, description="Largest corpus searched exactly by 'auto'.")
    ivf_nprobe: int = Field(32, ge=1, description="IVF lists searched per query (recall vs speed).")
    hnsw_ef_search: int = Field(128, ge=8, description="HNSW search breadth (recall vs speed).")
    gpu_index: bool = Field(True, description="Search on a GPU when faiss-gpu sees one (flat and IVF).")
    judge: JudgeChoice = Field(JudgeChoice(), description="Second opinion on the best surviving candidates: an LLM "
                               "asked whether the passage answers the query, or a cross-encoder.")
    judge_top: int = Field(5, ge=1, description="Candidates per query the judge looks at.")
    judge_ratio: float = Field(1.0, gt=0.0, description="Drop a candidate the judge scores at least judge_ratio "
                               "x its score for the query's own positive.")
    near_duplicate_cosine: float = Field(0.97, ge=0.0, le=1.0, description="Drop a query this similar (cosine) to "
                                         "an earlier query for the same chunk (0: keep all).")
    query_judge: JudgeChoice = Field(JudgeChoice(), description="Score each query against its chunk with a "
                                     "rubric; queries below query_judge_min are dropped.")
    query_judge_min: float = Field(0.5, ge=0.0, le=1.0, description="Lowest judge score (probability) kept.")
    roundtrip_top_k: int = Field(20, ge=0, description="Keep a query only if the mining model ranks its source "
                                 "chunk in its top k (0: keep all).")
    texts_per_batch: int = Field(64, ge=1, description="Texts per embedding call.")
    fixed_eval_set: bool = Field(True, description="Reuse the test split (documents and queries) of an earlier "
                                 "run on the same corpus, so metrics stay comparable across runs.")
    eval_set_root: str | None = Field(None, description="Where fixed evaluation sets are kept: a folder or a "
                                      "bucket, e.g. s3://bucket/eval-sets (default: ~/.cache/retrofit/eval_sets).")

    placement: ActorPlacement = Field(ActorPlacement(), description="Embedding actors, when the corpus is large "
                                      "enough for Ray.")

    @field_validator("mining_model", mode="before")
    @classmethod
    def _mining_model_choice(cls, spec):
        if spec in (None, "base"):  # 'base': how schema 2 said "train.base_model"
            return None
        if not Path(spec).is_dir():
            raise ValueError(f"mining_model {spec!r} must be unset (train.base_model) or an existing model folder")
        return spec

    @model_validator(mode="after")
    def _fractions_leave_training(self):
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave documents for training (< 1.0)")
        return self


class TrainingLoopConfig(Section):
    """What every trained model's loop shares (the embedder's `train`, the reranker's `rerank`)."""
    epochs: int = Field(3, ge=1, le=100, description="Passes over the training rows.")
    max_steps: int = Field(0, ge=0, description="Stop after this many steps in all, with a checkpoint there (0: "
                           "every epoch to the end); the warmup and cosine schedule span the steps actually run.")
    queries_per_worker: int = Field(16, ge=2, description="Queries per step on each worker; every worker's "
                                    "passages are gathered, so a query is scored against queries_per_worker x "
                                    "num_workers positives.")
    lr: float = Field(2e-5, gt=0.0, lt=1.0, description="Peak learning rate (AdamW).")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of the steps the learning rate warms up "
                                "over from zero, then follows a cosine down.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Clip the gradient norm (0: off); the Hugging Face / "
                                 "sentence-transformers trainer's default too.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (that trainer's default: 0).")
    negatives_per_query: int = Field(3, ge=0, description="Hard negatives used per query in a step.")
    # Part of the identity, unlike placement: more workers make a bigger contrastive batch, a GPU trains in bf16.
    num_workers: int = Field(1, ge=1, description="Ray Train workers (processes).")
    use_gpu: bool = Field(False, description="Train on GPUs (one per worker).")
    engine: Literal["deepspeed", "ddp"] = Field("deepspeed", description="DeepSpeed ZeRO, or plain AdamW with "
                                                 "an all-reduce of gradients (the fallback).")
    zero_stage: Literal[1, 2] = Field(2, description="DeepSpeed ZeRO stage.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="'auto': bf16 where the hardware multiplies it natively (GPUs that support it; CPUs "
        "with AVX512-BF16 or AMX), else fp32. bf16 keeps fp32 weights and optimiser on CPUs (autocast, as "
        "sentence-transformers' trainer with bf16=True); on GPUs it is DeepSpeed's bf16 mode.")
    checkpoint_every_steps: int = Field(0, ge=0, description="Also checkpoint (and validate) every N steps.")
    val_max_queries: int = Field(300, ge=1, description="Val queries scored at each checkpoint.")
    keep: Literal["best", "last"] = Field("best", description="Keep the checkpoint with the best val NDCG@10, "
                                          "or the last one.")
    early_stopping_patience: int = Field(0, ge=0, description="Stop after N checkpoints without a val gain (0: off).")
    val_at_checkpoints: bool = Field(True, description="Score val NDCG@10 at each checkpoint (keep 'best' and early "
                                     "stopping need it). Off: one val pass less per checkpoint, no val curve.")
    placement: WorkerPlacement = WorkerPlacement()

    @model_validator(mode="after")
    def _val_when_something_uses_it(self):
        if not self.val_at_checkpoints and (self.keep == "best" or self.early_stopping_patience):
            raise ValueError("val_at_checkpoints false leaves nothing to choose the best checkpoint or stop early: "
                             "set keep 'last' and early_stopping_patience 0 too, or keep val on")
        return self


class TrainConfig(TrainingLoopConfig):
    base_model: str = Field("minilm", description="'minilm' (packaged all-MiniLM-L6-v2) or a model folder.")
    loss_temperature: float = Field(0.05, gt=0.0, le=1.0, description="InfoNCE temperature (the loss's; "
                                    "sdg.temperature is the LLM's sampling).")
    symmetric: bool = Field(False, description="Add the passage-to-query direction to the loss.")
    max_query_tokens: int = Field(64, ge=8, description="Queries are cut to this many tokens in training.")
    max_passage_tokens: int = Field(256, ge=16, description="Passages are cut to this many tokens in training "
                                    "and evaluation (at least corpus.chunk_tokens).")
    grad_cache_chunk: int = Field(0, ge=0, description="GradCache: embed in chunks of this many texts so big "
                                  "batches fit in memory (0: off; needs engine 'ddp').")
    query_prefix: str = Field("", description="Prepended to queries (e.g. 'query: '); saved as the model's prompt.")
    passage_prefix: str = Field("", description="Prepended to passages (e.g. 'passage: ').")

    @model_validator(mode="after")
    def _grad_cache_engine(self):
        if self.grad_cache_chunk and self.engine != "ddp":
            raise ValueError("grad_cache_chunk needs engine 'ddp' (DeepSpeed owns the backward pass)")
        return self


class RerankConfig(TrainingLoopConfig):
    """The cross-encoder that reorders the shipped embedder's top hits: trained on the same train split (val
    and test never seen; by default val only gates it), shipped only if it beats the embedder alone."""
    enabled: bool = Field(False, description="Train a reranker in the rerank stage (off: the stage records that "
                          "and the run ships the embedder alone).")
    model: str | None = Field(None, description="Start weights: a cross-encoder folder (a sentence-transformers "
                              "CrossEncoder or Hugging Face sequence-classification model, e.g. an MS MARCO "
                              "MiniLM). Unset: train.base_model's transformer with a new scoring head.")
    max_pair_tokens: int = Field(320, ge=32, le=8192, description="Query and passage together are cut to this "
                                 "many tokens (the passage is cut, never the query).")
    top_k: int = Field(100, ge=1, description="The shipped embedder's top hits the reranker reorders (in the gate "
                       "and in eval; at most eval.top_k).")
    in_batch_negatives: int = Field(1, ge=0, description="Other queries' positives scored as negatives of each "
                                    "query in a step, beside its hard negatives.")
    loss_scale: float = Field(10.0, gt=0.0, description="Listwise softmax over sigmoid(score) x loss_scale (the "
                              "scale sentence-transformers' cross-encoder MultipleNegativesRankingLoss uses).")
    gate: Literal["significant", "better", "always"] = Field(
        "significant", description="Ship the reranker only if reranking beats the shipped embedder alone on the "
        "dev queries (merge.dev_queries) or else the val split: by a significant NDCG@10 gain (paired test, p < "
        "0.05), by any gain, or always.")
    trust_synthetic_val: bool = Field(False, description="Let a gain on the val split's synthetic queries ship "
                                      "the reranker when no human dev queries are given. Off: measured unsafe (on "
                                      "SciFact a reranker that passed on them lowered human NDCG@10 by 5.9 points), "
                                      "so without dev queries the reranker stays in rerank/candidate.")
    # The loop's defaults for a reranker: one pass, and val kept for the gate (a checkpoint chosen on val
    # and then gated on it would flatter the gate).
    epochs: int = Field(1, ge=1, le=100, description="Passes over the training rows.")
    keep: Literal["best", "last"] = Field("last", description="Keep the checkpoint with the best val NDCG@10, "
                                          "or the last one.")
    val_at_checkpoints: bool = Field(False, description="Score val NDCG@10 at each checkpoint (keep 'best' and "
                                     "early stopping need it). Off by default: val then only gates the reranker.")

    @field_validator("model", mode="before")
    @classmethod
    def _model_folder(cls, spec):
        if spec is not None and not Path(spec).is_dir():
            raise ValueError(f"model {spec!r} must be unset (train.base_model with a new head) or an existing "
                             "cross-encoder folder")
        return spec


class MergeConfig(Section):
    weight: float = Field(1.0, ge=0.0, le=1.0, description="Shipped model = weight x fine-tuned + (1 - weight) x "
                          "base, when no dev queries choose it (1: the fine-tuned model as trained).")
    dev_queries: str | None = Field(None, description="Human queries with their relevant documents, to choose the "
                                    "weight: a BEIR folder (qrels/dev.tsv), FOLDER:SPLIT (qrels/SPLIT.tsv, never "
                                    "'test'), or a JSONL file of {\"query\", \"relevant\": [document ids]}.")
    grid: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0], min_length=1, description="Weights tried on the dev "
                              "queries (0 is the base: shipped when nothing beats it).")

    @field_validator("grid")
    @classmethod
    def _grid_in_range(cls, grid):
        if any(not 0.0 <= a <= 1.0 for a in grid):
            raise ValueError(f"every weight must be in [0, 1]; got {grid}")
        return grid


class EvalConfig(Section):
    texts_per_batch: int = Field(64, ge=1, description="Texts per embedding call.")
    top_k: int = Field(100, ge=10, description="Documents retrieved per query.")


class ExportConfig(Section):
    opset: int = Field(17, ge=14, description="ONNX opset of the exported graph.")
    parity_texts: int = Field(200, ge=1, description="Real texts compared between torch and ONNX.")
    min_cosine: float = Field(0.9999, gt=0.0, le=1.0, description="Parity gate: cosine(ONNX, torch) per text.")
    reranker_max_score_diff: float = Field(0.01, gt=0.0, description="Parity gate of a shipped reranker's graph: "
                                           "|score(ONNX) - score(torch)| per pair, in logits.")
    int8: bool = Field(True, description="Also write dynamic int8 variants (export/onnx-int8, and "
                       "export/reranker-int8 when a reranker shipped).")
    int8_max_ndcg_loss: float = Field(0.01, ge=0.0, description="Keep an int8 variant only if its NDCG@10 on "
                                      "the test split is at most this much below fp32.")
    tensorrt: Literal["auto", "off", "required"] = Field(
        "auto", description="Build and check a TensorRT fp16 engine when TensorRT is there ('auto' says why "
        "not otherwise; 'required' fails the stage).")


class ServeConfig(Section):
    host: str = Field("127.0.0.1", description="Address the endpoint listens on (0.0.0.0: every interface).")
    port: int = Field(8000, ge=1, le=65535, description="Port of the endpoint.")
    requests_per_batch: int = Field(32, ge=1, description="Requests embedded together in one model call at most.")
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, description="How long a request waits for others to join "
                                        "its batch (a request alone in the replica does not wait).")
    device: Literal["auto", "cpu", "cuda", "tensorrt"] = Field(
        "auto", description="ONNX Runtime provider; 'auto': TensorRT if its engine was built, CUDA if there "
        "is a GPU, else CPU.")
    max_inputs: int = Field(256, ge=1, description="Inputs per request.")
    max_input_chars: int = Field(8192, ge=1, description="Longer inputs answer 413 unless the request sets "
                                 "'truncate' ('END' or 'START'); so do inputs over the model's token limit.")
    max_documents: int = Field(1000, ge=1, description="Documents per /v1/rerank request (each is one (query, "
                               "document) pair, within the reranker's pair length unless 'truncate' cuts it).")
    max_ongoing_requests: int | None = Field(None, ge=1, description="Requests a replica works on at once "
                                             "(default: 2 x requests_per_batch; Ray's own default of 5 caps "
                                             "batching).")
    max_queued_requests: int = Field(64, ge=1, description="Requests waiting beyond that; more answer 503 at once.")
    # exclude=True: never written to config.yaml, printed, or hashed.
    api_key: str | None = Field(None, exclude=True,
                                description="Require 'Authorization: Bearer KEY' (or set RETROFIT_API_KEY).")
    placement: ReplicaPlacement = ReplicaPlacement()


class RayConfig(Section):
    address: str | None = Field(None, description="Cluster address; unset means RAY_ADDRESS or an embedded local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded Ray (default: all).")
    metrics_export_port: int | None = Field(None, ge=1, le=65535, description="Prometheus port of the embedded "
                                            "Ray's metrics (serving metrics included); unset: Ray picks one.")
    serve_ingress: Literal["haproxy", "python"] = Field("haproxy", description="How HTTP reaches the endpoint's "
                                                        "replicas on an embedded Ray: Ray's HAProxy (no Python hop; "
                                                        "Linux) or Ray's Python proxy. A cluster's own environment "
                                                        "decides there.")
    shard_stall_timeout_s: float = Field(1800.0, gt=0, description="A shard in flight whose worker reports no "
                                         "progress (SDG: a batch of chunks done) for this long fails the stage as "
                                         "stuck, naming it; finished shards are kept. A slow shard that reports "
                                         "progress is never cut off.")


class RetrofitConfig(Section):
    profile: Literal["cpu-small", "gpu-h200"] = Field("cpu-small", description="Defaults for a machine: a 2-core "
                                                      "CPU, or one H200 (vLLM, larger batches, GPU training).")
    seed: int = Field(13, description="One seed for every stage: splits, sampling, training order.")
    corpus: CorpusConfig = CorpusConfig()
    sdg: SDGConfig = SDGConfig()
    prep: PrepConfig = PrepConfig()
    train: TrainConfig = TrainConfig()
    merge: MergeConfig = MergeConfig()
    rerank: RerankConfig = RerankConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    serve: ServeConfig = ServeConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _chunks_fit_training(self):
        # SDG writes queries about whole chunks; a shorter training/eval length would silently cut them.
        if self.corpus.chunk_tokens > self.train.max_passage_tokens:
            raise ValueError(f"corpus.chunk_tokens ({self.corpus.chunk_tokens}) is above train.max_passage_tokens "
                             f"({self.train.max_passage_tokens}): training and evaluation would cut every chunk "
                             "the queries were written about; lower the one or raise the other")
        return self

    def section_settings(self, *names: str) -> dict[str, Any]:
        """Every setting of the named sections that decides what a stage produces, as 'section.field' ->
        value. Defaults included: a release that changes a default changes the stage's identity. Placement
        settings (where and on how many actors a stage runs) never change what it produces and are left out."""
        settings = {}
        for n in names:
            section = getattr(self, n)
            placement = {k for k in type(section).model_fields if isinstance(getattr(section, k), Placement)}
            settings.update({f"{n}.{k}": v for k, v in section.model_dump(mode="json", exclude=placement).items()})
        settings["seed"] = self.seed
        return settings

    def section_hash(self, *names: str, extra: dict | None = None) -> str:
        """Hash of the named sections' settings (and `extra`, such as prompt text): a stage is rerun only when
        what it reads changes."""
        payload = {"schema": CONFIG_SCHEMA, "settings": self.section_settings(*names), "extra": extra or {}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


PROFILES: dict[str, dict[str, Any]] = {
    # Two single-threaded LLM actors use a 2-core machine better than one two-threaded actor.
    "cpu-small": {"sdg": {"placement": {"num_actors": 2}}},
    "gpu-h200": {
        "sdg": {"chunks_per_call": 64, "shard_size": 512, "placement": {"gpus_per_actor": 1.0}},
        "prep": {"texts_per_batch": 512},
        "train": {"use_gpu": True, "queries_per_worker": 128, "epochs": 3},
        "eval": {"texts_per_batch": 512},
    },
}


class ConfigError(RetrofitError):
    """A config problem, phrased for the user: names the file and field."""


# Settings renamed or moved, old name -> new name. A config file or --set still using an old name is an
# error naming the new one; `retrofit migrate` rewrites a run folder's config.yaml.
RENAMED = {
    # schema 2: one name, one meaning
    "train.temperature": "train.loss_temperature",
    "train.seed": "seed",
    "train.lr_preset": "train.lr",
    # schema 3: placement in sub-models, batch sizes named by their unit, the LLM named once
    **{f"sdg.{k}": f"sdg.placement.{k}" for k in ("num_actors", "cpus_per_actor", "gpus_per_actor", "resources",
                                                   "fallback_backend")},
    **{f"sdg.openai_{k}": f"sdg.server.{k}" for k in ("base_url", "api_key_env", "concurrency", "timeout_s",
                                                       "max_retries")},
    "sdg.openai_model": "sdg.llm",
    "sdg.openai_max_chunk_chars": "sdg.max_chunk_chars",
    "sdg.batch_size": "sdg.chunks_per_call",
    **{f"prep.{k}": f"prep.placement.{k}" for k in ("num_actors", "cpus_per_actor", "gpus_per_actor")},
    "prep.batch_size": "prep.texts_per_batch",
    "train.batch_size": "train.queries_per_worker",
    **{f"train.{k}": f"train.placement.{k}" for k in ("cpus_per_worker", "max_failures")},
    "eval.batch_size": "eval.texts_per_batch",
    "serve.max_batch_size": "serve.requests_per_batch",
    **{f"serve.{k}": f"serve.placement.{k}" for k in ("num_replicas", "cpus_per_replica", "gpus_per_replica",
                                                       "autoscaling", "min_replicas", "max_replicas",
                                                       "target_ongoing_requests")},
}
WHY_RENAMED = {
    "train.temperature": "sdg.temperature is the LLM's sampling; this one is the loss's",
    "train.seed": "the run has one seed, at the top level",
    "train.lr_preset": "half: 1e-5, double: 4e-5 for the default 2e-5",
    "sdg.openai_model": "every backend names its model in sdg.llm; for 'openai', the name the server serves",
}


def upgrade_config_data(data: dict) -> dict:
    """A config mapping written by an older Retrofit, in today's names (what `retrofit migrate` does to a
    run folder's config.yaml); a value the new names cannot hold is an error naming it."""
    data = json.loads(json.dumps(data))  # a copy
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    if "seed" in train:
        seed = train.pop("seed")
        if seed != data.get("seed", seed):
            raise ConfigError(f"train.seed {seed} differs from seed {data['seed']}: the run now has one seed; "
                              "set `seed` to the one you want")
        data.setdefault("seed", seed)
    if "lr_preset" in train:
        scale = {"default": 1.0, "half": 0.5, "double": 2.0}[train.pop("lr_preset")]
        train["lr"] = train.get("lr", TrainConfig.model_fields["lr"].default) * scale
    sdg = data.get("sdg") if isinstance(data.get("sdg"), dict) else {}
    if sdg.get("openai_model") is None:
        sdg.pop("openai_model", None)  # unset meant "sdg.llm", which is what sdg.llm now says alone
    for old, new in RENAMED.items():
        section, name = old.split(".")
        if not isinstance(data.get(section), dict) or name not in data[section]:
            continue
        value = data[section].pop(name)
        *parents, leaf = new.split(".")
        target = data
        for key in parents:
            target = target.setdefault(key, {})
        if old == "sdg.openai_model" or leaf not in target:  # the served name is the model's name
            target[leaf] = value
        elif target[leaf] != value:
            raise ConfigError(f"{old} ({value!r}) and {new} ({target[leaf]!r}) disagree: keep the one you want")
    return data


def _check_renamed(data: dict, source: str) -> None:
    for old, new in RENAMED.items():
        section, name = old.split(".")
        if isinstance(data.get(section), dict) and name in data[section]:
            why = f" ({WHY_RENAMED[old]})" if old in WHY_RENAMED else ""
            raise ConfigError(f"invalid config ({source}):\n  {old} was renamed or moved: use {new}{why}; "
                              "`retrofit migrate --out RUN` rewrites a run folder's config")


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_override(item: str) -> dict:
    """'train.lr=1e-5' -> {'train': {'lr': 1e-05}}; the value is read as YAML (numbers, bools, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.field=value")
    dotted, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    for key in reversed(dotted.strip().split(".")):
        value = {key: value}
    return value


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {field}: {e['msg']}" + (f" (got {e['input']!r})" if "input" in e and
                                                  not isinstance(e["input"], dict) else ""))
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RetrofitConfig:
    """Defaults <- profile <- YAML file <- `section.field=value` overrides."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    _check_renamed(data, source)
    for item in overrides or []:
        data = _deep_merge(data, _parse_override(item))
        _check_renamed(data, f"--set {item}")
    profile = data.get("profile", "cpu-small")
    if profile not in PROFILES:
        raise ConfigError(f"invalid config ({source}):\n  profile: must be one of {sorted(PROFILES)} (got {profile!r})")
    # Merge onto the full defaults so a dict field (sdg.query_types) is extended, not replaced, by a flag.
    data = _deep_merge(_deep_merge(RetrofitConfig().model_dump(mode="json"), PROFILES[profile]), data)
    try:
        return RetrofitConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def dump_config(cfg: RetrofitConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
