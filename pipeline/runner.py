"""Runs stages in order against a run directory, skipping the ones that are up to date.

A stage is identified by (the config sections it reads, fingerprints of its inputs). Same identity
and status 'completed': skipped. Same identity but interrupted: rerun in place, keeping its finished
shards (resume). Different identity: its folder is cleared and it runs afresh.
"""

from __future__ import annotations

import sys
import time

from pipeline import corpus, evaluate, export, merge, prep, rerank, sdg, train
from pipeline.beir import load_dev_queries
from pipeline.config import CONFIG_SCHEMA, RetrofitConfig, dump_config
from pipeline.errors import RetrofitError
from pipeline.llm import PROMPT_LAYOUT
from pipeline.rundir import RunDir, StageRecorder

BATCH_STAGES = ("corpus", "sdg", "prep", "train", "merge", "rerank", "eval", "export")
MODULES = {"corpus": corpus, "sdg": sdg, "prep": prep, "train": train, "merge": merge, "rerank": rerank,
           "eval": evaluate, "export": export}
# Which config sections each stage reads, and which stages' outputs it consumes.
READS = {"corpus": ("corpus",), "sdg": ("sdg",), "prep": ("prep",), "train": ("train",),
         "merge": ("merge", "eval"), "rerank": ("rerank", "merge", "eval"), "eval": ("eval", "rerank"),
         "export": ("export", "eval")}
CONSUMES = {"corpus": (), "sdg": ("corpus",), "prep": ("corpus", "sdg"), "train": ("prep",),
            "merge": ("corpus", "train"), "rerank": ("corpus", "prep", "merge"), "eval": ("prep", "merge", "rerank"),
            "export": ("corpus", "sdg", "prep", "merge", "rerank")}
NEEDS_RAY = {"sdg", "train"}


def config_hash(name: str, cfg: RetrofitConfig) -> str:
    """The settings a stage reads, hashed: a change means its old output is stale."""
    extra = {"base_model": cfg.train.base_model}
    if name == "sdg":  # the prompts' wording decides what the LLM writes, as much as any setting
        extra["prompts"] = sdg.load_prompts(cfg.sdg.prompts, cfg.sdg.query_types)
        extra["prompt_layout"] = PROMPT_LAYOUT
        extra["example_queries"] = sdg.load_example_queries(cfg.sdg.example_queries)  # an edited file rewrites
    if name in ("merge", "rerank") and cfg.merge.dev_queries:  # edited dev queries may choose another weight
        dev = load_dev_queries(cfg.merge.dev_queries)
        extra["dev_queries"] = [dev.queries, dev.qrels]
    return cfg.section_hash(*READS[name], extra=extra)


def stage_identity(name: str, cfg: RetrofitConfig, run: RunDir) -> tuple[str, dict]:
    if name == "corpus":
        inputs = {"corpus": corpus.input_fingerprint(cfg)}
    else:
        inputs = {up: run.outputs_fingerprint(up, needed_by=name) for up in CONSUMES[name]}
    return config_hash(name, cfg), inputs


