"""Shared helpers for benchmark scripts: describe the machine, write results JSON."""
from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def relative_paths(text: str) -> str:
    """This machine's absolute paths under the repository (and its parent, where ../shared lives) written
    relative to the repository root, and others under the home folder as ~/, so a committed result names
    no one's home folder."""
    # Only where a path starts (a JSON string, or a `--set key=value`): "benchmarks/work/" stays as it is.
    text = re.sub(rf'(?<=["=]){re.escape(str(ROOT))}/', "", text)
    text = re.sub(rf'(?<=["=]){re.escape(str(ROOT.parent))}/', "../", text)
    return re.sub(rf'(?<=["=]){re.escape(str(Path.home()))}/', "~/", text)  # caches: ~/.cache/retrofit/...


def machine() -> dict:
    import psutil

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "processor": platform.processor() or platform.machine()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **payload}
    path.write_text(relative_paths(json.dumps(payload, indent=2, default=str)))
    return path


def wait_until_serving(proc, base_url: str, what: str, log_path, timeout_s: float, poll_s: float = 3.0) -> None:
    """Block until an OpenAI-compatible server started as `proc` answers GET base_url/models; a server that exits
    or stays silent past timeout_s is an error naming its log."""
    import contextlib
    import urllib.request

    deadline = time.time() + timeout_s
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}; its log: {log_path}")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(base_url + "/models", timeout=5)
            return
        if time.time() > deadline:
            raise SystemExit(f"{what} did not answer in {timeout_s:.0f} s; its log: {log_path}")
        time.sleep(poll_s)
