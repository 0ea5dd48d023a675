"""This directory on ``sys.path`` (the suite runs with ``--import-mode=importlib``), so that an algorithm's tests can
reuse another's helpers (KTO's tests use DPO's data and gradient helpers from ``test_dpo``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
