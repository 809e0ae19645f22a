"""The `retrofit` command line: the whole run, one stage, evaluation of any BEIR folder, serving."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pipeline.errors import RetrofitError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# transformers draws a "Loading weights" bar for every model it loads (merge loads several): noise on a
# console that shows each stage's own progress. Models load from local folders; there are no downloads.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

DEMO_QUERY = "How do I serialize a Python object to a JSON formatted string?"


def _common(p: argparse.ArgumentParser, out_help: str = "Run directory (created if missing): a local folder or a "
            "bucket, e.g. s3://bucket/prefix (credentials and endpoint from the environment).",
            force_flag: bool = True) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config file (see `retrofit config show`).")
    p.add_argument("--set", metavar="SECTION.FIELD=VALUE", action="append", default=[], dest="overrides",
                   help="Override one config field, e.g. --set train.lr=1e-5 (repeatable).")
    p.add_argument("--out", metavar="RUN_DIR", default="runs/latest", help=out_help + " Default: runs/latest.")
    if force_flag:  # `run` takes the stages to force by name instead
        p.add_argument("--force", action="store_true", help="Rerun this stage even if it is up to date "
                       "(its output folder is deleted first).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retrofit", description=(
        "Adapt an embedding model to your documents: corpus -> sdg -> prep -> train -> merge -> rerank -> eval -> "
        "export -> serve."))
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    parser.add_argument("--debug", action="store_true", help="Show the full traceback of every error, "
                        "bad input included (normally printed as one line).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="Run every stage, then start the endpoint, embed one query and stop.",
                       description="Run every stage (skipping up-to-date ones), print base vs fine-tuned "
                                   "metrics, start the endpoint, embed one query over HTTP and stop.")
    _common(p, force_flag=False)
    p.add_argument("--force", metavar="STAGES", nargs="?", const="", default=None,
                   help="Redo these stages even if up to date, deleting their output first: e.g. 'train', "
                        "'prep,train', or 'all' (only when spelled out).")
    p.add_argument("--corpus", metavar="PATH", help="Corpus (folder, .jsonl, .parquet, BEIR folder, saved HF "
                   "dataset, or 'sample'; any of these may be in a bucket, e.g. s3://bucket/docs); same as --set "
                   "corpus.path=PATH.")
    p.add_argument("--example-queries", metavar="FILE", help="Real user queries, one per line (no labels): up to "
                   "8 go into the SDG prompt as style examples; same as --set sdg.example_queries=FILE.")
    p.add_argument("--dev-queries", metavar="SPEC", help="Human queries with relevant documents (BEIR FOLDER[:SPLIT] "
                   "or a JSONL of {query, relevant}) that choose how much of the fine-tuning to ship; never the "
                   "test queries. Same as --set merge.dev_queries=SPEC.")
    p.add_argument("--query", default=DEMO_QUERY, help="Query embedded through the endpoint at the end.")
    p.add_argument("--keep-serving", action="store_true", help="Keep the endpoint up until Ctrl-C.")
    p.add_argument("--no-serve", action="store_true", help="Stop after export.")

    for name, text in [("corpus", "Read and chunk the corpus into corpus/chunks.parquet."),
                       ("sdg", "Generate synthetic queries per chunk with the LLM (sdg/qa.parquet)."),
                       ("prep", "Split by document and mine hard negatives (prep/{train,val,test}.parquet)."),
                       ("train", "Contrastive fine-tuning on Ray Train (train/model)."),
                       ("merge", "The shipped model: fine-tuned and base weights averaged, the weight chosen on "
                                 "dev queries when given (merge/model)."),
                       ("rerank", "Train a cross-encoder reranker on the train split and gate it against the shipped "
                                  "embedder alone (rerank/model when it passes; needs rerank.enabled)."),
                       ("export", "Export the fine-tuned model to ONNX with a parity check (export/onnx), and a shipped "
                                  "reranker too (export/reranker).")]:
        p = sub.add_parser(name, help=text, description=text)
        _common(p)
        if name == "corpus":
            p.add_argument("--corpus", metavar="PATH", help="Same as --set corpus.path=PATH.")

    p = sub.add_parser("eval", help="Base vs fine-tuned metrics on the run's test split, or any BEIR folder.",
                       description="Without --beir: evaluate the run's test split (eval/metrics.json). With "
                                   "--beir DIR: evaluate that BEIR folder with --model (default: the base "
                                   "model) and write the metrics JSON to --out.")
    _common(p, out_help="Run directory; with --beir, the JSON file to write.")
    p.set_defaults(out=None)  # runs/latest without --beir; with --beir, only written when given
    p.add_argument("--beir", metavar="DIR", action="append", default=[],
                   help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/test.tsv (repeatable).")
    p.add_argument("--model", metavar="PATH", action="append", default=[],
                   help="Model to compare (repeatable): a packaged name, a sentence-transformers folder or an "
                        "exported ONNX folder (e.g. RUN/export/onnx). Default: the configured base model. "
                        "The first one is the baseline the others are compared with.")
    p.add_argument("--endpoint", metavar="URL", action="append", default=[],
                   help="A served endpoint to evaluate too (e.g. http://127.0.0.1:8000; repeatable).")
    p.add_argument("--report", metavar="DIR", help="With --beir: also write report.md, metrics.png and "
                   "per_query.parquet (one subfolder per dataset).")
    p.add_argument("--reranker", metavar="PATH", help="With --beir: a reranker folder (RUN/rerank/model, its ONNX export "
                   "RUN/export/reranker, or a cross-encoder folder) that reorders the last --model's top rerank.top_k hits: one more row, compared with that model too.")

    p = sub.add_parser("serve", help="Serve the exported model at /v1/embeddings (Ray Serve).",
                       description="Serve RUN_DIR/export/onnx over HTTP until Ctrl-C (host and port from "
                                   "serve.host / serve.port).")
    _common(p)
    p.add_argument("--once", action="store_true", help="Embed one query through the endpoint, then stop.")
    p.add_argument("--query", default=DEMO_QUERY, help="The query used with --once.")

    p = sub.add_parser("submit", help="Send a run to a Ray cluster as a Ray Job.",
                       description="Submit the whole run (no serving) to a Ray cluster through the Jobs API. "
                                   "--out must be a path every node of the cluster can read and write.")
    _common(p)
    p.add_argument("--corpus", metavar="PATH", help="Same as --set corpus.path=PATH (a path on the cluster, or a bucket).")
    p.add_argument("--address", default=os.environ.get("RAY_JOBS_ADDRESS", "http://127.0.0.1:8265"),
                   help="Ray Jobs API of the cluster's head (default: $RAY_JOBS_ADDRESS or http://127.0.0.1:8265).")
    p.add_argument("--follow", action="store_true", help="Stream the job's logs until it ends.")

    p = sub.add_parser("job", help="Status, logs or stop of a submitted run.",
                       description="Inspect or stop a run submitted with `retrofit submit`.")
    p.add_argument("action", choices=["status", "logs", "stop"], help="What to do with the job.")
    p.add_argument("job_id", help="The id `retrofit submit` printed.")
    p.add_argument("--address", default=os.environ.get("RAY_JOBS_ADDRESS", "http://127.0.0.1:8265"),
                   help="Ray Jobs API of the cluster's head (default: $RAY_JOBS_ADDRESS or http://127.0.0.1:8265).")

    p = sub.add_parser("query", help="Embed a text through a running endpoint, or rerank documents for it.",
                       description="Embed a text through a running endpoint and print the vector; with --rerank, "
                                   "print the given documents ranked for it by the endpoint's reranker instead. "
                                   "The bearer token, if the endpoint needs one, is read from $RETROFIT_API_KEY.")
    p.add_argument("text", help="Text to embed (with --rerank: the query).")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="Endpoint base URL.")
    p.add_argument("--rerank", nargs="+", metavar="DOCUMENT", help="Documents to rank for the text (/v1/rerank).")
    p.add_argument("--top-n", type=int, help="With --rerank: how many of the best to print (default: all).")

    p = sub.add_parser("migrate", help="Keep a run folder made by an older Retrofit (an older config schema).",
                       description="Stages made under config schema 1 (whose identity left default settings "
                                   "out) stop a run rather than be redone silently. This keeps them: it "
                                   "rewrites RUN_DIR/config.yaml in today's setting names and records each "
                                   "stage under that config, which you vouch is what made them. --config/--set "
                                   "replace the folder's config.yaml.")
    _common(p, force_flag=False)

    p = sub.add_parser("config", help="Show the resolved configuration.", description="Configuration tools.")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="Print the resolved config (defaults <- profile <- file <- --set).")
    show.add_argument("--config", metavar="FILE", help="YAML config file.")
    show.add_argument("--set", metavar="SECTION.FIELD=VALUE", action="append", default=[], dest="overrides",
                      help="Override one field (repeatable).")
    return parser


def _config(args):
    from pipeline.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "corpus", None):
        overrides.append(f"corpus.path={args.corpus}")
    if getattr(args, "example_queries", None):
        overrides.append(f"sdg.example_queries={args.example_queries}")
    if getattr(args, "dev_queries", None):
        overrides.append(f"merge.dev_queries={args.dev_queries}")
    return load_config(args.config, overrides)


def _check_eval_flags(args) -> None:
    """Flags that would otherwise be ignored without a word."""
    if not args.beir:
        given = [flag for flag, value in (("--model", args.model), ("--endpoint", args.endpoint),
                                          ("--report", args.report), ("--reranker", args.reranker)) if value]
        if given:
            raise RetrofitError(f"{given[0]} needs --beir DIR (without --beir, eval scores the run's own "
                                "base and fine-tuned models on its test split)")
    elif args.out and Path(args.out).is_dir():
        raise RetrofitError(f"--out {args.out}: with --beir, --out is the JSON file to write, and this is a folder")
    if args.reranker and not any(Path(args.reranker, f).exists() for f in ("config.json", "export.json")):
        raise RetrofitError(f"--reranker {args.reranker}: not a reranker folder (no config.json or export.json); "
                            "give a run's rerank/model, its export/reranker or a cross-encoder folder")


def _eval_beir(args, cfg) -> None:
    from pipeline.report import format_table, print_wins_and_losses, write_report
    from pipeline.retrieval import evaluate_models, reranked_label
    from pipeline.models import resolve_embedder
    from pipeline.storage import cache_dir
    from pipeline.ray_runtime import configure

    configure(cfg.ray)  # used past eval's Ray threshold
    models = {name: resolve_embedder(name) for name in (args.model or [cfg.train.base_model])}
    models.update({url: url for url in args.endpoint})
    baseline = next(iter(models))
    results = {}
    for beir in args.beir:
        name = Path(beir).resolve().name
        result = evaluate_models(beir, models, cfg.eval.top_k, cache_dir() / "eval", cfg.eval.texts_per_batch,
                                 reranker=args.reranker, rerank_top_k=cfg.rerank.top_k)
        print(f"\n{name} ({len(result.data.qrels)} queries, {len(result.data.corpus)} documents)")
        print(format_table(result.means))
        results[name] = result.means
        if args.report:
            out = Path(args.report) / name
            out.mkdir(parents=True, exist_ok=True)
            last = list(models)[-1]
            also = ((last, reranked_label(last)),) if args.reranker and last != baseline else ()
            summary = write_report(result, out, f"Retrieval on {name}", base=baseline, also=also)
            print(*summary["verdicts"], sep="\n")
            for other in [m for m in result.means if m != baseline and m not in result.references]:
                print_wins_and_losses(result, baseline, other)
            print(f"report: {out / 'report.md'}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        # One dataset: {model: metrics}; several: {dataset: {model: metrics}}.
        out.write_text(json.dumps(next(iter(results.values())) if len(results) == 1 else results, indent=2))
        print(f"wrote {out}")


def _migrate(args) -> None:
    import yaml

    from pipeline import runner
    from pipeline.config import dump_config, load_config, upgrade_config_data
    from pipeline.rundir import RunDir

    run = RunDir(args.out)
    saved = run.pull("config.yaml")
    if not args.config and not args.overrides:
        if not saved.exists():
            raise RetrofitError(f"{saved} is missing: give the run's settings with --config/--set")
        data = upgrade_config_data(yaml.safe_load(saved.read_text()) or {})
        saved.write_text(yaml.safe_dump(data, sort_keys=False))
        cfg = load_config(saved)
    else:
        cfg = _config(args)
    saved.write_text(dump_config(cfg))
    run.push("config.yaml")
    adopted = runner.adopt(cfg, run)
    print(f"{run.location}: " + (f"kept {', '.join(adopted)} under today's identity" if adopted else "nothing to migrate"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from pipeline.config import dump_config
    from pipeline.export import ParityError
    from pipeline.rundir import StageInputMissing

    ray_was_running = _ray_running()  # a caller's Ray (main() used as a library) is the caller's to stop
    try:
        if args.command == "config":
            print(dump_config(_config(args)), end="")
            return 0
        if args.command == "query":
            from serve.client import embed, rerank

            import requests

            from serve.client import EndpointError, embed, rerank

            token = os.environ.get("RETROFIT_API_KEY") or None
            try:
                if args.rerank:
                    ranked = rerank(args.url, args.text, args.rerank, top_n=args.top_n, return_documents=True,
                                    truncate="END", token=token)
                    print(json.dumps({"query": args.text, "results": ranked}, indent=2))
                    return 0
                vec = embed(args.url, [args.text], token=token)[0]
            except (EndpointError, requests.RequestException) as e:
                raise RetrofitError(f"--url {args.url}: {e}") from e
            print(json.dumps({"dimension": len(vec), "embedding": vec}))
            return 0
        if args.command == "job":
            from pipeline import submit

            if args.action == "status":
                print(json.dumps(submit.status(args.address, args.job_id), indent=2))
            elif args.action == "logs":
                print(submit.logs(args.address, args.job_id), end="")
            else:
                print("stopped" if submit.stop(args.address, args.job_id) else "already finished")
            return 0
        if args.command == "migrate":
            _migrate(args)
            return 0
        cfg = _config(args)
        if args.command == "submit":
            from pipeline import submit

            job_id = submit.submit(cfg, args.out, args.address)
            print(f"submitted {job_id} to {args.address}; run directory {args.out}", flush=True)
            if args.follow:
                final = submit.follow(args.address, job_id)
                print(f"job {job_id}: {final}")
                return 0 if final == "SUCCEEDED" else 1
            return 0
        if args.command == "eval":
            _check_eval_flags(args)
            if args.beir:
                _eval_beir(args, cfg)
                return 0
            args.out = args.out or "runs/latest"

        from pipeline import runner
        from pipeline.rundir import RunDir

        run = RunDir(args.out)
        if args.command == "run":
            done = runner.run_all(cfg, run, force=runner.parse_force(args.force))
            verdicts = json.loads((run.root / "eval" / "metrics.json").read_text())["verdicts"]
            if done["eval"] == "skipped":  # the eval stage printed its table when it ran; not twice
                print(f"\nBase vs fine-tuned on the synthetic test split ({run.location}/eval/report.md):")
                print((run.root / "eval" / "report.md").read_text().split("```")[1].strip())
            else:
                print(f"\nreport: {run.location}/eval/report.md")
            print(*verdicts, sep="\n")
            if not args.no_serve:
                runner.smoke_serve(cfg, run, args.query, keep_serving=args.keep_serving)
        elif args.command == "serve":
            runner.smoke_serve(cfg, run, args.query, keep_serving=not args.once)
        else:
            runner.run_stage(args.command, cfg, run, force=args.force)
        return 0
    # Bad input (config, corpus, BEIR folder, model, empty splits) raises RetrofitError with a message that
    # names the file or field: one line. Anything else is a bug or a library failing: its traceback stays.
    except (RetrofitError, StageInputMissing, ParityError) as e:
        if args.debug:
            raise
        print(f"retrofit: error: {e}", file=sys.stderr)
        return 2
    finally:
        if not ray_was_running and _ray_running():
            import ray

            ray.shutdown()


def _ray_running() -> bool:
    if "ray" not in sys.modules:  # never imported: nothing started it
        return False
    import ray

    return ray.is_initialized()


if __name__ == "__main__":
    sys.exit(main())
