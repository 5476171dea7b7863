"""Every ```python block in the docs and READMEs runs, unless it is marked as a fragment.

The convention (docs/index.md, "Code blocks"): a ```python block in ``docs/**/*.md``,
``README.md``, ``<distribution>/README.md``, ``templates/*/README.md`` or
``examples/README.md`` is a complete program. A block that is only part of a program is
preceded, on the line right before its fence, by ``<!-- fragment -->``; it is compiled
(a syntax error still fails) but not run. Each complete block runs as a script of its own
(``python block.py``) in a fresh temporary directory with a timeout; a test id is
``<file>:<line of the fence>``, so a failure says where the block is.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAGMENT = "<!-- fragment -->"
TIMEOUT = 60
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


@dataclass(frozen=True)
class Block:
    """One fenced ```python block of a Markdown file."""

    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    fragment: bool

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}:{self.line}"


def markdown_files() -> list[Path]:
    """The Markdown files whose Python blocks the suite runs."""
    files = {ROOT / "README.md"}
    files.update(ROOT.glob("*/README.md"))
    files.update(ROOT.glob("templates/*/README.md"))
    files.update(path for path in (ROOT / "docs").rglob("*.md"))
    return sorted(path for path in files if path.is_file() and ".venv" not in path.parts)


def python_blocks(path: Path) -> list[Block]:
    """The ```python (or ```py) blocks of ``path``, dedented by their fence's indentation."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        language = opening["info"].split()[0].lower() if opening["info"].split() else ""
        body = []
        end = index + 1
        while end < len(lines):
            closing = FENCE.match(lines[end])
            if closing and closing["fence"][0] == fence[0] and len(closing["fence"]) >= len(fence) \
                    and not closing["info"].strip():
                break
            body.append(lines[end][len(indent):] if lines[end].startswith(indent) else lines[end].lstrip())
            end += 1
        if language in ("python", "py"):
            previous = lines[index - 1].strip() if index > 0 else ""
            blocks.append(Block(path, index + 1, "\n".join(body) + "\n", previous == FRAGMENT))
        index = end + 1
    return blocks


ALL_BLOCKS = [block for path in markdown_files() for block in python_blocks(path)]
COMPLETE = [block for block in ALL_BLOCKS if not block.fragment]


def test_the_collector_finds_blocks_and_fragments() -> None:
    assert len(ALL_BLOCKS) > 20, [b.id for b in ALL_BLOCKS]
    assert COMPLETE and len(COMPLETE) < len(ALL_BLOCKS), "expected both complete programs and fragments"
    assert any(b.path == ROOT / "README.md" and not b.fragment for b in ALL_BLOCKS), "the README's example runs"


def test_the_collector_reads_fences_as_markdown_does(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nprint(1)\n```\n\n<!-- fragment -->\n```python\nawait x\n```\n\n"
                    "- item\n\n  ```python\n  print(2)\n  ```\n\n````markdown\n```python\nnot a block\n```\n````\n"
                    "```bash\necho no\n```\n", encoding="utf-8")
    found = python_blocks(page)
    assert [(b.line, b.code, b.fragment) for b in found] == [
        (3, "print(1)\n", False), (8, "await x\n", True), (14, "print(2)\n", False)]


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: b.id)
def test_every_block_compiles(block: Block) -> None:
    """Fragments too: a fragment with a syntax error is a broken example. Top-level
    ``await``/``async with`` is allowed in a fragment (it shows part of a coroutine)."""
    flags = 0x2000 if block.fragment else 0  # ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    try:
        compile(block.code, block.id, "exec", flags=flags, dont_inherit=True)
    except SyntaxError as exc:
        pytest.fail(f"{block.id}: the block does not compile ({exc.msg}, block line {exc.lineno}). "
                    f"Fix it{'' if block.fragment else f', or mark it with {FRAGMENT} on the line before the fence'}.")


@pytest.mark.integration
@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("block", COMPLETE, ids=lambda b: b.id)
def test_every_complete_block_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(block.code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WOVE_")}
    try:
        run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                             timeout=TIMEOUT, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        output = [part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                  for part in (exc.stdout, exc.stderr)]
        pytest.fail(f"{block.id}: the block did not finish within {TIMEOUT} s (a program in the docs must finish "
                    f"in a few seconds and stop what it starts). Output so far:\n{output[0]}\n{output[1]}")
    assert run.returncode == 0, (
        f"{block.id}: the block exited with status {run.returncode}. Make it a complete program that runs, or "
        f"mark it with {FRAGMENT} on the line before the fence.\n--- stdout\n{run.stdout[-3000:]}\n"
        f"--- stderr\n{run.stderr[-3000:]}")
