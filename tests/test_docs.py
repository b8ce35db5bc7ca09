"""The documentation works as written.

* Every command in the READMEs' ``bash`` blocks and in the configs' header comments parses with the program
  it names: ``anomalib`` through anomalib's own CLI parser (one parser, built once, in this process),
  ``adtr-anomalib`` and ``python -m``/``python script.py`` through their argparse parsers (the program runs up
  to its ``parse_args`` and stops there), ``make`` as a dry run, ``pip install`` against the project's name
  and extras. A program the test does not know fails it, so no command goes unchecked.
* Every config file in ``configs/`` shows a command that loads it, so every config goes through its parser.
* The imports of every ``python`` snippet resolve.
* The README's parameter table gives every constructor argument of ADTR and ADTR+ with the code's default.
* The notebooks are committed without outputs, and the README links each one and its picture.
* A table marked ``<!-- results: FILE -->`` equals the table in FILE, the committed output of its command.

The notebooks themselves are executed by ``make test`` (``pytest --nbmake notebooks``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import json
import os
import re
import runpy
import shlex
import string
import subprocess
import sys
import warnings
from pathlib import Path

import jsonargparse
import pytest
from anomalib.cli import AnomalibCLI

from adtr_anomalib import ADTR, ADTRPlus, ADTRSettings
from adtr_anomalib.models.adtr.components.settings import PAPER_SETTINGS
from adtr_anomalib.models.adtr.lightning_base import constructor_parameters
from tests.conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

DOCS = [
    REPO / "README.md",
    REPO / "adtr_anomalib" / "models" / "adtr" / "README.md",
    REPO / "adtr_anomalib" / "models" / "adtr_plus" / "README.md",
    REPO / "benchmarks" / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROCESSOR_ARGUMENTS = {"pre_processor", "post_processor", "evaluator", "visualizer"}


# --- collecting the commands -------------------------------------------------------------------------------------


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def _command_lines(script: str) -> list[list[str]]:
    """Shell lines as argument lists: continuations joined, comments dropped, ``NAME=value`` lines substituted."""
    variables: dict[str, str] = {}
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 1 and re.fullmatch(r"[A-Z_]+=\S+", words[0]):
            name, value = words[0].split("=", 1)
            variables[name] = value
        elif words:
            commands.append([string.Template(word).substitute(variables) for word in words])
    return commands


def _config_header(path: Path) -> str:
    """The commands in a config's leading comment block: ``#   [1.] program ...`` lines and their continuations."""
    lines: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if not re.match(r"#\s{2,}\S", line):  # commands are indented; prose is not
            continue
        text = re.sub(r"^#\s*(?:\d+\.\s+)?", "", line)
        continued = bool(lines) and lines[-1].endswith("\\")
        if continued or _program(text.split()) in RUNNERS:
            lines.append(text)
    return "\n".join(lines)


def _documented_commands() -> list[tuple[str, list[str]]]:
    commands = []
    for doc in DOCS:
        for block in _blocks(doc.read_text(), "bash"):
            commands += [(doc.relative_to(REPO).as_posix(), argv) for argv in _command_lines(block)]
    for config in CONFIGS:
        commands += [(config.relative_to(REPO).as_posix(), argv) for argv in _command_lines(_config_header(config))]
    return commands


def _program(argv: list[str]) -> str:
    """The program a command line runs, after ``NAME=value`` environment prefixes and any ``.venv/bin/`` path."""
    words = [word for word in argv if not re.fullmatch(r"[A-Z_]+=\S*", word)]
    return Path(words[0]).name if words else ""


# --- checking one command ----------------------------------------------------------------------------------------


class _Parsed(Exception):  # noqa: N818 - a signal, not an error: argparse accepted the arguments
    pass


@pytest.fixture(scope="module")
def anomalib_parser():
    """anomalib's CLI parser, built once (building it costs seconds; parsing with it, milliseconds)."""
    return AnomalibCLI(args=["train", "--model", "ADTR", "--data", "MVTecAD"], run=False).parser


