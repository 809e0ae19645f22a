"""The docs site builds strictly, its reference pages cover every config field and CLI flag, and every command
the docs and the README show is one the real parser, config loader, Makefile and endpoint accept."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))

import hooks  # noqa: E402  (docs/hooks.py: the generators the build runs)

PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_the_site_builds_strictly_with_a_page_per_benchmark_result(site):
    for page in ("index.html", "reference/config/index.html", "reference/cli/index.html",
                 "reference/http/index.html", "reference/run-folder/index.html", "how-to/generator/index.html"):
        assert (site / page).exists(), page
    for result in (ROOT / "benchmarks" / "results").glob("*.json"):
        assert (site / "benchmarks" / result.stem / "index.html").exists(), result.name


def test_the_reference_names_every_config_field_and_cli_flag(site):
    config_page = (site / "reference" / "config" / "index.html").read_text()
    for row in hooks.config_fields():
        assert f"<code>{row['name']}</code>" in config_page, row["name"]
    cli_page = (site / "reference" / "cli" / "index.html").read_text()
    for name, parser in hooks.cli_commands().items():
        assert f"<code>{name}</code>" in cli_page, name
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in cli_page, f"{name} {flag}"
    http_page = (site / "reference" / "http" / "index.html").read_text()
    for status, _ in hooks.http_errors():
        assert f"<td>{status}</td>" in http_page


def test_a_field_or_flag_without_its_description_fails_the_build(monkeypatch):
    from pipeline.config import CorpusConfig

    monkeypatch.setattr(CorpusConfig.model_fields["max_docs"], "description", None)
    with pytest.raises(hooks.MissingReference, match="corpus.max_docs"):
        hooks.config_reference()
    monkeypatch.undo()

    from pipeline import cli

    real = cli.build_parser

    def with_a_bare_flag():
        parser = real()
        parser.add_argument("--undocumented")
        return parser

    monkeypatch.setattr(cli, "build_parser", with_a_bare_flag)
    with pytest.raises(hooks.MissingReference, match="--undocumented"):
        hooks.cli_reference()


def test_a_figure_is_read_from_its_result_file_and_a_wrong_key_fails():
    data = json.loads((ROOT / "benchmarks" / "results" / "scifact.json").read_text())
    page = hooks.FIGURE.sub(hooks._figure, "<!-- figure: scifact | human/base/ndcg@10 -->")
    assert page == f"{data['human']['base']['ndcg@10']:.4f}"
    with pytest.raises(hooks.MissingReference, match="no 'ndcg@11'"):
        hooks.FIGURE.sub(hooks._figure, "<!-- figure: scifact | human/base/ndcg@11 -->")


def shell_commands(page: Path) -> list[str]:
    """Each command line of the page's ```bash blocks (env assignments and trailing comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.DOTALL):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words = words[1:]
            if words:
                commands.append(words)
    return commands


def check_command(words: list[str], routes: set[str], make_targets: set[str]) -> None:
    from pipeline.cli import build_parser
    from pipeline.config import load_config

    tool = Path(words[0]).name
    if tool == "retrofit":
        args = build_parser().parse_args(words[1:])  # an unknown command or flag exits here
        load_config(getattr(args, "config", None), getattr(args, "overrides", []))  # a wrong field fails here
    elif tool == "make":
        assert set(words[1:]) <= make_targets, words
    elif tool == "curl":
        url = next(w for w in words if w.startswith("http"))
        assert re.sub(r"^https?://[^/]+", "", url) in routes, url
        if "-d" in words:
            json.loads(words[words.index("-d") + 1])
    elif tool == "python":
        assert (ROOT / words[1]).exists(), words
    else:
        raise AssertionError(f"a command the docs check does not know: {' '.join(words)}")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_the_docs_show_is_accepted(page):
    from serve.app import api

    routes = set(api.openapi()["paths"])
    make_targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    for words in shell_commands(page):
        try:
            check_command(words, routes, make_targets)
        except SystemExit as e:  # argparse's way of refusing
            raise AssertionError(f"{page.name}: `{' '.join(words)}` is refused by the parser ({e})") from None


def test_the_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 120
    for link in re.findall(r"\]\(([^)#]+)\)", readme):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link


def _numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def test_every_figure_in_the_readme_results_table_is_in_the_file_it_links():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Results"):readme.index("## Documentation")]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "](benchmarks/results/" in line]
    assert len(rows) >= 5
    for row in rows:
        _, figure, source, _ = row.rsplit("|", 3)
        path = ROOT / re.search(r"\]\(([^)]+)\)", source).group(1)
        known = _numbers(json.loads(path.read_text()))
        for text in re.findall(r"\d+\.\d+", figure):
            places = len(text.split(".")[1])
            assert any(round(x, places) == float(text) for x in known), f"{text} is not in {path.name}"
