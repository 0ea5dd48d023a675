r"""Importance-sampling estimates of the partition function :math:`Z = \sum_x P(x)`, in log space.

From samples :math:`x_j \sim q`, :math:`Z = E_q[P(x)/q(x)] \approx \frac1n\sum_j w_j` with
:math:`\log w_j = \log P(x_j) - \log q(x_j)`. Every estimate is kept in log space,

.. math::  \log\hat Z = \operatorname{logsumexp}_j(\log w_j) - \log n,\qquad
           \mathrm{ESS} = \frac{(\sum_j w_j)^2}{\sum_j w_j^2}
           = \exp\big(2\,\mathrm{lse}(\log w) - \mathrm{lse}(2\log w)\big),

so that ratios never overflow. Each key (a prompt, for conditional targets; one global key
otherwise) has either a *running* estimate over all samples seen (unbiased for :math:`Z`: each
batch's proposal may differ, each term stays unbiased) or a *windowed* one over the last ``window``
samples (tracks a moving proposal at the price of more variance). :meth:`state_dict` and
:meth:`load_state_dict` make it checkpointable; in data-parallel training, gather the log weights of
all processes before :meth:`update` so every process holds the same estimate.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from objectives._tensors import as_tensor, check_no_nan

GLOBAL_KEY = "__global__"


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    hi, lo = (a, b) if a > b else (b, a)
    return hi + math.log1p(math.exp(lo - hi))


@dataclass
class _KeyState:
    lse_w: float = -math.inf  # log sum w
    lse_w2: float = -math.inf  # log sum w^2
    n: int = 0
    window: deque = field(default_factory=deque)


class LogZEstimator:
    """Running or windowed importance-sampling estimates of :math:`\\log Z` per key.

    Args:
        mode: ``"running"`` (all samples so far) or ``"window"`` (the last ``window`` samples per key).
        window: window length in samples, for ``mode="window"``.
    """

    def __init__(self, mode: Literal["running", "window"] = "running", window: int = 1024) -> None:
        if mode not in ("running", "window"):
            raise ValueError(f"mode must be 'running' or 'window', got {mode!r}")
        if mode == "window" and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be a positive integer number of samples, got {window!r}")
        self.mode = mode
        self.window = window
        self._states: dict[Hashable, _KeyState] = {}

    # ------------------------------------------------------------------ updating
    def update(self, log_weights: torch.Tensor | Sequence[float], keys: Sequence[Hashable] | None = None) -> None:
        r"""Add samples with :math:`\log w_j = \log P(x_j) - \log q(x_j)` (``-inf`` where P = 0)."""
        lw = as_tensor(log_weights, "log_weights").detach().reshape(-1).to("cpu", torch.float64)
        check_no_nan(lw, "log_weights")
        if bool((lw == math.inf).any()):
            raise ValueError("log_weights contains +inf: log P or log q is not finite; check the scorers and log-probs")
        keys = [GLOBAL_KEY] * lw.numel() if keys is None else list(keys)
        if len(keys) != lw.numel():
            raise ValueError(f"got {lw.numel()} log weights but {len(keys)} keys; pass one key per sample")
        for key in dict.fromkeys(keys):
            idx = [i for i, k in enumerate(keys) if k == key]
            self._add(key, lw[idx])

    def _add(self, key: Hashable, lw: torch.Tensor) -> None:
        state = self._states.setdefault(key, _KeyState())
        if self.mode == "running":
            state.lse_w = _logaddexp(state.lse_w, float(torch.logsumexp(lw, 0)))
            state.lse_w2 = _logaddexp(state.lse_w2, float(torch.logsumexp(2 * lw, 0)))
            state.n += lw.numel()
        else:
            state.window.extend(float(v) for v in lw)
            while len(state.window) > self.window:
                state.window.popleft()

    # ------------------------------------------------------------------ reading
    def _sums(self, key: Hashable) -> tuple[float, float, int]:
        if key not in self._states:
            raise KeyError(f"no samples seen yet for key {key!r}; call update() first")
        state = self._states[key]
        if self.mode == "running":
            return state.lse_w, state.lse_w2, state.n
        lw = torch.tensor(list(state.window), dtype=torch.float64)
        return float(torch.logsumexp(lw, 0)), float(torch.logsumexp(2 * lw, 0)), lw.numel()

    def log_z(self, key: Hashable = GLOBAL_KEY) -> float:
        r""":math:`\log\hat Z` for ``key``; ``-inf`` while no sample had :math:`P > 0`."""
        lse, _, n = self._sums(key)
        return lse - math.log(n)

    def log_z_many(self, keys: Sequence[Hashable] | None, n: int | None = None) -> torch.Tensor:
        """:math:`\\log\\hat Z` per sample's key, float64 (``keys=None``: the global key ``n`` times)."""
        if keys is None:
            if n is None:
                raise ValueError("pass keys, or n for the global key")
            return torch.full((n,), self.log_z(GLOBAL_KEY), dtype=torch.float64)
        cache = {k: self.log_z(k) for k in dict.fromkeys(keys)}
        return torch.tensor([cache[k] for k in keys], dtype=torch.float64)

    def ess(self, key: Hashable = GLOBAL_KEY) -> float:
        """Effective sample size :math:`(\\sum w)^2/\\sum w^2` of the samples behind ``key`` (0 if all w = 0)."""
        lse, lse2, _ = self._sums(key)
        if lse == -math.inf:
            return 0.0
        return math.exp(2 * lse - lse2)

    def count(self, key: Hashable = GLOBAL_KEY) -> int:
        return self._sums(key)[2]

    @property
    def keys(self) -> list[Hashable]:
        return list(self._states)

    def summary(self) -> dict[str, float]:
        """Mean :math:`\\log\\hat Z`, mean ESS and number of keys, for logging."""
        if not self._states:
            return {"log_z": float("nan"), "log_z_ess": 0.0, "log_z_keys": 0}
        log_zs = [self.log_z(k) for k in self._states]
        finite = [v for v in log_zs if math.isfinite(v)]
        return {
            "log_z": sum(finite) / len(finite) if finite else -math.inf,
            "log_z_ess": sum(self.ess(k) for k in self._states) / len(self._states),
            "log_z_keys": len(self._states),
        }

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "window": self.window,
            "states": [
                [key, s.lse_w, s.lse_w2, s.n, list(s.window)] for key, s in self._states.items()
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.mode or state["window"] != self.window:
            raise ValueError(
                f"checkpoint has log Z mode={state['mode']!r}, window={state['window']} but this run uses "
                f"mode={self.mode!r}, window={self.window}"
            )
        self._states = {}
        for key, lse_w, lse_w2, n, window in state["states"]:
            key = tuple(key) if isinstance(key, list) else key
            self._states[key] = _KeyState(float(lse_w), float(lse_w2), int(n), deque(window))
