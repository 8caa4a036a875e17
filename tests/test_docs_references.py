"""The repository's text speaks of the project alone.

Docs, README, CHANGELOG, examples, the package and the studies and checks beside it
(``experiments/``, ``benchmarks/``; docstrings and comments included)
name no file outside the repository, no internal process (who asked, who reviewed),
and every repository path they name in backticks or links exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

TEXTS = sorted(
    [
        REPO / "README.md",
        REPO / "CHANGELOG.md",
        REPO / "setup.py",
        REPO / "pyproject.toml",
        REPO / ".ci" / "run",
        REPO / "sae_lens_sampled_autoload.py",
        *(REPO / "docs").rglob("*.md"),
        *(REPO / "examples").rglob("*.py"),
        *(REPO / "sae_lens_sampled").rglob("*.py"),
        *(REPO / "experiments").rglob("*.py"),
        *(REPO / "benchmarks").rglob("*.py"),
    ]
)

# (what it catches, pattern); matched case-insensitively, line by line
FORBIDDEN = [
    ("a file outside the repository", r"(\.\./)+shared\b|\bshared/|\bresearch/[\w-]+\.md"),
    ("the design document", r"(?-i:\bDESIGN\b)|\bdesign (document|doc)\b|\bdesign's\b"),
    ("research notes", r"\bresearch notes?\b"),
    ("process words", r"\b(issues?|reviews?|reviewers?|reviewed|tickets?|sessions?|helpers?)\b"),
    ("process words", r"\bthe lead\b|\bthis task\b"),
]  # fmt: skip

# Paths in the repository's own folders, as written in backticks or markdown links.
REPO_PATH = re.compile(
    r"(?<![\w/.-])((?:docs|examples|tests|sae_lens_sampled|experiments|benchmarks|\.ci)"
    r"/[\w./-]*[\w])"
)


def relative(path: Path) -> str:
    return str(path.relative_to(REPO))


def offending_lines(path: Path) -> list[str]:
    found = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        for what, pattern in FORBIDDEN:
            match = re.search(pattern, line, flags=re.IGNORECASE)
            if match:
                found.append(
                    f"{relative(path)}:{number}: {what} ({match[0]!r}): {line}"
                )
    return found


@pytest.mark.parametrize("path", TEXTS, ids=relative)
def test_no_reference_outside_the_project(path):
    assert offending_lines(path) == []


def test_the_patterns_catch_what_they_should():
    bad = [
        "see `shared/research/sampled_sae.md`",
        "see ../shared/notes",
        "(DESIGN's reading)",
        "the default follows the design document",
        "a reviewer of the submitted paper reports",
        "as the research note says",
        "fixed in issue 15",
        "the lead decides",
    ]
    good = ["the shared pool of every rank", "a design choice", "reissued"]
    for line in bad:
        assert any(re.search(p, line, re.IGNORECASE) for _, p in FORBIDDEN), line
    for line in good:
        assert not any(re.search(p, line, re.IGNORECASE) for _, p in FORBIDDEN), line


@pytest.mark.parametrize(
    "path", [p for p in TEXTS if p.suffix in (".md", ".py")], ids=relative
)
def test_named_repository_paths_exist(path):
    missing = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        for name in REPO_PATH.findall(line):
            name = name.rstrip(".")
            if "<" in name or "*" in name or name.endswith("/"):
                continue  # a pattern, not a path
            if not (REPO / name).exists():
                missing.append(f"{relative(path)}:{number}: {name}")
    assert missing == []


# Modules of the repository that the texts run as ``python -m MODULE`` (a line break
# may fall after ``-m``). Release notes keep the commands of their release, so the
# CHANGELOG is not read here.
RUN_MODULE = re.compile(
    r"python -m\s+((?:sae_lens_sampled|experiments|benchmarks)(?:\.\w+)*)"
)


def runnable_module_exists(name: str) -> bool:
    path = REPO / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__main__.py").exists()


@pytest.mark.parametrize(
    "path", [p for p in TEXTS if p.name != "CHANGELOG.md"], ids=relative
)
def test_modules_run_with_python_m_exist(path):
    names = RUN_MODULE.findall(path.read_text())
    missing = [n for n in names if n.islower() and not runnable_module_exists(n)]
    assert missing == []


def test_runnable_module_check_tells_module_from_package():
    assert runnable_module_exists("sae_lens_sampled")  # __main__.py
    assert runnable_module_exists("experiments.pool_study")
    assert not runnable_module_exists("experiments")  # a package with no __main__
    assert not runnable_module_exists("sae_lens_sampled.benchmark.pool_study")
