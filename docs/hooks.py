"""MkDocs hooks: the reference pages and the benchmark pages are written at build time from the code and
from benchmarks/results/*.json, so no option, flag, status code or figure in the docs is typed by hand.

A page asks for a generated block with a marker line, e.g. `<!-- generated: config -->`. A config field or a
CLI flag without its one-line description fails the build (and with it `mkdocs build --strict` in the tests).
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.MULTILINE)
# An inline figure read from a result file: `<!-- figure: training-gpu | ours_over_st_examples_per_s -->`, the
# key path split on "/" (keys hold dots and spaces: `human/fine-tuned/ndcg@10`).
FIGURE = re.compile(r"<!-- figure: (\S+) \| (.+?) -->")


class MissingReference(ValueError):
    pass


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def config_fields() -> list[dict]:
    """Every config field as section.field with its type, default, range and description."""
    from pydantic import BaseModel

    from pipeline.config import RetrofitConfig

    rows = []

    def walk(model: BaseModel, prefix: str) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value, f"{prefix}{name}.")
                continue
            bounds = [f"{op} {getattr(m, attr)}" for m in field.metadata
                      for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if hasattr(m, attr)]
            kind = re.sub(r"typing\.|<class '|'>", "", str(field.annotation))
            rows.append({"name": prefix + name, "type": kind, "default": json.dumps(value, default=str),
                         "range": ", ".join(bounds), "description": field.description or ""})

    walk(RetrofitConfig(), "")
    return rows


def config_reference() -> str:
    rows = config_fields()
    missing = [r["name"] for r in rows if not r["description"]]
    if missing:
        raise MissingReference(f"config fields without a description (pipeline/config.py): {missing}")
    out, section = [], None
    for r in rows:
        head = r["name"].split(".")[0] if "." in r["name"] else "top level"
        if head != section:
            section = head
            out += ["", f"### {section}", "", "| field | type | default | range | description |", "|---|---|---|---|---|"]
        out.append(f"| `{r['name']}` | {_cell(r['type'])} | `{_cell(r['default'])}` | {r['range']} | {_cell(r['description'])} |")
    return "\n".join(out)


def cli_commands() -> dict[str, argparse.ArgumentParser]:
    from pipeline.cli import build_parser

    parser = build_parser()
    commands = {"retrofit": parser}
    for action in parser._actions:  # argparse has no public walk over its subcommands
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                commands[f"retrofit {name}"] = sub
                for inner in sub._actions:
                    if isinstance(inner, argparse._SubParsersAction):
                        commands.update({f"retrofit {name} {n}": p for n, p in inner.choices.items()})
    return commands


def cli_reference() -> str:
    out, missing = [], []
    for name, parser in cli_commands().items():
        out += ["", f"### `{name}`", "", parser.description or "", "", "```", parser.format_usage().strip(), "```", ""]
        # positionals and flags; a subcommand's own choice is its heading, not a row
        args = [a for a in parser._actions if a.help != argparse.SUPPRESS
                and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
        if args:
            out += ["| argument | default | what it does |", "|---|---|---|"]
        for a in args:
            label = ", ".join(a.option_strings) or a.metavar or a.dest
            if not a.help:
                missing.append(f"{name} {label}")
            default = "" if a.default in (None, False, argparse.SUPPRESS) else f"`{_cell(a.default)}`"
            choices = f" ({' / '.join(map(str, a.choices))})" if a.choices and not a.option_strings else ""
            out.append(f"| `{label}` | {default} | {_cell((a.help or '') + choices)} |")
    if missing:
        raise MissingReference(f"CLI flags without help (pipeline/cli.py): {missing}")
    return "\n".join(out)


def http_errors() -> list[tuple[int, str]]:
    """(status, message) of every `_error(STATUS, "...")` the endpoint can answer, read from serve/app.py, and
    every `BadRequest(STATUS, "...")` of the rerank request checks (serve/rerank_request.py)."""
    found = []
    for module, call in (("app.py", "_error"), ("rerank_request.py", "BadRequest")):
        for node in ast.walk(ast.parse((ROOT / "serve" / module).read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == call and node.args
                    and isinstance(node.args[0], ast.Constant)):
                found.append((int(node.args[0].value), " ".join(_message(node.args[1]).split())))
    return sorted(set(found))


def http_reference() -> str:
    from serve.app import api

    schema = api.openapi()
    out = ["| method | path | what it does |", "|---|---|---|"]
    for path, ops in sorted(schema["paths"].items()):
        for method, op in ops.items():
            out.append(f"| {method.upper()} | `{path}` | {_cell(op.get('description') or op.get('summary') or '')} |")
    out += ["", "Errors (each a JSON body `{\"error\": {\"message\", \"type\"}}`):", "",
            "| status | message |", "|---|---|"]
    out += [f"| {status} | {_cell(message)} |" for status, message in http_errors()]
    return "\n".join(out)


def _flatten(value, prefix="", depth=0) -> list[tuple[str, object]]:
    if isinstance(value, dict) and depth < 4:
        return [kv for k, v in value.items() for kv in _flatten(v, f"{prefix}{k}." if prefix or k else k, depth + 1)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(prefix.rstrip("."), value)]
    return []


def benchmark_page(path: Path) -> str:
    data = json.loads(path.read_text())
    skip = ("config", "machine", "stage_timings", "stage_counts", "synthetic")
    figures = [(k, v) for k, v in _flatten({k: v for k, v in data.items() if k not in skip})]
    machine = data.get("machine", {})
    out = [f"# {path.stem}", "", f"Source: `benchmarks/results/{path.name}` (rendered at build time; its story and "
           "history: `benchmarks/README.md` and git).", ""]
    if data.get("command"):
        out += ["Command:", "", "```", str(data["command"]), "```", ""]
    out += [f"Machine: {_cell(machine.get('processor', '?'))}, {machine.get('cpus', '?')} CPUs, "
            f"{machine.get('memory_gib', '?')} GiB, GPU {machine.get('gpu') or 'none'}; run {data.get('date', '?')}.", "",
            "| figure | value |", "|---|---|"]
    out += [f"| `{_cell(k)}` | {v:.4g} |" if isinstance(v, float) else f"| `{_cell(k)}` | {v} |" for k, v in figures[:400]]
    return "\n".join(out)


def _comments(path: Path, cls: str) -> dict[str, str]:
    """`name: type = default  # comment` lines of a dataclass: its fields' one-line descriptions."""
    source = path.read_text()
    body = source[source.index(f"class {cls}"):]
    return dict(re.findall(r"^    (\w+): [^#\n]*# (.+)$", body.split("\n\n    def ")[0], re.MULTILINE))


