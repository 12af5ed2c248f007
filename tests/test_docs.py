"""The documentation tells the truth about the repository.

* Every fenced ``bash`` block of every README pastes into bash: no line continues with ``\\`` after a
  ``# comment`` (bash would end the command there), and every ``python -m MODULE ARGS`` and
  ``torchrun ... -m MODULE ARGS`` line parses with that tool's own argparse parser. The tool is run
  as ``python -m`` would run it, with ``ArgumentParser.parse_args`` replaced by "parse, then stop",
  so nothing but the parser runs; ``python -c`` code must compile.
* Every repository path a README names (a markdown link, or a path starting with one of the
  repository's entries), every ``tests/...py::test_name`` and every dotted ``pmf_ref.`` / ``full.`` /
  ``toy.`` name in backticks exists.
* Every repository path named in a docstring or comment of the packages, the tutorials and the tests exists.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import re
import runpy
import shlex
import sys
import tokenize
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTPUT_FOLDERS = {"runs", "samples", "build", "dist"}   # what commands write (git-ignored): a README's example paths
TOP_ENTRIES = {path.name for path in ROOT.iterdir()
               if not path.name.startswith(".") and path.name not in OUTPUT_FOLDERS and not path.name.endswith(".egg-info")}
READMES = sorted({ROOT / "README.md", *ROOT.glob("*/README.md"), *ROOT.glob("*/*/README.md")})
SOURCE_FOLDERS = ("pmf_ref", "full", "toy", "tutorials", "tests")
PYTHONS = {"python", "python3", ".venv/bin/python"}
SHELL_OPERATORS = {"&&", "||", ";", "|"}

FENCE = re.compile(r"^```bash\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")
# A relative path: segments joined by "/", not glued to a longer path, a URL or a home folder.
PATH = re.compile(r"(?<![\w./~$:@-])((?:[\w.-]+/)+[\w.-]*)")
TEST_REF = re.compile(r"(tests/[\w/]+\.py)::(\w+)")
DOTTED = re.compile(r"`((?:pmf_ref|full|toy)(?:\.\w+)+)`")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ----------------------------------------------------------------------------- command blocks

def bash_commands(text: str) -> tuple[list[str], list[str]]:
    """The commands of every ``bash`` block (continued lines joined), and the lines whose ``\\`` follows a comment."""
    commands, broken = [], []
    for block in FENCE.findall(text):
        current = ""
        for line in block.splitlines():
            # "\ # note" escapes a space and starts a comment; "# note \" and "\ " end the line: the command stops.
            if re.search(r"\\\s+#", line) or re.search(r"(^|\s)#.*\\$", line) or re.search(r"\\[ \t]+$", line):
                broken.append(line)
            elif line.endswith("\\"):
                current += line[:-1] + " "
                continue
            current += line
            if current.strip():
                commands.append(current.strip())
            current = ""
        if current.strip():
            commands.append(current.strip())
    return commands, broken


def simple_commands(command: str) -> list[list[str]]:
    """``command`` split at ``&&``, ``||``, ``;`` and ``|``, each part as argv (comments dropped)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    parts, current = [], []
    for token in lexer:
        if token in SHELL_OPERATORS:
            parts.append(current)
            current = []
        else:
            current.append(token)
    parts.append(current)
    return [[word for word in part if not re.match(r"^[A-Z_]+=", word)] or part for part in parts if part]


class _Parsed(Exception):
    """Raised instead of running a tool once its command line has parsed."""


@contextlib.contextmanager
def _stop_after_parsing():
    original_parse_args = argparse.ArgumentParser.parse_args
    original_parse_known = argparse.ArgumentParser.parse_known_args
    state = {"inside": False}

    def parse_args(self, args=None, namespace=None):
        state["inside"] = True
        try:
            original_parse_args(self, args, namespace)
        finally:
            state["inside"] = False
        raise _Parsed

    def parse_known_args(self, args=None, namespace=None):
        result = original_parse_known(self, args, namespace)
        if not state["inside"]:   # a tool that parses with parse_known_args itself: stop it here too
            raise _Parsed
        return result

    argparse.ArgumentParser.parse_args = parse_args
    argparse.ArgumentParser.parse_known_args = parse_known_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original_parse_args
        argparse.ArgumentParser.parse_known_args = original_parse_known


def parse_error(module: str, args: list[str]) -> str | None:
    """None if ``python -m module *args`` parses (or asks for --help), else the tool's error."""
    if importlib.util.find_spec(module) is None:
        return f"no module {module}"
    saved_argv, stderr = sys.argv, io.StringIO()
    sys.argv = [module, *args]
    try:
        with _stop_after_parsing(), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except _Parsed:
        return None
    except SystemExit as exit_:
        return None if exit_.code in (0, None) else stderr.getvalue().strip() or f"exit {exit_.code}"
    finally:
        sys.argv = saved_argv
    return f"{module} ran to the end without parsing its command line"


