"""Where the tests' data lives."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A copy of ../shared (the micro models and the recorded Petals traffic) lives in tests/data so that a
# clean clone tests itself; NODE_SHARED_DIR points the tests at another copy.
SHARED = Path(os.environ.get("NODE_SHARED_DIR", ROOT / "tests" / "data"))
MICRO_LLAMA = SHARED / "models" / "micro-llama"
VECTORS = SHARED / "vectors"
