"""Forcing stages: only the ones named, and never without saying what is deleted."""
import os
import subprocess
import sys

import pytest

from pipeline.runner import BATCH_STAGES, parse_force


def test_force_names_stages_and_all_must_be_spelled_out():
    assert parse_force(None) == set()
    assert parse_force("train") == {"train"}
    assert parse_force("prep, train") == {"prep", "train"}
    assert parse_force("all") == set(BATCH_STAGES)
    with pytest.raises(ValueError, match="name the stages to redo"):
        parse_force("")  # a bare `--force`
    with pytest.raises(ValueError, match="unknown: trian"):
        parse_force("sdg,trian")


def test_bare_force_on_run_deletes_nothing(tmp_path):
    """`retrofit run --force` used to redo every stage, deleting SDG shards worth hours of LLM time."""
    shard = tmp_path / "run" / "sdg" / "shards" / "shard-00000.parquet"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"hours of LLM output")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--corpus", "sample", "--out",
                           str(tmp_path / "run"), "--force"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--force" in proc.stderr and "name the stages" in proc.stderr
    assert shard.read_bytes() == b"hours of LLM output"


def test_a_forced_stage_says_what_it_deletes(tmp_path, capsys):
    from pipeline.config import load_config
    from pipeline.runner import run_stage
    from test_prep import _fake_run

    run = _fake_run(tmp_path / "r", 1, "what is")
    cfg = load_config(None, ["prep.fixed_eval_set=false", "prep.num_negatives=2"])
    run_stage("prep", cfg, run)
    capsys.readouterr()
    run_stage("prep", cfg, run, force=True)
    out = capsys.readouterr().out
    assert f"[prep] --force: deleting {run.root / 'prep'} (" in out and "files" in out



def test_a_changed_setting_is_named_before_the_stage_is_redone(tmp_path, capsys):
    from pipeline.config import load_config
    from pipeline.runner import run_stage
    from test_prep import _fake_run

    run = _fake_run(tmp_path / "r", 1, "what is")
    run_stage("prep", load_config(None, ["prep.fixed_eval_set=false", "prep.num_negatives=2"]), run)
    capsys.readouterr()
    run_stage("prep", load_config(None, ["prep.fixed_eval_set=false", "prep.num_negatives=3"]), run)
    assert "[prep] its settings changed (prep.num_negatives 2 -> 3): deleting" in capsys.readouterr().out


def _as_written_by_schema_1(run, stage: str) -> None:
    """Rewrite a stage's manifest the way Retrofit wrote it before config schema 2."""
    import json

    manifest = json.loads(run.manifest_path(stage).read_text())
    for key in ("config_schema", "settings"):  # what a schema-1 manifest lacks
        del manifest[key]
    manifest["config_hash"] = "0123456789abcdef"  # its hash left defaults out: never today's
    run.manifest_path(stage).write_text(json.dumps(manifest))


def test_a_stage_made_under_the_old_identity_is_never_deleted_silently(tmp_path):
    """Schema 1 hashed only non-default settings, so a changed default went unnoticed: an old output can
    not be checked, and redoing it would delete it. The run stops and says how to go on."""
    from pipeline.config import load_config
    from pipeline.errors import RetrofitError
    from pipeline.runner import run_stage
    from test_prep import _fake_run

    run = _fake_run(tmp_path / "r", 1, "what is")
    cfg = load_config(None, ["prep.fixed_eval_set=false", "prep.num_negatives=2"])
    run_stage("prep", cfg, run)
    _as_written_by_schema_1(run, "prep")
    before = sorted(p.name for p in (run.root / "prep").iterdir())
    with pytest.raises(RetrofitError, match="older Retrofit .* --force prep"):
        run_stage("prep", cfg, run)
    assert sorted(p.name for p in (run.root / "prep").iterdir()) == before
    assert run_stage("prep", cfg, run, force=True) == "completed"


def test_migrate_keeps_an_old_run_folder_on_the_users_word(tmp_path, capsys):
    """`retrofit migrate` translates the folder's old config.yaml (train.temperature, train.seed) and keeps
    its stages: the next run skips them instead of stopping or redoing them."""
    import yaml

    from pipeline.cli import main
    from pipeline.config import dump_config, load_config
    from pipeline.runner import run_stage
    from test_prep import _fake_run

    run = _fake_run(tmp_path / "r", 1, "what is")
    cfg = load_config(None, ["prep.fixed_eval_set=false", "prep.num_negatives=2"])
    run_stage("prep", cfg, run)
    _as_written_by_schema_1(run, "prep")
    old_config = yaml.safe_load(dump_config(cfg))
    old_config["train"]["temperature"] = old_config["train"].pop("loss_temperature")  # as schema 1 wrote it
    old_config["train"]["seed"] = old_config["seed"]
    old_config["sdg"]["num_actors"] = old_config["sdg"].pop("placement")["num_actors"]  # as schema 2 wrote it
    old_config["train"]["batch_size"] = old_config["train"].pop("queries_per_worker")
    (run.root / "config.yaml").write_text(yaml.safe_dump(old_config))

    assert main(["migrate", "--out", str(run.root)]) == 0
    assert "kept corpus, sdg, prep under today's identity" in capsys.readouterr().out
    assert load_config(run.root / "config.yaml") == cfg
    assert run_stage("prep", cfg, run) == "skipped"

def test_the_cli_leaves_a_ray_it_did_not_start_running(ray_local):
    """main() called from Python (a notebook, a test, another tool) must not stop the caller's Ray: stopping it
    mid-session sent later Ray work in that process to a second embedded Ray (in the test suite, the
    one under which a later training run lost its Ray services)."""
    import ray

    from pipeline.cli import main

    assert ray.is_initialized()
    assert main(["config", "show"]) == 0
    assert ray.is_initialized()


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_a_library_error_keeps_its_traceback(tmp_path):
    """Only Retrofit's own input errors become one line; a corrupt file is a real failure, shown in full."""
    from test_prep import _fake_run

    run = _fake_run(tmp_path / "r", 1, "what is")
    (run.root / "sdg" / "qa.parquet").write_bytes(b"not a parquet file")
    proc = _cli("prep", "--out", str(run.root), "--set", "prep.fixed_eval_set=false")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ArrowInvalid" in proc.stderr


@pytest.mark.parametrize("flags", [["--model", "minilm"], ["--endpoint", "http://127.0.0.1:9"], ["--report", "r"]])
def test_eval_flags_that_need_beir_are_errors(tmp_path, flags):
    proc = _cli("eval", "--out", str(tmp_path), *flags)
    assert proc.returncode == 2 and f"{flags[0]} needs --beir" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_beir_out_must_be_a_file(tmp_path):
    from conftest import SCIFACT

    proc = _cli("eval", "--beir", str(SCIFACT), "--out", str(tmp_path))
    assert proc.returncode == 2 and "is a folder" in proc.stderr


def test_a_stage_that_starts_ray_late_uses_the_runs_settings():
    """Prep, eval and export switch to Ray Data past a size threshold; the Ray they start must be the
    run's (here 1 CPU), not a default one sized to the machine. A fresh process: no Ray yet."""
    code = """
import ray
from pipeline.config import RayConfig
from pipeline.ray_runtime import configure, map_shards

class Echo:
    def process(self, task):
        return {"shard_id": task["shard_id"]}

configure(RayConfig(num_cpus=1))
done = list(map_shards(Echo, [{"shard_id": 0}, {"shard_id": 1}], ctor_kwargs={}, use_ray=True, label="t"))
print("shards", len(done), "cpus", ray.cluster_resources()["CPU"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "shards 2 cpus 1.0" in out.stdout
