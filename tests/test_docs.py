"""Every Python block of README.md and docs/*.md runs, as written, so an example can never rot.

Each ```python block runs alone, in a fresh interpreter, from the repository root, with 8 simulated CPU
devices (the environment the docs promise their reader). A block whose lines start with `>>>` is a doctest.
Other fenced blocks (shell commands, output, text) are not run. Tracebacks and doctest reports name the
Markdown file and its line numbers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300
BLOCK_TIMEOUT_S = 300

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")

# Runs in the fresh interpreter: the block arrives on stdin. Code is compiled under the Markdown file's
# name, shifted to its line, so a traceback shows the line of the doc that failed.
_RUNNER = r"""
import doctest, sys
path, line, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
src = sys.stdin.read()
globs = {"__name__": "__main__"}
if kind == "doctest":
    test = doctest.DocTestParser().get_doctest(src, globs, f"{path}:{line}", path, line - 1)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    runner = doctest.DocTestRunner(optionflags=flags)
    runner.run(test)
    sys.exit(1 if runner.failures else 0)
exec(compile("\n" * (line - 1) + src, path, "exec"), globs)
"""


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(first line of code, 1-based; code) of every ```python block in `path`, dedented to its fence."""
    blocks = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        if lang.lower() in ("python", "py", "pycon"):
            body = [ln[len(indent) :] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1 : j]]
            blocks.append((i + 2, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def is_doctest(code: str) -> bool:
    return any(ln.lstrip().startswith(">>>") for ln in code.splitlines())


def block_env() -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=8"])
    env["JAX_PLATFORMS"] = "cpu"
    return env


BLOCKS = [
    pytest.param(path, line, code, id=f"{path.relative_to(ROOT)}:{line}")
    for path in DOC_FILES
    for line, code in python_blocks(path)
]


def run_block(path: Path, line: int, code: str) -> tuple[str, subprocess.CompletedProcess]:
    rel = str(path.relative_to(ROOT))
    kind = "doctest" if is_doctest(code) else "script"
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, rel, str(line), kind],
        input=code,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=block_env(),
        timeout=BLOCK_TIMEOUT_S,
    )
    return kind, proc


@pytest.fixture(scope="module")
def block_runs(request):
    """The selected blocks, started at once, a few at a time: each still runs alone in its own interpreter,
    but the interpreters' start-up and JAX's compilation overlap on a machine with more than one core."""
    selected = [
        item.callspec.params
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_block_runs" and hasattr(item, "callspec")
    ]
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            (p["path"], p["line"]): pool.submit(run_block, p["path"], p["line"], p["code"]) for p in selected
        }
        yield futures
        for f in futures.values():
            f.cancel()


@pytest.mark.parametrize(("path", "line", "code"), BLOCKS)
def test_block_runs(block_runs, path: Path, line: int, code: str) -> None:
    future = block_runs.get((path, line))
    kind, proc = future.result() if future is not None else run_block(path, line, code)
    if proc.returncode != 0:
        rel = path.relative_to(ROOT)
        pytest.fail(f"{rel}:{line} ({kind}) failed:\n{proc.stdout}\n{proc.stderr}", pytrace=False)


def test_docs_have_python_blocks() -> None:
    assert BLOCKS, "no ```python block found in README.md or docs/"


def test_readme_is_a_front_page() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    assert "make test" in text  # CI runs `make test`; the README must say so


def heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation dropped, spaces to -."""
    anchors = set()
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = path if not file else path.parent / file
        assert dest.exists(), f"{path.relative_to(ROOT)} links to missing {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in heading_anchors(dest), (
                f"{path.relative_to(ROOT)} links to missing anchor {target}"
            )