@pytest.fixture
def no_exec(monkeypatch: pytest.MonkeyPatch) -> None:
    """Programs run from the repository root, and nothing may replace this process (``os.exec*``)."""
    for name in ("execv", "execve", "execvp", "execvpe"):
        monkeypatch.setattr(os, name, lambda *args: None)
    monkeypatch.chdir(REPO)


def _parses_with_argparse(run, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a program up to its first ``parse_args`` (argparse or jsonargparse) and stop there."""

    def stop_after(original):
        def parse_and_stop(self, *args, **kwargs):
            raise _Parsed(original(self, *args, **kwargs))

        return parse_and_stop

    with monkeypatch.context() as patch:
        patch.setattr(sys, "argv", argv)
        for parser in (argparse.ArgumentParser, jsonargparse.ArgumentParser):
            patch.setattr(parser, "parse_args", stop_after(parser.parse_args))
        with pytest.raises(_Parsed):
            run()


def _check_make(args: list[str], **_: object) -> None:
    result = subprocess.run(["make", "-n", "-C", str(REPO), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def _check_pip(args: list[str], **_: object) -> None:
    assert args[0] in {"install", "wheel"}
    specs = [arg for arg in args[1:] if not arg.startswith("-")]
    assert specs
    for spec in specs:
        name, extras = re.fullmatch(r"([^\[]+)(?:\[(.*)\])?", spec).groups()
        assert name in {PYPROJECT["project"]["name"], "."}, spec
        unknown = {e.strip() for e in (extras or "").split(",") if e.strip()} - set(
            PYPROJECT["project"]["optional-dependencies"]
        )
        assert not unknown, f"{spec}: no such extra {unknown}"


def _check_anomalib(args: list[str], anomalib_parser, **_: object) -> None:
    anomalib_parser.parse_args(args)  # SystemExit with anomalib's message on any unknown or invalid argument


def _check_console_script(args: list[str], program: str, monkeypatch: pytest.MonkeyPatch, **_: object) -> None:
    module, function = PYPROJECT["project"]["scripts"][program].split(":")
    main = getattr(importlib.import_module(module), function)
    _parses_with_argparse(main, [program, *args], monkeypatch)


def _check_python(args: list[str], monkeypatch: pytest.MonkeyPatch, **_: object) -> None:
    if args[0] == "-m":
        with warnings.catch_warnings():  # runpy warns that the module is imported already: it runs it anew
            warnings.filterwarnings("ignore", ".* found in sys.modules", RuntimeWarning)
            _parses_with_argparse(lambda: runpy.run_module(args[1], run_name="__main__"), args[1:], monkeypatch)
    else:
        script = REPO / args[0]
        assert script.is_file(), f"{args[0]} does not exist"
        _parses_with_argparse(lambda: runpy.run_path(str(script), run_name="__main__"), args, monkeypatch)


def _check_bash(args: list[str], **_: object) -> None:
    script = REPO / args[0]
    assert script.is_file(), f"{args[0]} does not exist"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr  # what the script runs is tested beside the script's callee


RUNNERS = {
    "bash": _check_bash,
    "make": _check_make,
    "pip": _check_pip,
    "anomalib": _check_anomalib,
    "python": _check_python,
    **dict.fromkeys(PYPROJECT["project"]["scripts"], _check_console_script),
}
COMMANDS = _documented_commands()


@pytest.mark.parametrize(("source", "argv"), COMMANDS, ids=[f"{s}: {' '.join(a)[:80]}" for s, a in COMMANDS])
@pytest.mark.usefixtures("no_exec")
def test_documented_command_parses(source: str, argv: list[str], anomalib_parser, monkeypatch) -> None:
    program = _program(argv)
    assert program in RUNNERS, f"{source}: no check for the program of `{' '.join(argv)}`; add one to RUNNERS"
    args = argv[argv.index(next(w for w in argv if Path(w).name == program)) + 1 :]
    RUNNERS[program](args, program=program, anomalib_parser=anomalib_parser, monkeypatch=monkeypatch)


@pytest.mark.usefixtures("no_exec")
def test_the_checks_reject_what_the_programs_reject(anomalib_parser, monkeypatch) -> None:
    """The checks above are not vacuous: a misspelt argument fails each kind of program."""
    with pytest.raises(SystemExit):
        _check_anomalib(["train", "--model", "ADTR", "--model.hidden_dimm", "64"], anomalib_parser)
    with pytest.raises(SystemExit):
        _check_console_script(["demo", "--epoks", "2"], program="adtr-anomalib", monkeypatch=monkeypatch)
    with pytest.raises(SystemExit):
        _check_python(["-m", "adtr_anomalib.benchmark", "--modells", "adtr"], monkeypatch=monkeypatch)
    with pytest.raises(AssertionError):
        _check_make(["tset"])
    with pytest.raises(AssertionError):
        _check_pip(["install", "adtr-anomalib[ofline]"])


def test_every_config_shows_a_command_that_loads_it() -> None:
    """Each config's header names a command for it, so the test above loads every config through its parser."""
    shown = {Path(word).as_posix() for _, argv in COMMANDS for word in argv if word.endswith(".yaml")}
    missing = [c.relative_to(REPO).as_posix() for c in CONFIGS if c.relative_to(REPO).as_posix() not in shown]
    assert CONFIGS
    assert not missing, f"configs without a documented command: {missing}"


# --- Python snippets, parameters, notebooks ------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_python_snippets_compile_and_their_imports_resolve(doc: Path) -> None:
    snippets = _blocks(doc.read_text(), "python")
    for snippet in snippets:
        tree = ast.parse(snippet)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{doc.name}: {node.module} has no {alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)


def _parameter_table(section: str = "# Model parameters") -> dict[str, str]:
    """``parameter -> default`` from a table of the parameter guide (first two columns, in backticks)."""
    text = REPO.joinpath("docs", "parameters.md").read_text().split(section + "\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", text, flags=re.MULTILINE)
    return dict(rows)


@pytest.mark.parametrize("model", [ADTR, ADTRPlus], ids=lambda m: m.__name__)
def test_parameter_guide_lists_the_arguments_with_their_defaults(model: type) -> None:
    table = _parameter_table()
    parameters = {
        name: parameter.default
        for name, parameter in constructor_parameters(model).items()
        if name not in PROCESSOR_ARGUMENTS
    }
    assert set(parameters) <= set(table), f"not in docs/parameters.md: {sorted(set(parameters) - set(table))}"
    for name, default in parameters.items():
        assert ast.literal_eval(table[name]) == default, f"{name}: the guide says {table[name]}, code says {default!r}"


def test_parameter_guide_lists_every_setting_with_its_paper_value() -> None:
    table = _parameter_table("## Settings")
    settings = PAPER_SETTINGS
    assert list(table) == [field.name for field in dataclasses.fields(ADTRSettings)] == list(settings)
    for name, default in settings.items():
        assert ast.literal_eval(table[name]) == default, f"{name}: the guide says {table[name]}, code says {default!r}"


def test_notebooks_are_committed_without_outputs() -> None:
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_adtr_plus.ipynb",
        "03_export_and_deploy.ipynb",
        "04_benchmark.ipynb",
    ]
    for path in NOTEBOOKS:
        cells = [cell for cell in json.loads(path.read_text())["cells"] if cell["cell_type"] == "code"]
        assert cells, path.name
        dirty = [i for i, cell in enumerate(cells) if cell["outputs"] or cell["execution_count"] is not None]
        assert not dirty, f"{path.name}: code cells {dirty} have outputs; clear them before committing"


