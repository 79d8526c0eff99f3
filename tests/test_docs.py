"""The documents show only commands the CLI has, and their links lead somewhere.

Every fenced command of README.md and docs/*.md that starts with ``cnclip-kd `` (or runs ``-m cnclip_kd.cli``,
as torchrun does) is checked against the real argparse parser, :func:`cnclip_kd.cli.build_parser`: the
sub-command must exist and so must each ``--flag`` (and ``-k``-style short option) for that sub-command, spelt out
in full. Positional arguments and values are not checked (they are paths and placeholders). No subprocess: one
parser, built once.
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

from cnclip_kd.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOC_FILES = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [README, *DOC_FILES]

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
_SHELL_OPERATORS = {";", "&&", "||", "|", "&"}
_PLACEHOLDERS = {"...", "…"}
_OPTION = re.compile(r"^(--[A-Za-z0-9][\w-]*|-[A-Za-z])(=.*)?$")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


@dataclass(frozen=True)
class Command:
    """One documented CLI invocation: where it is, its text, and the argv after the program name."""

    where: str
    text: str
    argv: tuple[str, ...]


def fenced_lines(text: str) -> list[tuple[int, str]]:
    """Logical lines inside fenced code blocks, as ``(first line number, line)``: a line ending in ``\\``
    continues on the next one (joined with a space), as the shell reads it."""
    out: list[tuple[int, str]] = []
    fence: str | None = None
    pending: tuple[int, str] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
            continue
        if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                and not line.strip()[len(match.group(1)):].strip():
            if pending:
                out.append(pending)
            fence, pending = None, None
            continue
        start, joined = pending if pending else (number, "")
        body = line.rstrip()
        if body.endswith("\\"):
            pending = (start, f"{joined} {body[:-1].strip()}".strip())
        else:
            pending = None
            out.append((start, f"{joined} {body.strip()}".strip()))
    return out


def _tokens(line: str) -> list[str]:
    """Shell words of one line, without a trailing ``# comment``, cut at the first shell operator."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        words = list(lexer)
    except ValueError:  # unbalanced quotes in a sketch: fall back to plain words
        words = line.split("#", 1)[0].split()
    for i, word in enumerate(words):
        if word in _SHELL_OPERATORS:
            return words[:i]
    return words


def cli_argv(line: str) -> list[str] | None:
    """The argv after ``cnclip-kd`` (or ``-m cnclip_kd.cli``) when the line runs the CLI, else None."""
    stripped = line.lstrip()
    if stripped.startswith("$ "):
        stripped = stripped[2:].lstrip()
    if stripped.startswith("cnclip-kd "):
        return _tokens(stripped)[1:]
    if "-m cnclip_kd.cli " in stripped:
        words = _tokens(stripped)
        for i in range(len(words) - 1):
            if words[i] == "-m" and words[i + 1] == "cnclip_kd.cli":
                return words[i + 2:]
    return None


def documented_commands(text: str, where: str) -> list[Command]:
    """Every fenced CLI command in one Markdown text."""
    commands = []
    for number, line in fenced_lines(text):
        argv = cli_argv(line)
        if argv is not None:
            commands.append(Command(f"{where}:{number}", line, tuple(argv)))
    return commands


