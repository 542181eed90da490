"""The repository stands alone: no file cites the team's design documents outside it, and every relative
link in docs/*.md and README.md points at a file that exists."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIP = {".venv", ".git", "runs", ".whl", "__pycache__", ".cache", ".pytest_cache", ".hypothesis", "vigorl.egg-info"}
TEXT = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ".cfg"}
# Spelled in pieces so this file does not cite them itself.
OUTSIDE = [name + ".md" for name in ("ARCHITECTURE", "VIGORL_REFERENCE", "PLATFORM")] + ["../" + "shared"]


def _files():
    for folder, subfolders, names in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in SKIP]
        yield from (Path(folder) / n for n in names if Path(n).suffix in TEXT)


def test_no_file_points_outside_the_repository():
    hits = [f"{path.relative_to(ROOT)}: {name}" for path in _files() for name in OUTSIDE
            if name in path.read_text(errors="replace")]
    assert not hits, hits


def test_relative_links_in_the_docs_resolve():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(docs) > 5
    broken = []
    for doc in docs:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            path = target.split("#")[0]
            if path and "://" not in path and not (doc.parent / path).exists():
                broken.append(f"{doc.name}: {target}")
    assert not broken, broken
