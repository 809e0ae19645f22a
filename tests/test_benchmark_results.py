"""Committed benchmark results name paths relative to the repository, never this machine's."""
import json
from pathlib import Path

from benchmarks import common


def test_results_hold_no_absolute_paths_of_this_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    data = common.ROOT.parent / "shared" / "data" / "scifact"
    path = common.write_result("probe", {"corpus": str(data / "corpus.jsonl"), "dev": f"{data}:train",
                                         "run": str(common.ROOT / "benchmarks" / "work" / "scifact"),
                                         "cache": str(Path.home() / ".cache" / "retrofit" / "eval_sets")})
    written = json.loads(path.read_text())
    assert written["corpus"] == "../shared/data/scifact/corpus.jsonl"
    assert written["dev"] == "../shared/data/scifact:train"
    assert written["run"] == "benchmarks/work/scifact"
    assert written["cache"] == "~/.cache/retrofit/eval_sets"
