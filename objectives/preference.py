r"""Offline preference optimisation: DPO (Rafailov et al. 2023) and f-DPO (Wang et al. 2023), free of Hugging Face.

A pair is a prompt :math:`c`, a preferred response :math:`y_w` and a dispreferred one :math:`y_l`. With the policy's
and the reference's sequence log-probabilities, :math:`t_w = \pi_\theta(y_w\mid c)/\pi_{ref}(y_w\mid c)` (and
:math:`t_l`), f-DPO scores each response by the divergence's own derivative, shifted to be 0 at the reference,

.. math:: s(y) = f'(t) - f'(1), \qquad \Delta = s(y_w) - s(y_l)

(the shift cancels in :math:`\Delta`; it only makes the implicit rewards :math:`\beta s(y)` start at 0; TRL logs
:math:`\beta\log t` as its rewards whatever the divergence, so its reward metrics differ from these for f-DPO).
Reverse KL, :math:`f(t) = t\log t`, gives :math:`s = \log t` and plain DPO;
forward KL gives :math:`s = 1 - 1/t`, Jensen-Shannon
:math:`s = \log\frac{2t}{1+t}`, :math:`\alpha` gives :math:`s = \frac{t^{\alpha-1}-1}{\alpha-1}`, all taken from the
same :class:`objectives.Divergence` object f-DPG uses. Wang et al.'s condition for f-DPO: :math:`f'` invertible
(strictly increasing) on :math:`(0, \infty)`; total variation (:math:`f' = \mathrm{sign}(\log t)/2`) fails it and
is refused (:func:`f_dpo_problem`).

Per-pair losses (:func:`preference_loss`, ``loss=``):

- ``sigmoid`` (DPO): :math:`-(1-\varepsilon)\log\sigma(\beta\Delta) - \varepsilon\log\sigma(-\beta\Delta)`; the
  label smoothing :math:`\varepsilon` is conservative DPO (cDPO, Mitchell 2023), :math:`\varepsilon = 0` plain DPO;
- ``ipo`` (Azar et al. 2023): :math:`(\Delta_{len} - \frac{1}{2\beta})^2` with the scores divided by the number of
  response tokens, :math:`\Delta_{len} = s_w/|y_w| - s_l/|y_l|` (as TRL does, confirmed with the IPO authors);
- ``hinge`` (SLiC, Zhao et al. 2023): :math:`\max(0, 1 - \beta\Delta)`;
- ``robust`` (Chowdhury et al. 2024): :math:`\frac{-(1-\varepsilon)\log\sigma(\beta\Delta)
  + \varepsilon\log\sigma(-\beta\Delta)}{1-2\varepsilon}`, unbiased under preferences flipped with probability
  :math:`\varepsilon`.

Why DPO is the f-DPG reverse-KL target: if preferences follow Bradley-Terry with reward :math:`r`,
:math:`P(y \succ y') = \sigma(r(y) - r(y'))`, the expected sigmoid loss of a policy that can represent any
distribution is minimised where :math:`\beta\log\frac{\pi}{\pi_{ref}}(y) - \beta\log\frac{\pi}{\pi_{ref}}(y') =
r(y) - r(y')` for all pairs, i.e. :math:`\pi \propto \pi_{ref}\,e^{r/\beta}`, the target
:math:`p \propto a\,e^{r/\beta}` of f-DPG reverse KL with :math:`a = \pi_{ref}`. f-DPO's optimum solves
:math:`f'(\pi/\pi_{ref}) = r/\beta + c`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from objectives.divergences import Divergence
from objectives.errors import ObjectiveError

#: The per-pair losses of :func:`preference_loss`.
PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge", "robust")


class PreferenceLossError(ObjectiveError):
    """A preference loss, divergence or setting that does not apply."""


def f_dpo_problem(divergence: Divergence) -> str | None:
    r"""Why f-DPO is not defined for ``divergence`` (``None`` when it is): :math:`f'` must be finite and strictly
    increasing on :math:`(0, \infty)` (checked on :math:`\log t \in [-20, 20]`), so that the implicit reward
    :math:`f'(\pi/\pi_{ref})` determines :math:`\pi` (Wang et al. 2023, Theorem 1)."""
    grid = torch.linspace(-20.0, 20.0, 401, dtype=torch.float64)
    values = divergence.f_prime(grid)
    if not bool(torch.isfinite(values).all()):
        return f"its f'(t) is not finite for every t in [e^-20, e^20] ({divergence.name})"
    if not bool((values.diff() > 0).all()):
        return (f"its f'(t) is not strictly increasing ({divergence.name}: {divergence.description}), so "
                "f'(pi/pi_ref) does not determine pi (Wang et al. 2023 need f' invertible)")
    return None


def f_dpo_scores(log_ratio: torch.Tensor, divergence: Divergence) -> torch.Tensor:
    r"""The f-DPO score :math:`s = f'(t) - f'(1)` of each response from :math:`\log t = \log\pi - \log\pi_{ref}`
    (differentiable, dtype of ``log_ratio``); :math:`s = \log t` for reverse KL."""
    zero = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
    return divergence.f_prime(log_ratio) - divergence.f_prime(zero)


def preference_loss(
    chosen_log_ratio: torch.Tensor,
    rejected_log_ratio: torch.Tensor,
    divergence: Divergence,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""``[N]`` per-pair loss from the log-ratios :math:`\log\frac{\pi}{\pi_{ref}}` of the chosen and rejected
    responses (see the module docstring); ``ipo`` needs the responses' token counts. A divergence f-DPO is not
    defined for (total variation) is refused here, not only by the config (:func:`f_dpo_problem`)."""
    check_preference_settings(loss, beta, label_smoothing)
    problem = f_dpo_problem(divergence)
    if problem is not None:
        raise PreferenceLossError(f"f-DPO is not defined for this divergence: {problem}; choose rkl, fkl, js, "
                                  "alpha:A, chi2 or hellinger")
    s_w, s_l = f_dpo_scores(chosen_log_ratio, divergence), f_dpo_scores(rejected_log_ratio, divergence)
    if loss == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise PreferenceLossError("loss 'ipo' normalises by the response lengths: pass chosen_lengths and "
                                      "rejected_lengths (token counts)")
        delta = s_w / chosen_lengths.clamp(min=1).to(s_w) - s_l / rejected_lengths.clamp(min=1).to(s_l)
        return (delta - 1.0 / (2.0 * beta)) ** 2
    z = beta * (s_w - s_l)
    eps = label_smoothing
    if loss == "sigmoid":
        return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    if loss == "hinge":
        return torch.relu(1.0 - z)
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)  # robust


def implicit_rewards(log_ratio: torch.Tensor, divergence: Divergence, beta: float) -> torch.Tensor:
    r"""The implicit reward :math:`\beta\,s(y) = \beta(f'(t) - f'(1))` of each response (DPO: :math:`\beta\log t`)."""
    return beta * f_dpo_scores(log_ratio, divergence)


def check_preference_settings(loss: str, beta: float, label_smoothing: float) -> None:
    """Refuse an unknown loss, a non-positive beta or a label smoothing outside its range, naming the fix."""
    if loss not in PREFERENCE_LOSSES:
        raise PreferenceLossError(f"--preference_loss must be one of {', '.join(PREFERENCE_LOSSES)}, got {loss!r}")
    if not (math.isfinite(beta) and beta > 0):
        raise PreferenceLossError(f"--beta must be a positive number, got {beta!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise PreferenceLossError(f"--label_smoothing {label_smoothing!r} is out of range: it is the probability that "
                                  "a preference label is flipped, in [0, 0.5)")
    if label_smoothing and loss not in ("sigmoid", "robust"):
        raise PreferenceLossError(f"--label_smoothing is used by the sigmoid and robust losses only, not {loss!r}: "
                                  "drop it or choose one of those")
