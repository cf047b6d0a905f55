"""Every Python sample in ``docs/*.md`` runs, so the documentation cannot drift from the code.

Fenced blocks and what happens to them:

* ```` ```python ````: a test module of its own (``test_<page>_L<line>.py``);
  it must contribute at least one passing test.
* ```` ```python conftest ````: appended to the page's ``conftest.py``, for
  fixtures that later samples of the page use.
* ```` ```python skip: <reason> ````: not run; the reason is mandatory.

All runnable samples of one page share one inner pytest session (``-p
gondolin``, real QEMU, the outer session's image cache), so a page costs
one VM restore and, if it has sandboxed samples, one sandbox.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import INNER_ADDOPTS
from pytest_gondolin import paths

pytest_plugins = ("pytester",)

pytestmark = pytest.mark.integration

DOCS = Path(__file__).resolve().parents[2] / "docs"
#: Pages the documentation must have (the issue's list), by file name.
REQUIRED_PAGES = (
    "index.md",
    "marker-and-fixtures.md",
    "network.md",
    "traffic.md",
    "cassettes.md",
    "images-and-caching.md",
    "ci.md",
    "troubleshooting.md",
    "limitations.md",
    "cli.md",
)
#: One inner session per page: a VM restore, maybe a sandbox and a cold
#: ``vm_factory`` boot under TCG on a busy 2-core host.
PAGE_TIMEOUT = 900.0

_FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Sample:
    page: str
    line: int
    kind: str  # "test" | "conftest" | "skip"
    code: str
    reason: str = ""

    @property
    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"

    @property
    def module(self) -> str:
        return f"test_{Path(self.page).stem.replace('-', '_')}_L{self.line}"


def samples(page: Path) -> list[Sample]:
    """The Python blocks of ``page``, in order. Raises ValueError for an unknown tag."""
    text = page.read_text()
    found: list[Sample] = []
    for m in _FENCE.finditer(text):
        info = m["info"].strip()
        if not (info == "python" or info.startswith("python ")):
            continue
        line = text.count("\n", 0, m.start()) + 1
        tag = info[len("python") :].strip()
        if tag == "":
            found.append(Sample(page.name, line, "test", m["code"]))
        elif tag == "conftest":
            found.append(Sample(page.name, line, "conftest", m["code"]))
        elif tag.startswith("skip:") and tag[5:].strip():
            found.append(Sample(page.name, line, "skip", m["code"], tag[5:].strip()))
        else:
            raise ValueError(f"docs/{page.name}:{line}: unknown python block tag {tag!r}")
    return found


def _pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def _runnable_pages() -> list[str]:
    return [p.name for p in _pages() if any(s.kind == "test" for s in samples(p))]


def test_required_pages_exist_and_are_linked_from_the_index() -> None:
    names = {p.name for p in _pages()}
    assert set(REQUIRED_PAGES) <= names, sorted(set(REQUIRED_PAGES) - names)
    index = (DOCS / "index.md").read_text()
    for page in REQUIRED_PAGES:
        if page != "index.md":
            assert f"({page})" in index, f"index.md does not link {page}"


@pytest.mark.parametrize("page", [p.name for p in _pages()])
def test_samples_compile_and_links_resolve(page: str) -> None:
    path = DOCS / page
    for sample in samples(path):
        compile(sample.code, sample.where, "exec")
    for target, anchor in re.findall(
        r"\]\(([a-z0-9-]+\.md)(?:#([a-z0-9_-]+))?\)", path.read_text()
    ):
        assert (DOCS / target).is_file(), f"docs/{page} links to missing {target}"
        if anchor:
            assert anchor in _anchors(DOCS / target), (
                f"docs/{page} links to missing {target}#{anchor}"
            )


def _anchors(page: Path) -> set[str]:
    """GitHub-style heading anchors of ``page``: lower case, punctuation dropped, spaces to dashes."""
    text = _FENCE.sub("", page.read_text())  # no headings inside code blocks
    return {
        re.sub(r"[^a-z0-9 _-]", "", m[1].strip().lower()).replace(" ", "-")
        for m in re.finditer(r"^#+ (.+)$", text, re.MULTILINE)
    }


@pytest.fixture(scope="session")
def gondolin_cache() -> Path:
    """The outer session's cache (resolved before pytester points HOME at a temp dir)."""
    return paths.cache_dir()


@pytest.mark.parametrize("page", _runnable_pages())
def test_page_samples_pass(
    page: str, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, gondolin_cache: Path
) -> None:
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(gondolin_cache))
    monkeypatch.setenv("PYTEST_ADDOPTS", INNER_ADDOPTS)
    monkeypatch.delenv("CI", raising=False)  # the docs describe the local default record mode
    monkeypatch.setenv("COLUMNS", "200")
    page_samples = samples(DOCS / page)
    conftest = "\n\n".join(s.code for s in page_samples if s.kind == "conftest")
    if conftest:
        pytester.makeconftest(conftest)
    tests = [s for s in page_samples if s.kind == "test"]
    for sample in tests:
        pytester.makepyfile(**{sample.module: sample.code})
    result = pytester.runpytest_subprocess("-p", "gondolin", "-v", "-rA", timeout=PAGE_TIMEOUT)
    output = "\n".join(result.outlines + result.errlines)
    assert result.ret == 0, f"samples of docs/{page} failed:\n{output}"
    for sample in tests:
        passed = [
            line
            for line in result.outlines
            if line.startswith(f"{sample.module}.py::") and " PASSED" in line
        ]
        assert passed, f"{sample.where}: the sample ran no passing test\n{output}"
