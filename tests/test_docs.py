"""The docs work as written: every ```python block of README.md and docs/*.md runs in a fresh
interpreter; every `v4hal` command line of a shell block parses with the CLI's own parser (a
renamed or removed flag fails here); README's "A first run" runs end to end. A block that needs
a device this machine lacks is skipped only behind `<!-- not run: needs DEVICE -->`."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from v4hal.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = ("bash", "sh", "shell")
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.*?)\s*-->")
DEVICES = ("CUDA", "GPU", "NPU", "Ascend")
MAX_NOT_RUN = 3
V4HAL_LINE = re.compile(r"^\s*(?:\w+=\S*\s+)*(?:\S*/)?v4hal\s")  # `V=1 v4hal ...`, `.venv/bin/v4hal ...`


@dataclass
class Block:
    where: str           # "docs/model.md:25" (the opening fence's line)
    lang: str
    text: str
    heading: str         # the last Markdown heading above the block
    not_run: str | None  # the reason of a `<!-- not run: ... -->` right above it


def blocks(markdown: str, name: str = "<doc>") -> list[Block]:
    """The fenced blocks of a Markdown text, in order."""
    out, lines, i, heading, previous = [], markdown.splitlines(), 0, "", ""
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^(`{3,})\s*([\w+-]*)", line)
        if not fence:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            if line.strip():
                previous = line
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1))), len(lines))
        marker = NOT_RUN.search(previous)
        out.append(Block(f"{name}:{i + 1}", fence.group(2), "\n".join(lines[i + 1:end]) + "\n", heading,
                         marker.group(1) if marker else None))
        i, previous = end + 1, ""
    return out


def doc_blocks() -> list[Block]:
    return [b for path in DOC_FILES for b in blocks(path.read_text(), str(path.relative_to(ROOT)))]


def run_python(block: Block, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """The block in a fresh interpreter (nothing defined beforehand), in `cwd`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", block.text], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def v4hal_commands(block: Block) -> list[list[str]]:
    """The argument lists of the block's `v4hal` commands (heredoc bodies skipped; each command of
    a pipeline or `&&` chain on its own)."""
    commands, heredoc = [], None
    for line in block.text.splitlines():
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        if m := re.search(r"<<-?\s*['\"]?(\w+)", line):
            heredoc = m.group(1)
        if not V4HAL_LINE.match(line):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for word in [*lexer, ";"]:
            if word in (";", "|", "||", "&&", "&"):
                while words and re.fullmatch(r"\w+=\S*", words[0]):
                    words.pop(0)
                if words and Path(words[0]).name == "v4hal":
                    commands.append(words[1:])
                words = []
            else:
                words.append(word)
    return commands


