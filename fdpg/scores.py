"""Checking what a task's scorer returns: the target's features, and metric-only extras.

The target validates the features it reads (presence, one value per sample, no NaN; see
:meth:`objectives.Target.validate`). A scorer may return more features than the target reads (for
example PEP 8 violations, reported but not optimised): they are kept for the task's metrics, with the
same shape and NaN checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from objectives import ScoreError, Target
from objectives._tensors import as_tensor, check_no_nan


def checked_features(target: Target, raw: Mapping[str, Any], n: int) -> dict[str, torch.Tensor]:
    """Every feature of ``raw`` as a float64 tensor of shape ``[n]``, the target's first."""
    if not isinstance(raw, Mapping):
        raise ScoreError(f"a scorer must return a mapping feature name -> values, got {type(raw).__name__}")
    shape_like = torch.zeros(n, dtype=torch.float64)
    features = target.validate(shape_like, raw)
    for name in sorted(set(raw) - set(features)):
        values = as_tensor(raw[name], f"score {name!r}").to(torch.float64)
        if values.shape != shape_like.shape:
            raise ScoreError(f"score {name!r} has shape {tuple(values.shape)} for {n} samples: "
                             "scorers must return one number per sample")
        check_no_nan(values, f"score {name!r}")
        features[name] = values
    return features