def test_readme_links_the_notebooks_and_its_picture() -> None:
    readme = REPO.joinpath("README.md").read_text()
    for path in NOTEBOOKS:
        assert f"(notebooks/{path.name})" in readme, f"README does not link {path.name}"
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", readme)
    assert pictures
    for picture in pictures:
        file = REPO / picture
        assert file.is_file(), picture
        assert file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{picture} is not a PNG"
        assert file.stat().st_size < 200_000, f"{picture} is {file.stat().st_size // 1024} KB; keep it under 200 KB"


CAPTION_METRICS = re.compile(
    r"image AUROC ([\d.]+), F1Max ([\d.]+), pixel AUROC ([\d.]+), AUPRO ([\d.]+); of the test images, ([\d.]+)% of "
    r"the good ones are flagged and ([\d.]+)% of their area outlined, and ([\d.]+)% of the defective ones flagged"
)
CAPTION_COLUMNS = (
    "image_AUROC",
    "image_F1Max",
    "pixel_AUROC",
    "pixel_AUPRO",
    "good_flagged_pct",
    "good_area_pct",
    "defects_flagged_pct",
)


def test_the_picture_s_caption_quotes_its_last_drawing() -> None:
    """The caption's numbers are those ``docs/make_figure.py`` recorded when it drew the picture (its last row)."""
    import pandas as pd

    caption = " ".join(REPO.joinpath("README.md").read_text().split())
    match = CAPTION_METRICS.search(caption)
    assert match, "the README's caption no longer quotes the demo's metrics in the form the test reads"
    last = pd.read_csv(REPO / "docs" / "adtr_metrics.csv").iloc[-1]
    for column, quoted in zip(CAPTION_COLUMNS, match.groups(), strict=True):
        assert float(quoted) == pytest.approx(float(last[column]), abs=1e-9), column


