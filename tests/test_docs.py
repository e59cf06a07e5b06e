"""The README and docs/*.md: every relative link and image exists, and every command in their
shell code blocks (```bash / sh / shell) names a real script or module and only flags
that the command's --help lists. The code cites only pages of docs/ and section names those
pages have, and requirements.txt lists exactly the packages the project imports.

A command is read like the shell reads it: `\\` continues a line, `#` starts a comment, leading
VAR=value words set the environment, `&&`, `||`, `;` and `|` separate commands. Programs:
    python [-m MODULE | SCRIPT.py] ...        flags checked against that target's --help
    torchrun [torchrun flags] (SCRIPT.py | -m MODULE) ...   torchrun's flags against torchrun's --help
    bash / sh / sbatch WRAPPER ...            (or a path to the wrapper) flags checked against what
                                              the wrapper forwards "$@" to (followed through wrappers)
    OTHER_PROGRAMS                            named only, not checked
Each target's --help runs once, all of them in one child process of this interpreter.
"""
import ast
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHELL_BLOCKS = {"bash", "sh", "shell"}
OTHER_PROGRAMS = {"cd", "git", "ls", "cat", "pip", "nvidia-smi"}
PYTHONS = {"python", "python3", ".venv/bin/python"}
WRAPPER_RUNNERS = {"bash", "sh", "sbatch"}
SEPARATORS = {"&&", "||", ";", "|"}
PLACEHOLDER = "..."  # "the rest of the command as above"
HELP_TIMEOUT_S = 180


