"""The dependency direction of pyproject.toml's import-linter contract holds, every module has a place in
it, and a planted import that goes the wrong way (a cycle, or a stage using another stage) breaks it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_layer_contract_holds():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout


def test_every_module_has_a_layer():
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    named = {m.strip() for layer in contract["layers"] for m in layer.split("|")}
    modules = {f"{pkg}.{p.stem}" for pkg in ("pipeline", "serve") for p in (ROOT / pkg).glob("*.py")
               if p.stem != "__init__"}
    assert modules == named, {"without a layer": modules - named, "named but absent": named - modules}


@pytest.mark.parametrize("module, planted, broken", [
    # evaluate -> retrieval -> encode, so this closes a cycle, as encode importing export once did
    ("encode", "from pipeline.evaluate import run_stage", "pipeline.encode -> pipeline.evaluate"),
    # stages never use each other: shared code moves down a layer
    ("merge", "from pipeline.prep import unroll_positives", "pipeline.merge -> pipeline.prep"),
])
def test_a_planted_import_breaks_the_contract(tmp_path, module, planted, broken):
    for pkg in ("pipeline", "serve"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "pipeline" / f"{module}.py"
    # inside a function: an import hidden from import time still counts
    target.write_text(target.read_text() + f"\n\ndef _planted():\n    {planted}\n")
    out = lint(tmp_path)
    assert out.returncode != 0, out.stdout[-3000:]
    assert broken in out.stdout, out.stdout[-3000:]