# --- tables copied from results files ------------------------------------------------------------------------------

RESULTS_MARKER = re.compile(r"<!-- results: (\S+) -->\n+((?:\|.*\n)+)")


def _table_lines(text: str) -> list[str]:
    """The lines of the first Markdown table in ``text``."""
    match = re.search(r"(?:^\|.*\n?)+", text, flags=re.MULTILINE)
    return match.group(0).strip().splitlines() if match else []


def _tables_differing_from_their_files(text: str) -> list[str]:
    """Each ``<!-- results: FILE -->``-marked table whose rows are not the first table of FILE, as a message."""
    problems = []
    for path, table in RESULTS_MARKER.findall(text):
        source = REPO / path
        if not source.is_file():
            problems.append(f"{path}: no such results file")
        elif table.strip().splitlines() != _table_lines(source.read_text()):
            problems.append(f"{path}: the table differs from the file; copy it again from the file")
    return problems


def test_tables_marked_with_a_results_file_equal_it() -> None:
    """A table of measured numbers is marked with the committed file its command wrote, and equals that file's."""
    readme = REPO.joinpath("README.md").read_text()
    assert RESULTS_MARKER.search(readme), "the README's measured comparison has no results marker"
    assert [problem for doc in DOCS for problem in _tables_differing_from_their_files(doc.read_text())] == []


def test_a_changed_number_in_a_marked_table_is_caught() -> None:
    """Negative control of the check above: one digit changed, or a file that is not there, fails it."""
    readme = REPO.joinpath("README.md").read_text()
    path, table = RESULTS_MARKER.search(readme).groups()
    changed = table.replace("0.9", "0.8", 1)
    assert changed != table
    assert _tables_differing_from_their_files(f"<!-- results: {path} -->\n{changed}")
    assert _tables_differing_from_their_files(f"<!-- results: missing/results.md -->\n{table}")


# --- links between the documents -----------------------------------------------------------------------------------


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped, spaces to hyphens)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def _broken_links(doc: Path) -> list[str]:
    broken = []
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.MULTILINE | re.DOTALL)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        missing_heading = bool(anchor) and file.suffix == ".md" and anchor not in _anchors(file)
        if not file.exists() or missing_heading:
            broken.append(target)
    return broken


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_and_anchors_resolve(doc: Path) -> None:
    assert _broken_links(doc) == []


def test_a_broken_link_is_caught(tmp_path: Path) -> None:
    """Negative control: a missing file and a missing heading are both reported."""
    (tmp_path / "other.md").write_text("# Some heading\n")
    doc = tmp_path / "doc.md"
    doc.write_text("[a](other.md#some-heading) [b](missing.md) [c](other.md#no-such-heading) [d](#local)\n# Local\n")
    assert _broken_links(doc) == ["missing.md", "other.md#no-such-heading"]
