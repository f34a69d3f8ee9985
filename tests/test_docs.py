"""The documents: physics references resolve, the README stays short, no history outside the
changelog, and relative links point at files that exist. Plain text checks (no jax import)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PHYSICS = ROOT / "docs" / "physics.md"
# Documents that describe what jaxbar is now; history belongs in CHANGELOG.md.
DOCUMENTS = sorted(
    [ROOT / "README.md", ROOT / "studies" / "README.md", ROOT / "benchmarks" / "README.md",
     ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")]
)
LINKED = [*DOCUMENTS, ROOT / "CHANGELOG.md"]
HISTORY = re.compile(
    r"went from|this round|tried and dropped|measured and dropped|earlier (run|version)"
    r"|times as fast",
    re.IGNORECASE,
)
# "§1", "§1.3", and ranges "§1.1–1.2", "§0-§5" (both ends must resolve).
SECTION = re.compile(r"§\s*(\d+(?:\.\d+)*)(?:\s*[–-]\s*§?\s*(\d+(?:\.\d+)*))?")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code (links there are not links)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str, seen: dict[str, int]) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    return slug if n == 0 else f"{slug}-{n}"


def _headings(path: Path) -> list[str]:
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return [m.group(1) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.MULTILINE)]


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    return {_slug(h, seen) for h in _headings(path)}


def test_physics_references_in_the_code_resolve_to_headings():
    sections = {s for h in _headings(PHYSICS) for s in re.findall(r"§\s*(\d+(?:\.\d+)*)", h)}
    cited = {}
    for path in sorted((ROOT / "jaxbar").rglob("*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for m in SECTION.finditer(line):
                for ref in filter(None, m.groups()):
                    cited.setdefault(ref, f"{_rel(path)}:{lineno}")
    assert cited, "no PHYSICS § references found in jaxbar/"
    missing = {ref: where for ref, where in cited.items() if ref not in sections}
    assert not missing, f"§ references without a heading in docs/physics.md: {missing}"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines (at most 250)"


@pytest.mark.parametrize("path", DOCUMENTS, ids=_rel)
def test_no_history_outside_the_changelog(path):
    hits = [f"{_rel(path)}:{i}: {line.strip()}"
            for i, line in enumerate(path.read_text().splitlines(), 1) if HISTORY.search(line)]
    assert not hits, "history belongs in CHANGELOG.md:\n" + "\n".join(hits)


@pytest.mark.parametrize("path", LINKED, ids=_rel)
def test_relative_links_and_images_exist(path):
    broken = []
    for target in LINK.findall(_prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, mailto:, ...
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{_rel(path)}: broken links: {broken}"


SOURCES = sorted(p for p in (ROOT / "jaxbar").rglob("*.py") if p.name != "kernel_lanes.py")
DOC_SECTIONS = ("Args:", "Returns:", "Raises:", "Attributes:", "Yields:")
REST = re.compile(r"(?<!`)``(?!`)|:(?:class|func|meth|mod|attr|data|obj):`")  # not ``` fences


def _docstrings(path: Path):
    import ast

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield getattr(node, "name", "<module>"), doc


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_docstrings_in_one_style(path):
    """Google style as the package writes it: section entries two spaces in, Markdown code."""
    for name, doc in _docstrings(path):
        lines = doc.splitlines()
        for i, line in enumerate(lines):
            if line.strip() in DOC_SECTIONS:
                entry = next((n for n in lines[i + 1:] if n.strip()), None)
                indent = len(line) - len(line.lstrip())
                assert entry is None or len(entry) - len(entry.lstrip()) == indent + 2, (
                    f"{name}: the entries of {line.strip()} must be indented two spaces")
        assert not REST.search(doc), f"{name}: reST markup; use single backticks"