@lru_cache(maxsize=1)
def _parsers() -> tuple[dict[str, argparse.ArgumentParser], frozenset[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    global_options = frozenset(parser._option_string_actions)
    return dict(sub.choices), global_options


def check_command(argv: tuple[str, ...] | list[str]) -> list[str]:
    """What is wrong with one documented invocation: an unknown sub-command or an option its parser lacks."""
    subparsers, global_options = _parsers()
    words = [w for w in argv if w not in _PLACEHOLDERS]
    i = 0
    while i < len(words) and words[i].startswith("-"):
        if words[i].split("=", 1)[0] not in global_options:
            return [f"unknown option {words[i]!r} before the sub-command"]
        i += 1
    if i == len(words):
        return ["no sub-command"]
    command = words[i]
    if command not in subparsers:
        return [f"unknown sub-command {command!r} (known: {', '.join(sorted(subparsers))})"]
    known = set(subparsers[command]._option_string_actions) | global_options
    errors = []
    for word in words[i + 1:]:
        word = word.strip("[]()")
        match = _OPTION.match(word)
        if match and match.group(1) not in known:
            errors.append(f"`cnclip-kd {command}` has no option {match.group(1)!r}")
    return errors


def _all_commands() -> list[Command]:
    return [c for path in DOCUMENTS
            for c in documented_commands(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]


# ---------------------------------------------------------------------------------------------- the documents


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_commands_exist_with_their_flags(path: Path):
    commands = documented_commands(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    problems = [f"{c.where}: {err}\n    {c.text}" for c in commands for err in check_command(c.argv)]
    assert not problems, "commands the CLI does not have:\n" + "\n".join(problems)


def test_every_sub_command_is_documented():
    commands = _all_commands()
    assert len(commands) >= 20, f"only {len(commands)} fenced cnclip-kd commands found: is the extraction broken?"
    subparsers, _ = _parsers()
    shown = {next((w for w in c.argv if not w.startswith("-")), None) for c in commands}
    missing = sorted(set(subparsers) - shown)
    assert not missing, f"no fenced example of: {missing}"


def test_readme_keeps_the_install_and_test_commands():
    text = README.read_text(encoding="utf-8")
    assert "## 安装与测试 Install and test" in text
    section = text.split("## 安装与测试 Install and test", 1)[1].split("\n## ", 1)[0]
    lines = [line for _, line in fenced_lines(section)]
    assert 'pip install -e ".[dev]"' in lines and "python -m pytest -q" in lines


def _relative_links(path: Path) -> list[str]:
    targets = _LINK.findall(path.read_text(encoding="utf-8"))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, flags=re.I) and not t.startswith("#")]


def test_readme_links_resolve_and_reach_every_doc():
    links = _relative_links(README)
    broken = [t for t in links if not (ROOT / t.split("#", 1)[0]).is_file()]
    assert not broken, f"README.md links to missing files: {broken}"
    linked = {(ROOT / t.split("#", 1)[0]).resolve() for t in links}
    assert any(t.startswith("docs/") for t in links)
    orphans = [str(p.relative_to(ROOT)) for p in DOC_FILES if p.resolve() not in linked]
    assert not orphans, f"docs the README does not link to: {orphans}"


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_doc_links_resolve(path: Path):
    broken = [t for t in _relative_links(path) if not (path.parent / t.split("#", 1)[0]).is_file()]
    assert not broken, f"{path.relative_to(ROOT)} links to missing files: {broken}"


_MODULE_PATH = re.compile(r"\bcnclip_kd(?:/[A-Za-z_][\w]*)+(?:\.py)?")
_DOTTED = re.compile(r"\bcnclip_kd(?:\.[A-Za-z_]\w*)+")


def _top_level_names(module_file: Path) -> set[str]:
    import ast

    names: set[str] = set()
    for node in ast.parse(module_file.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def resolves(dotted: str) -> bool:
    """Whether ``cnclip_kd.a.b.name`` names a package, a module, or a name a face or module defines
    (read from the source or the face's ``__all__``: nothing heavy is imported)."""
    import importlib

    parts = dotted.split(".")
    here = ROOT
    for i, part in enumerate(parts):
        if (here / part).is_dir():
            here = here / part
        elif (here / f"{part}.py").is_file():
            here = here / f"{part}.py"
        elif here.is_dir():  # a name the package's face lists
            return part in getattr(importlib.import_module(".".join(parts[:i])), "__all__", [])
        else:  # a name the module defines (attributes of it are not checked)
            return part in _top_level_names(here)
    return True


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_paths_in_the_prose_exist(path: Path):
    text = path.read_text(encoding="utf-8")
    stale = sorted({p for p in _MODULE_PATH.findall(text) if not (ROOT / p).exists()}
                   | {d for d in _DOTTED.findall(text) if not resolves(d)})
    assert not stale, f"{path.relative_to(ROOT)} names modules or names that do not exist: {stale}"


def test_changelog_new_import_paths_exist():
    rows = [line.split("|") for line in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| `cnclip_kd")]
    assert len(rows) >= 20, "the CHANGELOG's old → new table is missing"
    stale = sorted({d for row in rows for d in _DOTTED.findall(row[2]) if not resolves(d)})
    assert not stale, f"CHANGELOG.md points to import paths that do not exist: {stale}"


# ----------------------------------------------------------------------------------------- the checker itself


def test_checker_accepts_real_flags_and_rejects_misspelt_ones():
    assert check_command(["serve", "--index", "i", "--model", "m.onnx", "[--workers", "1]"]) == []
    assert check_command(["-v", "search", "--index", "i", "--text", "连衣裙", "-k", "10"]) == []
    assert check_command(["train", "...", "--kd_loss_weight", "5", "--kd-loss=relation", "--no-teacher-cache"]) == []
    misspelt = check_command(["serve", "--index", "i", "--modle", "m.onnx"])
    assert misspelt == ["`cnclip-kd serve` has no option '--modle'"]
    assert check_command(["sevre", "--index", "i"])[0].startswith("unknown sub-command 'sevre'")
    # a flag of another sub-command, and an abbreviation argparse itself would accept, are both refused
    assert check_command(["prepare", "src", "out", "--int8"]) == ["`cnclip-kd prepare` has no option '--int8'"]
    assert check_command(["plan", "--budget", "50"]) == ["`cnclip-kd plan` has no option '--budget'"]


def test_extraction_joins_continued_lines_and_reads_only_fences():
    text = "\n".join([
        "Inline `cnclip-kd index --bogus` is prose, not a fenced command.",
        "",
        "```bash",
        "cnclip-kd export CKPT out.onnx --int8 \\",
        "  --text-ot out/text.onnx   # misspelt on the continued line",
        "torchrun --nproc_per_node 8 -m cnclip_kd.cli index CKPT out --data d --chunksize 4",
        "curl -s http://127.0.0.1:8000/healthz",
        "```",
    ])
    commands = documented_commands(text, "snippet.md")
    assert [c.where for c in commands] == ["snippet.md:4", "snippet.md:6"]
    assert commands[0].argv == ("export", "CKPT", "out.onnx", "--int8", "--text-ot", "out/text.onnx")
    assert check_command(commands[0].argv) == ["`cnclip-kd export` has no option '--text-ot'"]
    assert check_command(commands[1].argv) == ["`cnclip-kd index` has no option '--chunksize'"]


def test_path_checker_knows_old_modules_from_new():
    assert resolves("cnclip_kd.deploy.Retriever") and resolves("cnclip_kd.distill.trainer.train")
    assert resolves("cnclip_kd.core.lazy.lazy_face") and resolves("cnclip_kd.cli")
    assert not resolves("cnclip_kd.train.train") and not resolves("cnclip_kd.deploy.Retreiver")
    assert not resolves("cnclip_kd.record.record") and not resolves("cnclip_kd.serve")
