"""First-use work done at install time (`make venv` runs it), so that a run's or a test's time is its own:
the packaged LLM's GGUF -> safetensors conversion, and DeepSpeed's CPU shared-memory communication op,
which DeepSpeed otherwise compiles (minutes on 2 cores) inside the first training run. Both are cached
(~/.cache/retrofit/llm, ~/.cache/retrofit/torch_extensions/<this environment>); running this again is quick."""

from __future__ import annotations

import time


def main() -> None:
    from pipeline.config import RetrofitConfig
    from pipeline.models import resolve_llm

    name, t0 = RetrofitConfig().sdg.llm, time.perf_counter()  # the default generator, installed with us
    print(f"[warmup] LLM {name}: {resolve_llm(name)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    import torch

    if torch.cuda.is_available():  # GPU training communicates over NCCL: no op to build
        return
    from deepspeed.comm.torch import build_shm_op

    from pipeline.train import own_torch_extensions_dir

    own_torch_extensions_dir()  # the folder the training workers load it from
    t0 = time.perf_counter()
    build_shm_op()  # exactly what DeepSpeed's CPU backend calls at init: same builder, flags and cache
    print(f"[warmup] DeepSpeed's CPU shared-memory op ready ({time.perf_counter() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