def what_changed(old: dict, new: dict) -> str:
    """'train.lr 2e-05 -> 3e-05, ...': the settings that differ between a stage's old output and this run."""
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, "(absent)") != new.get(k, "(absent)"))
    return ", ".join(f"{k} {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in keys)


def parse_force(value: str | None) -> set[str]:
    """`--force train`, `--force prep,train`, `--force all` -> the stages to redo. Redoing a stage deletes
    its output (hours of SDG shards, say), so `retrofit run` never forces every stage unless told 'all'."""
    if value is None:
        return set()
    names = {v.strip() for v in value.split(",") if v.strip()}
    if names == {"all"}:
        return set(BATCH_STAGES)
    unknown = sorted(names - set(BATCH_STAGES))
    if unknown or not names:
        raise RetrofitError(f"--force {value!r}: name the stages to redo, from {', '.join(BATCH_STAGES)} "
                         f"(comma-separated), or 'all'" + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    return names


def run_stage(name: str, cfg: RetrofitConfig, run: RunDir, force: bool = False) -> str:
    """Run one batch stage; returns 'skipped' or 'completed' (raises on failure)."""
    stage_hash, inputs = stage_identity(name, cfg, run)
    settings = cfg.section_settings(*READS[name])
    rec = StageRecorder(run, name, stage_hash, inputs, settings, CONFIG_SCHEMA)
    if rec.up_to_date() and not force:
        print(f"[{name}] up to date, skipped (config and inputs unchanged)", flush=True)
        return "skipped"
    old = run.read_manifest(name)
    if old is not None and old.config_schema != CONFIG_SCHEMA and not force:
        # Its identity left default settings out: whether today's defaults match what made it is unknown.
        # Redoing it deletes it (hours of SDG, say), so that is the user's call, never a side effect.
        raise RetrofitError(f"{run.location}/{name} was made by an older Retrofit (config schema {old.config_schema or 1}, now "
                            f"{CONFIG_SCHEMA}) whose stage identity left settings at their defaults out; it cannot "
                            f"be checked against this run's settings. Keep it with `retrofit migrate --out {run.location}` "
                            f"(you vouch its settings are this run's), redo it with --force {name} (deletes it), or "
                            "write this run to a new --out folder")
    stale = old is not None and (old.config_hash != stage_hash or old.inputs != inputs)
    if force or stale:  # never mix old shards with new settings; say what goes before it goes
        held = run.describe(name)
        if held:
            changed = what_changed(old.settings, settings) if old else ""
            why = ("--force" if force else f"its settings changed ({changed})" if changed
                   else "its inputs or prompts changed")
            print(f"[{name}] {why}: deleting {run.location}/{name} ({held})", flush=True)
        run.clear(name)
        rec.dir.mkdir(parents=True)
    for needed in (*CONSUMES[name], name):  # inputs, and this stage's own finished work (resume)
        run.pull(needed)
    from pipeline.ray_runtime import configure, ensure_ray

    configure(cfg.ray)
    if name in NEEDS_RAY:
        ensure_ray()
    print(f"[{name}] running", flush=True)
    t0 = time.perf_counter()
    with rec:
        MODULES[name].run_stage(cfg, run, rec)
    print(f"[{name}] completed in {time.perf_counter() - t0:.1f}s", flush=True)
    return "completed"


def adopt(cfg: RetrofitConfig, run: RunDir) -> list[str]:
    """Give stages written under an older config schema today's identity for `cfg`, keeping their output
    (`retrofit migrate`). Only on the user's word: they vouch that `cfg` is what made them."""
    adopted = []
    for name in BATCH_STAGES:
        old = run.read_manifest(name)
        if old is None or old.config_schema == CONFIG_SCHEMA:
            continue
        old.config_hash, old.config_schema = config_hash(name, cfg), CONFIG_SCHEMA
        old.settings = cfg.section_settings(*READS[name])
        run.write_manifest(old)
        adopted.append(name)
    return adopted


def run_all(cfg: RetrofitConfig, run: RunDir, stages=BATCH_STAGES, force: set[str] = frozenset()) -> dict[str, str]:
    """Every stage in order; `force` names the stages to redo even if up to date (see parse_force)."""
    (run.root / "config.yaml").write_text(dump_config(cfg))
    run.push("config.yaml")
    return {name: run_stage(name, cfg, run, force=name in force) for name in stages}


def smoke_serve(cfg: RetrofitConfig, run: RunDir, query: str, keep_serving: bool = False) -> dict:
    """Start the endpoint on the exported model (and the exported reranker when the run shipped one), embed one
    query over HTTP (and rerank two texts for it), then stop (unless kept)."""
    import json

    from pipeline.ray_runtime import configure, ensure_ray
    from serve import app, client

    exported = run.require("export", "serve")
    configure(cfg.ray)
    ensure_ray()
    export_dir = f"{run.location}/export/onnx"  # a bucket location: each replica fetches the model itself
    reranker_dir = f"{run.location}/export/reranker" if "reranker" in exported.counts else None
    url = app.start(export_dir, f"retrofit-{run.name}", cfg.serve, reranker_dir=reranker_dir)  # as app.APP_NAME
    try:
        vectors = client.embed(url, [query])
        info = {"url": url, "query": query, "dimension": len(vectors[0]), "status": "answered",
                "reranker": reranker_dir is not None}
        if reranker_dir:
            ranked = client.rerank(url, query, [query, "an unrelated sentence about the weather"], truncate="END")
            info["rerank"] = ranked
            print(f"[serve] {url}/v1/rerank scored the query itself {ranked[0]['relevance_score']:.3f} against "
                  f"itself (index {ranked[0]['index']} first)", flush=True)
        (run.stage_dir("serve") / "manifest.json").write_text(json.dumps(info, indent=2))
        run.push("serve")
        print(f"[serve] {url}/v1/embeddings answered {query!r} with a {len(vectors[0])}-d vector: "
              f"[{', '.join(f'{x:.4f}' for x in vectors[0][:4])}, ...]", flush=True)
        if keep_serving:
            print(f"[serve] serving at {url} (Ctrl-C to stop)", flush=True)
            while True:
                time.sleep(3600)
        return info
    except KeyboardInterrupt:
        return {"url": url, "status": "stopped"}
    finally:
        app.stop()
        print("[serve] endpoint stopped", file=sys.stderr, flush=True)
