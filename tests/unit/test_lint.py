"""The ruff check CI enforces: `ruff check` with pyproject.toml's settings passes on the whole repository.

Run alone: `.venv/bin/python -m pytest tests/unit/test_lint.py -q` (about a second); the same check by hand is
`.venv/bin/ruff check .`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"ruff check found problems (fix them or `ruff check --fix`):\n{result.stdout}"
