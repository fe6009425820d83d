"""Where the project's read-only shared material lives (../shared beside the repository root), and the one
rule for tests that need it: off CI (for example on the GPU machine, where ../shared does not travel) they
skip; in CI (CI=true) they never skip, so a wrong path or a missing fixture fails loudly."""

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures"
WIKITEXT = SHARED / "data" / "wikitext-2"
IN_CI = bool(os.environ.get("CI"))

requires_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir() and not IN_CI, reason=f"shared fixtures are absent outside CI: {FIXTURES}")