def parse_error(argv: list[str]) -> str | None:
    """None if the v4hal parser accepts `argv`, else its complaint."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser(argv).parse_args(argv)
    except SystemExit as exc:
        return None if exc.code == 0 else err.getvalue().strip().splitlines()[-1]
    return None


def run_shell(script: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`script` under `bash -euo pipefail` in `cwd`, where `.venv/bin/activate` puts this
    interpreter's `v4hal` on PATH (as the one `bash .ci/run` makes does in a clone)."""
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "v4hal").exists(), f"no v4hal script beside {sys.executable}"
    activate = cwd / ".venv" / "bin" / "activate"
    activate.parent.mkdir(parents=True, exist_ok=True)
    activate.write_text(f'export PATH="{bin_dir}:$PATH"\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def first_run() -> Block:
    [block] = [b for b in blocks((ROOT / "README.md").read_text(), "README.md")
               if b.heading == "A first run" and b.lang in SHELL]
    return block


FILE_BLOCK = re.compile(r"# (\S+\.py)\n")  # a block that is a file's contents, headed by its path
# docs/backends.md's worked examples are files, not scripts: tests/test_backend_docs.py installs
# them as a new op and a new backend and runs both.
FILE_BLOCK_DOCS = {"docs/backends.md"}
PYTHON = [b for b in doc_blocks() if b.lang == "python" and not FILE_BLOCK.match(b.text)]


# -- the docs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", PYTHON, ids=[b.where for b in PYTHON])
def test_python_block_runs_as_written(block, tmp_path):
    if block.not_run:
        pytest.skip(f"{block.where}: {block.not_run}")
    done = run_python(block, tmp_path)
    assert done.returncode == 0, f"{block.where} failed:\n{done.stderr[-3000:]}"


def test_file_blocks_live_only_where_a_test_installs_them():
    files = [b for b in doc_blocks() if b.lang == "python" and FILE_BLOCK.match(b.text)]
    assert files and {b.where.split(":")[0] for b in files} <= FILE_BLOCK_DOCS, [b.where for b in files]


def test_blocks_not_run_are_few_and_each_names_a_device():
    skipped = [b for b in doc_blocks() if b.not_run]
    assert len(skipped) <= MAX_NOT_RUN, [b.where for b in skipped]
    for b in skipped:
        assert b.lang == "python" and any(d in b.not_run for d in DEVICES), \
            f"{b.where}: `not run` is for python blocks needing one of {DEVICES}, got {b.not_run!r}"


def test_every_v4hal_command_line_parses():
    shell = [b for b in doc_blocks() if b.lang in SHELL]
    commands = [(b.where, argv) for b in shell for argv in v4hal_commands(b)]
    assert len(commands) > 30  # the extraction found the docs' commands
    failures = [f"{where}: v4hal {shlex.join(argv)}: {error}" for where, argv in commands
                if (error := parse_error(argv))]
    assert not failures, "\n".join(failures)
    untagged = [b.where for b in doc_blocks() if b.lang not in (*SHELL, "python") and v4hal_commands(b)]
    assert not untagged, f"blocks with v4hal commands must be tagged bash: {untagged}"


def test_readme_first_run_runs_end_to_end(tmp_path):
    block = first_run()
    assert block.text.startswith("source .venv/bin/activate")
    done = run_shell(block.text, tmp_path)
    assert done.returncode == 0, f"README's first run failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert done.stdout.count("generated:") == 2  # from the checkpoint and from its FP8 conversion
    assert "\nok\n" in done.stdout  # convert verify
    assert (tmp_path / "out" / "ckpt-fp8" / "v4hal-manifest.json").exists()


# -- the checks can fail ----------------------------------------------------------------------------

DOC = """# T

```python
print(undefined_name)
```

<!-- not run: needs a CUDA GPU -->
```python
import torch; torch.zeros(1, device="cuda")
```

## Shell

```bash
OMP_NUM_THREADS=1 v4hal generate --preset tiny --no-such-flag   # a comment
v4hal info | head -3 && .venv/bin/v4hal plan --preset tiny --tp 0
python - <<'EOF'
v4hal this is python, not a command
EOF
```
"""


def test_extractor_finds_blocks_markers_and_commands():
    first, second, shell = blocks(DOC, "t.md")
    assert (first.where, first.lang, first.not_run, first.heading) == ("t.md:3", "python", None, "T")
    assert second.not_run == "needs a CUDA GPU"
    assert shell.heading == "Shell"
    assert v4hal_commands(shell) == [["generate", "--preset", "tiny", "--no-such-flag"], ["info"],
                                     ["plan", "--preset", "tiny", "--tp", "0"]]


def test_a_snippet_with_an_undefined_name_fails(tmp_path):
    done = run_python(blocks(DOC)[0], tmp_path)
    assert done.returncode != 0 and "NameError: name 'undefined_name' is not defined" in done.stderr


def test_a_removed_flag_or_bad_value_fails_the_parse():
    bad_flag, info, bad_value = v4hal_commands(blocks(DOC)[2])
    assert "unrecognized arguments: --no-such-flag" in parse_error(bad_flag)
    assert parse_error(info) is None
    assert "--tp: expected an integer >= 1, got '0'" in parse_error(bad_value)


def test_a_first_run_with_a_failing_command_fails(tmp_path):
    done = run_shell('source .venv/bin/activate\nv4hal generate --preset tiny --prompt-ids "0,4242,17"\n'
                     "echo not reached\n", tmp_path)
    assert done.returncode == 2 and "out of range" in done.stderr and "not reached" not in done.stdout