def markdown_files() -> list:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# ---------------------------------------------------------------------------------------
# Markdown reading
# ---------------------------------------------------------------------------------------
FENCE = re.compile(r"^(```|~~~)\s*([\w+-]*)[^\n]*\n(.*?)^\1\s*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
HTML_SOURCE = re.compile(r"<(?:img|a|source)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.I)


def code_blocks(text: str) -> list:
    """[(info word, body)] of the fenced code blocks."""
    return [(m.group(2).lower(), m.group(3)) for m in FENCE.finditer(text)]


def link_targets(text: str) -> list:
    """Targets of inline links, images, reference definitions and HTML src/href, outside code."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    return [t for pattern in (LINK, REFERENCE, HTML_SOURCE) for t in pattern.findall(prose)]


def broken_links(md: Path, text: str) -> list:
    """Relative targets of `text` (a file at `md`) that do not exist; URLs and anchors skipped."""
    missing = []
    for target in link_targets(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        resolved = (ROOT / path.lstrip("/")) if path.startswith("/") else (md.parent / path)
        if not resolved.exists():
            missing.append(target)
    return missing


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """What --help is asked of: a script (path relative to the root) or a module."""
    kind: str  # "script" | "module"
    name: str

    def missing(self) -> bool:
        if self.kind == "script":
            return not (ROOT / self.name).is_file()
        parts = self.name.split(".")
        base = ROOT.joinpath(*parts)
        if base.with_suffix(".py").is_file() or (base / "__main__.py").is_file():
            return False
        if (ROOT / parts[0]).exists():  # a project package without that module
            return True
        return find_spec(parts[0]) is None  # an installed module (pytest, torch, ...)


TORCHRUN = Target("module", "torch.distributed.run")


@dataclass
class Checked:
    """One command: the line it came from, its targets and the flags each target must accept."""
    line: str
    errors: list = field(default_factory=list)
    flags: dict = field(default_factory=dict)  # Target -> [flag]

    def expect(self, target: Target, words: list) -> None:
        self.flags.setdefault(target, []).extend(flag_names(words))


def logical_lines(block: str) -> list:
    """The block's commands: continuations joined; `$ ` prompts, comment lines and blank lines dropped."""
    lines, current = [], ""
    for raw in block.splitlines():
        line = re.sub(r"^\s*\$\s+", "", raw) if not current else raw
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip() and not current.lstrip().startswith("#"):
            lines.append(current.strip())
        current = ""
    if current.strip() and not current.lstrip().startswith("#"):
        lines.append(current.strip())
    return lines


def split_commands(line: str) -> list:
    """A logical line -> the word lists of its commands (comments and env assignments removed)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    commands, words = [], []
    for word in lexer:
        if word in SEPARATORS:
            commands.append(words)
            words = []
        else:
            words.append(word)
    commands.append(words)
    out = []
    for words in commands:
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words = words[1:]
        if words:
            out.append(words)
    return out


def flag_names(words: list) -> list:
    """The option words of an argument list (`--x=1` -> `--x`); negative numbers and `...` are not flags."""
    return [w.split("=", 1)[0] for w in words
            if w.startswith("-") and w != "-" and not re.match(r"^-\d", w) and w != PLACEHOLDER]


def python_target(words: list) -> tuple:
    """Words after the interpreter (or torchrun's own flags) -> (Target or None, rest of the words)."""
    for i, w in enumerate(words):
        if w in ("-m", "--module") and i + 1 < len(words):
            return Target("module", words[i + 1]), words[i + 2:]
        if w.endswith(".py"):
            return Target("script", w), words[i + 1:]
    return None, words


def strip_root_variable(word: str) -> str:
    """`"$REPO/train_c2i.py"` or `${SLURM_SUBMIT_DIR:-.}/train_c2i.py` -> `train_c2i.py`."""
    return re.sub(r"^\$(\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*)/", "", word)


@lru_cache(maxsize=None)
def forwarded_to(wrapper: str) -> tuple:
    """The command a shell wrapper passes "$@" to: ("python" | "torchrun" | "wrapper", Target or
    wrapper path, the wrapper's own flags before "$@"). ValueError if it forwards nothing."""
    text = (ROOT / wrapper).read_text()
    for line in logical_lines(text):
        if '"$@"' not in line:
            continue
        for command in split_commands(line.replace('"$@"', "FORWARDED")):
            if "FORWARDED" not in command:
                continue
            words = [strip_root_variable(w) for w in command[:command.index("FORWARDED")]]
            for i, w in enumerate(words):
                if w.endswith((".sh", ".sbatch")):
                    beside = (Path(wrapper).parent / Path(w).name).as_posix()  # "$(dirname "$0")/x.sh" and the like
                    return "wrapper", w if (ROOT / w).is_file() else beside, words[i + 1:]
                if w.endswith("torchrun"):
                    target, rest = python_target(words[i + 1:])
                    if target:
                        return "torchrun", target, rest
                if w.endswith(".py") or w in ("-m", "--module"):
                    target, rest = python_target(words[i:])
                    return "python", target, rest
    raise ValueError(f"{wrapper} passes its arguments to no python script, module or wrapper")


def check_command(words: list, checked: Checked) -> None:
    """Record in `checked` what `words` (one command) runs and which flags it must accept."""
    program, args = words[0], words[1:]
    if program in OTHER_PROGRAMS:
        return
    if program in PYTHONS:
        target, rest = python_target(args)
        if target is None:
            checked.errors.append(f"{program} runs no script or module")
            return
        check_target(target, rest, checked)
        return
    if program == "torchrun":
        target, rest = python_target(args)
        if target is None:
            checked.errors.append("torchrun launches no script or module")
            return
        checked.expect(TORCHRUN, args[:len(args) - len(rest) - (2 if target.kind == "module" else 1)])
        check_target(target, rest, checked)
        return
    if program in WRAPPER_RUNNERS:
        if not args:
            checked.errors.append(f"{program} runs no script")
            return
        program, args = args[0], args[1:]
    if program.endswith((".sh", ".sbatch")):
        check_wrapper(program, args, checked)
        return
    checked.errors.append(f"unknown program {program!r} (add it to OTHER_PROGRAMS if it is not ours)")


def check_target(target: Target, args: list, checked: Checked) -> None:
    if target.missing():
        checked.errors.append(f"no such {target.kind}: {target.name}")
        return
    checked.expect(target, args)


def check_wrapper(wrapper: str, args: list, checked: Checked, depth: int = 0) -> None:
    if not (ROOT / wrapper).is_file():
        checked.errors.append(f"no such script: {wrapper}")
        return
    try:
        kind, target, own = forwarded_to(wrapper)
    except ValueError as e:
        checked.errors.append(str(e))
        return
    if kind == "wrapper":
        if depth > 4:
            checked.errors.append(f"{wrapper}: wrappers nested too deep")
            return
        check_wrapper(target, own + args, checked, depth + 1)
        return
    check_target(target, own + args, checked)


def check_line(line: str) -> Checked:
    checked = Checked(line)
    try:
        commands = split_commands(line)
    except ValueError as e:  # unbalanced quotes
        checked.errors.append(f"cannot parse: {e}")
        return checked
    for words in commands:
        check_command(words, checked)
    return checked


def shell_lines(md: Path) -> list:
    return [line for info, body in code_blocks(md.read_text()) if info in SHELL_BLOCKS
            for line in logical_lines(body)]


# ---------------------------------------------------------------------------------------
# --help, once per target
# ---------------------------------------------------------------------------------------
HELP_TEXT: dict = {}

# Runs in one child interpreter: each target's own entry point with argv [target, "--help"], as
# `python -m MODULE --help` / `python SCRIPT --help` would, so torch is imported once for all.
HELP_RUNNER = r"""
import contextlib, io, json, os, runpy, sys
out = {}
for kind, name in json.loads(sys.argv[1]):
    buffer, code = io.StringIO(), None
    sys.argv = [name, "--help"]
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            if kind == "module":
                runpy.run_module(name, run_name="__main__", alter_sys=True)
            else:
                sys.path.insert(0, os.path.dirname(os.path.abspath(name)))
                runpy.run_path(name, run_name="__main__")
        except SystemExit as e:
            code = e.code
        except BaseException as e:
            code = repr(e)
    out[name] = {"code": code, "text": buffer.getvalue()}
print(json.dumps(out))
"""


def fetch_helps(targets) -> None:
    """Fill HELP_TEXT for the targets not in it yet, from one child process."""
    todo = sorted({t for t in targets if t not in HELP_TEXT}, key=lambda t: (t.kind, t.name))
    if not todo:
        return
    result = subprocess.run([sys.executable, "-c", HELP_RUNNER, json.dumps([[t.kind, t.name] for t in todo])],
                            cwd=ROOT, capture_output=True, text=True, timeout=HELP_TIMEOUT_S,
                            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert result.returncode == 0, result.stderr[-3000:]
    helps = json.loads(result.stdout.strip().splitlines()[-1])
    # a normal return counts as exit status 0, as it does for `python -m`; the text must be a usage
    failed = {t.name: helps[t.name] for t in todo
              if helps[t.name]["code"] not in (0, None) or "usage:" not in helps[t.name]["text"].lower()}
    assert not failed, f"--help failed: {failed}"
    HELP_TEXT.update({t: helps[t.name]["text"] for t in todo})


def unknown_flags(checked: Checked) -> list:
    bad = []
    for target, flags in checked.flags.items():
        if not flags:
            continue
        text = HELP_TEXT[target]
        bad += [f"{flag} (not in {target.name} --help)" for flag in flags
                if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]
    return bad


@pytest.fixture(scope="module")
def checked_commands() -> dict:
    """{markdown file name: [Checked]} for README.md and docs/*.md, with every --help fetched."""
    out = {md.relative_to(ROOT).as_posix(): [check_line(line) for line in shell_lines(md)] for md in markdown_files()}
    fetch_helps(t for lines in out.values() for c in lines for t, flags in c.flags.items() if flags)
    return out


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------
def test_every_relative_link_and_image_exists():
    files = markdown_files()
    assert (ROOT / "README.md").is_file() and len(files) >= 5, files
    targets = {md.name: link_targets(md.read_text()) for md in files}
    assert any(t.endswith(".png") for t in targets["README.md"]), "the README shows no picture"
    assert any(t.startswith("docs/") for t in targets["README.md"]), "the README links no docs page"
    missing = {md.relative_to(ROOT).as_posix(): broken_links(md, md.read_text()) for md in files}
    assert not {k: v for k, v in missing.items() if v}, missing


def test_every_readme_command_names_real_scripts_and_flags(checked_commands):
    readme = checked_commands["README.md"]
    assert len(readme) >= 8, [c.line for c in readme]  # quick start + the ImageNet recipe
    assert sum(len(f) for c in readme for f in c.flags.values()) >= 20, "too few flags found: the parser broke"
    problems = {c.line: c.errors + unknown_flags(c) for c in readme}
    assert not {k: v for k, v in problems.items() if v}, problems


def test_every_docs_command_names_real_scripts_and_flags(checked_commands):
    docs = {name: lines for name, lines in checked_commands.items() if name != "README.md"}
    assert sum(map(len, docs.values())) >= 5, "the docs hold almost no commands: the block parser broke"
    problems = {f"{name}: {c.line}": c.errors + unknown_flags(c) for name, lines in docs.items() for c in lines}
    assert not {k: v for k, v in problems.items() if v}, problems


def test_the_checker_catches_bad_flags_missing_targets_and_broken_links(checked_commands, tmp_path):
    """The failure paths, on lines written here (the train_c2i.py help is already fetched)."""
    train = Target("script", "train_c2i.py")
    assert train in HELP_TEXT, "the README runs train_c2i.py (through scripts/train_c2i.sh)"
    lines = logical_lines("# a comment\nNPROC_PER_NODE=8 bash scripts/train_c2i_fsdp.sh --code-path c \\\n"
                          "    --gpt-model GPT-B  # note --x\n\n")
    assert lines == ["NPROC_PER_NODE=8 bash scripts/train_c2i_fsdp.sh --code-path c      --gpt-model GPT-B  # note --x"]
    good = check_line(lines[0])
    assert not good.errors and not unknown_flags(good)
    assert good.flags == {train: ["--data-parallel", "--code-path", "--gpt-model"]}
    bad = check_line("bash scripts/train_c2i.sh --code-path c --no-such-flag 3 && python -m no_such_module --x")
    assert unknown_flags(bad) == ["--no-such-flag (not in train_c2i.py --help)"]
    assert bad.errors == ["no such module: no_such_module"]
    launched = check_line("torchrun --nproc_per_node 8 -m entropy_tools.score --code-path c")
    assert launched.flags == {TORCHRUN: ["--nproc_per_node"], Target("module", "entropy_tools.score"): ["--code-path"]}
    assert check_line("frobnicate --x").errors and check_line("bash scripts/no_such.sh").errors
    md = tmp_path / "page.md"
    text = "![a](missing.png) [b](https://example.org) [c](#here) `[d](no.md)`\n```\n[e](no2.md)\n```\n[f]: gone.md\n"
    (tmp_path / "present.md").write_text("")
    assert broken_links(md, text + "[g](present.md#x)") == ["missing.png", "gone.md"]


# ---------------------------------------------------------------------------------------
# References from the code, and requirements.txt
# ---------------------------------------------------------------------------------------
CITATION = re.compile(r'docs/([\w-]+\.md)(?:,? "([^"]+)")?')
HEADING = re.compile(r"^#+\s+(.+?)\s*$", re.M)
PROJECT_DIRS = ("autoregressive", "benchmarks", "dataset", "demo", "entropy_model", "entropy_tools", "evaluations",
                "scripts", "tests", "tokenizer", "utils")
DISTRIBUTION_MODULES = {"pillow": "PIL"}  # requirements.txt names whose import name differs
OPTIONAL_IMPORTS = {"flash_attn"}  # imported when installed (a CUDA build), never required


def python_files() -> list:
    return sorted(ROOT.glob("*.py")) + [p for d in PROJECT_DIRS for p in sorted((ROOT / d).rglob("*.py"))]


def broken_citations(text: str) -> list:
    """'docs/PAGE.md' and 'docs/PAGE.md, "Section"' in text whose page or heading is missing."""
    missing = []
    for page, section in CITATION.findall(text):
        section = " ".join(section.split())  # a citation may wrap across lines
        path = ROOT / "docs" / page
        if not path.is_file():
            missing.append(f"docs/{page}")
        elif section and section not in HEADING.findall(path.read_text()):
            missing.append(f'docs/{page}, "{section}"')
    return missing


def test_the_code_cites_pages_and_sections_that_exist():
    texts = {p.relative_to(ROOT).as_posix(): p.read_text() for p in python_files() if p != Path(__file__).resolve()}
    assert sum(bool(section) for text in texts.values() for _, section in CITATION.findall(text)) >= 3
    missing = {path: found for path, text in texts.items() if (found := broken_citations(text))}
    assert not missing, missing
    assert broken_citations('docs/design.md, "Generation" docs/design.md "No such section" docs/nowhere.md') == \
        ['docs/design.md, "No such section"', "docs/nowhere.md"]


def imported_packages() -> set:
    """Top-level names of every module the project's Python files import (lazy imports included)."""
    names = set()
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_requirements_are_the_imported_packages():
    required = {re.split(r"[<>=!~\[;\s]", line.split("#")[0].strip())[0].lower()
                for line in (ROOT / "requirements.txt").read_text().splitlines() if line.split("#")[0].strip()}
    modules = {DISTRIBUTION_MODULES.get(name, name.replace("-", "_")) for name in required}
    imported = imported_packages()
    assert {"torch", "numpy", "safetensors", "huggingface_hub"} <= modules & imported  # preconditions
    assert not sorted(modules - imported), "listed in requirements.txt, never imported"
    local = {p.stem for p in python_files()} | set(PROJECT_DIRS) | {p.name for p in ROOT.iterdir() if p.is_dir()}
    third_party = imported - set(sys.stdlib_module_names) - local - OPTIONAL_IMPORTS
    assert not sorted(third_party - modules), "imported, not listed in requirements.txt"