def run_folder_reference() -> str:
    from dataclasses import fields

    from pipeline.rundir import LAYOUT, Manifest

    out = ["| path | what it holds |", "|---|---|"]
    out += [f"| `RUN/{path}` | {_cell(what)} |" for path, what in LAYOUT.items()]
    comments = _comments(ROOT / "pipeline" / "rundir.py", "Manifest")
    missing = [f.name for f in fields(Manifest) if f.name not in comments]
    if missing:
        raise MissingReference(f"Manifest fields without a comment (pipeline/rundir.py): {missing}")
    out += ["", "Every stage folder's `manifest.json`:", "", "| key | what it holds |", "|---|---|"]
    out += [f"| `{f.name}` | {_cell(comments[f.name])} |" for f in fields(Manifest)]
    return "\n".join(out)


def _message(node: ast.expr) -> str:
    """A raised error's message as written, its f-string fields shown as {...}."""
    if isinstance(node, ast.Constant):
        return str(node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(str(v.value) if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + "}"
                       for v in node.values)
    if isinstance(node, ast.BinOp):
        return _message(node.left) + _message(node.right)
    return "{" + ast.unparse(node) + "}"


BAD_INPUT_ERRORS = ("RetrofitError", "ConfigError", "BeirFormatError", "CorpusError")


def bad_input_reference() -> str:
    """Every bad-input error the pipeline raises (RetrofitError and its kinds), read from the code, by module."""
    out = ["| where | message (exit 2, one line) |", "|---|---|"]
    for path in sorted((ROOT / "pipeline").glob("*.py")):
        raises = sorted((n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Raise)),
                        key=lambda n: n.lineno)
        for node in raises:
            if (isinstance(node.exc, ast.Call) and node.exc.args
                    and getattr(node.exc.func, "id", "") in BAD_INPUT_ERRORS):
                text = " ".join(_message(node.exc.args[0]).split())
                out.append(f"| `{path.relative_to(ROOT)}:{node.lineno}` | {_cell(text[:300])} |")
    return "\n".join(out)


def _figure(match: re.Match) -> str:
    path = RESULTS / f"{match.group(1)}.json"
    if not path.exists():
        raise MissingReference(f"figure from {path.name}: no such result file")
    value = json.loads(path.read_text())
    for key in match.group(2).split("/"):
        if not isinstance(value, dict) or key not in value:
            raise MissingReference(f"figure {match.group(2)!r}: {path.name} has no {key!r}")
        value = value[key]
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.4g}"
    return str(value)


GENERATORS = {"config": config_reference, "cli": cli_reference, "http": http_reference,
              "run-folder": run_folder_reference, "bad-input": bad_input_reference}


def on_config(config):
    """The benchmark pages go into the nav under Benchmarks, one per result file."""
    for i, entry in enumerate(config["nav"]):
        if isinstance(entry, dict) and "Benchmarks" in entry:
            config["nav"][i] = {"Benchmarks": ["benchmarks/index.md",
                                               *(f"benchmarks/{p.stem}.md" for p in sorted(RESULTS.glob("*.json")))]}
    return config


def on_files(files, config):
    """One page per benchmark result file, under benchmarks/."""
    from mkdocs.structure.files import File

    for path in sorted(RESULTS.glob("*.json")):
        files.append(File.generated(config, f"benchmarks/{path.stem}.md", content=benchmark_page(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == "benchmarks/index.md":
        links = "\n".join(f"- [{p.stem}]({p.stem}.md)" for p in sorted(RESULTS.glob("*.json")))
        markdown = markdown.replace("<!-- generated: benchmark-list -->", links)
    markdown = MARKER.sub(lambda m: GENERATORS[m.group(1)](), markdown)
    return FIGURE.sub(_figure, markdown)