def command_errors(argv: list[str]) -> list[str]:
    """What is wrong with one simple command: a python -m / torchrun line that does not parse, bad -c code."""
    if argv[0] in PYTHONS and len(argv) >= 2 and argv[1] == "-c":
        try:
            compile(argv[2], "<python -c>", "exec")
        except SyntaxError as error:
            return [f"python -c: {error}"]
        return []
    if argv[0] in PYTHONS and len(argv) >= 3 and argv[1] == "-m":
        if argv[2] in {"pip", "pytest"}:
            return []
        error = parse_error(argv[2], argv[3:])
        return [error] if error else []
    if argv[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                launch = get_args_parser().parse_args(argv[1:])
        except SystemExit:
            return [f"torchrun: {stderr.getvalue().strip()}"]
        if not launch.module:
            return ["torchrun without -m MODULE"]
        error = parse_error(launch.training_script, launch.training_script_args)
        return [error] if error else []
    return []


@pytest.mark.parametrize("readme", READMES, ids=_rel)
def test_every_command_block_pastes_into_bash(readme):
    commands, broken = bash_commands(readme.read_text())
    assert not broken, f"{_rel(readme)}: a line continues with '\\' after a comment or a space: {broken}"
    errors = [f"{command!r}: {error}" for command in commands
              for argv in simple_commands(command) for error in command_errors(argv)]
    assert not errors, f"{_rel(readme)}:\n" + "\n".join(errors)


# ----------------------------------------------------------------------------- paths and names

def missing_paths(text: str, folder: Path | None) -> list[str]:
    """Repository paths in ``text`` that do not exist: markdown links relative to ``folder``, and paths
    starting with an entry of the root or of ``folder`` (None: the root only), relative to either."""
    missing = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        if not ((folder or ROOT) / target.split("#")[0]).exists():
            missing.append(target)
    local = ({entry.name for entry in folder.iterdir()} - OUTPUT_FOLDERS) if folder is not None else set()
    for match in PATH.finditer(text):
        path = match[1].rstrip(".,:;")
        if "..." in path or text[match.end():match.end() + 1] in ("*", "{", "<") or not path:
            continue   # a pattern such as tests/test_toy_*.py, not a file name
        first = path.split("/")[0]
        if first in TOP_ENTRIES or first in local:
            if not any((root / path).exists() for root in (ROOT, folder) if root is not None):
                missing.append(path)
    for path, name in TEST_REF.findall(text):
        file = ROOT / path
        if not file.is_file() or not re.search(rf"^\s*def {name}\b", file.read_text(), re.M):
            missing.append(f"{path}::{name}")
    return sorted(set(missing))


def missing_names(text: str) -> list[str]:
    """Dotted names ``pmf_ref.x`` / ``full.m.x`` / ``toy.x`` in backticks that do not resolve."""
    missing = []
    for dotted in DOTTED.findall(text):
        parts, obj, found = dotted.split("."), None, True
        for index in range(len(parts), 0, -1):   # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:index]))
            except ImportError:
                continue
            for attribute in parts[index:]:
                if not hasattr(obj, attribute):
                    found = False
                    break
                obj = getattr(obj, attribute)
            break
        if obj is None or not found:
            missing.append(dotted)
    return missing


@pytest.mark.parametrize("readme", READMES, ids=_rel)
def test_every_path_and_name_a_readme_gives_exists(readme):
    text = readme.read_text()
    missing = missing_paths(text, readme.parent) + missing_names(text)
    assert not missing, f"{_rel(readme)} names what does not exist: {missing}"


def docstrings_and_comments(path: Path) -> str:
    source = path.read_text()
    texts = [token.string for token in tokenize.generate_tokens(io.StringIO(source).readline)
             if token.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            texts.append(ast.get_docstring(node) or "")
    return "\n".join(texts)


SOURCES = sorted(path for folder in SOURCE_FOLDERS for path in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("source", SOURCES, ids=_rel)
def test_every_path_a_docstring_or_comment_names_exists(source):
    missing = missing_paths(docstrings_and_comments(source), None)   # code names paths from the root
    assert not missing, f"{_rel(source)} names files that do not exist: {missing}"


# ----------------------------------------------------------------------------- the checks themselves

def test_a_comment_before_a_continuation_is_caught():
    text = "```bash\npython -m full.train --out runs/x \\   # a comment\n    --steps 10\n```\n"
    assert bash_commands(text)[1] == ["python -m full.train --out runs/x \\   # a comment"]


def test_an_unknown_flag_and_a_missing_module_are_caught():
    assert parse_error("full.sample", ["--no-such-flag"]) is not None
    assert parse_error("full.no_such_module", []) is not None
    assert parse_error("full.sample", ["--ckpt", "c.pt", "--out", "x"]) is None
    assert command_errors(["torchrun", "--nproc_per_node=8", "-m", "full.train", "--stepz", "3"])
    assert not command_errors(["torchrun", "--nproc_per_node=8", "-m", "full.train", "--steps", "3"])


def test_a_missing_path_and_a_stale_name_are_caught():
    assert missing_paths("see `tests/test_no_such_file.py` and [x](toy/nope.png)", ROOT) == [
        "tests/test_no_such_file.py", "toy/nope.png"]
    assert missing_paths("`tests/test_toy_*.py` and `tests/test_{path,loss}.py`", ROOT) == []
    assert missing_paths("`tests/test_docs.py::test_no_such_test`", ROOT) == ["tests/test_docs.py::test_no_such_test"]
    assert missing_paths("runs/toy/metrics.json and https://github.com/toy/x and ~/full/y", ROOT) == []
    assert missing_names("`pmf_ref.interpolate` `pmf_ref.no_such_function`") == ["pmf_ref.no_such_function"]
