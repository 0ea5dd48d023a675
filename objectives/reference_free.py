r"""Reference-free preference losses: SimPO, CPO and ORPO, from the policy's own log-probabilities alone.

A pair is a prompt :math:`c`, a preferred response :math:`y_w` and a dispreferred one :math:`y_l`;
:math:`\log\pi(y\mid c)` is the sum over the response's tokens,
:math:`\overline{\log\pi}(y\mid c) = \log\pi(y\mid c)/|y|` its per-token mean. No reference model is read (so no
reference pass is made):

- ``simpo`` (Meng et al. 2024, Eq. 6): :math:`-\log\sigma\big(\beta(\overline{\log\pi}(y_w) - \overline{\log\pi}(y_l))
  - \gamma\big)`, a target margin :math:`\gamma` (``simpo_gamma``) on the length-normalised likelihoods;
- ``cpo`` (Xu et al. 2024, Eq. 3 and the NLL of Eq. 5): :math:`-\log\sigma\big(\beta(\log\pi(y_w) - \log\pi(y_l))\big)`
  plus :math:`\alpha` (``nll_coef``) times the chosen responses' negative log-likelihood per token;
- ``orpo`` (Hong et al. 2024, Eqs. 4-7): the chosen responses' NLL per token plus :math:`\lambda` (``beta``) times
  :math:`-\log\sigma(\log\frac{\mathrm{odds}(y_w)}{\mathrm{odds}(y_l)})` with
  :math:`\mathrm{odds}(y) = \frac{P(y)}{1 - P(y)}` and :math:`P(y) = e^{\overline{\log\pi}(y)}`.

Both SimPO and CPO accept a label smoothing :math:`\varepsilon` as DPO does: the pair term becomes
:math:`-(1-\varepsilon)\log\sigma(z) - \varepsilon\log\sigma(-z)`.

The f-divergence reading. DPO's implicit reward is :math:`\beta\log\frac{\pi}{\pi_{ref}}`, the reverse-KL target's;
these losses replace it by :math:`\beta\log\pi` (CPO), :math:`\beta\overline{\log\pi}` (SimPO) or the log-odds
(ORPO), i.e. a uniform reference: CPO's optimum on Bradley-Terry preferences of reward :math:`r` is
:math:`\pi\propto e^{r/\beta}`, the reverse-KL target with :math:`a` uniform, which no longer keeps the policy near
the base model; the NLL term (CPO, ORPO) is what holds it to the chosen data instead (forward KL from the chosen
responses' empirical distribution). SimPO's length normalisation changes the reward to a per-token one and drops the
target's sequence-level form.

The NLL terms are token means over the *batch* (TRL's cross-entropy over every chosen token), not a per-pair mean:
:func:`chosen_nll` takes the batch's token count so that micro-batches add up to the batch's value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from objectives.errors import ObjectiveError

#: The reference-free losses (``--preference_loss``) and whether each adds the chosen responses' NLL.
REFERENCE_FREE_LOSSES = {"simpo": False, "cpo": True, "orpo": True}


class ReferenceFreeLossError(ObjectiveError):
    """A reference-free loss's setting that does not apply."""


def _smoothed_logistic(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def simpo_loss(chosen_mean_log_pi: torch.Tensor, rejected_mean_log_pi: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    r"""``[N]`` SimPO pair loss from the per-token mean log-probabilities (module docstring)."""
    return _smoothed_logistic(beta * (chosen_mean_log_pi - rejected_mean_log_pi) - gamma, label_smoothing)


def cpo_pair_loss(chosen_log_pi: torch.Tensor, rejected_log_pi: torch.Tensor, beta: float,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    r"""``[N]`` CPO pair loss from the sequence log-probabilities (its NLL term is :func:`chosen_nll`)."""
    return _smoothed_logistic(beta * (chosen_log_pi - rejected_log_pi), label_smoothing)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    r""":math:`\log(1 - e^x)` for :math:`x < 0`, stable at both ends (Mächler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_odds_ratio_loss(chosen_mean_log_pi: torch.Tensor, rejected_mean_log_pi: torch.Tensor,
                         lam: float) -> torch.Tensor:
    r"""``[N]`` ORPO's :math:`-\lambda\log\sigma(\log\frac{\mathrm{odds}(y_w)}{\mathrm{odds}(y_l)})` (its NLL term is
    :func:`chosen_nll`)."""
    log_odds = (chosen_mean_log_pi - rejected_mean_log_pi) - (log1mexp(chosen_mean_log_pi)
                                                              - log1mexp(rejected_mean_log_pi))
    return -lam * F.logsigmoid(log_odds)


def chosen_nll(chosen_token_log_pi: torch.Tensor, chosen_mask: torch.Tensor, batch_tokens: float) -> torch.Tensor:
    r"""The chosen responses' negative log-likelihood summed over these rows' tokens and divided by ``batch_tokens``,
    the chosen tokens of the whole batch: micro-batches' values add up to the batch's per-token NLL."""
    if not batch_tokens > 0:
        raise ReferenceFreeLossError(f"batch_tokens must be the batch's positive count of chosen tokens, got "
                                     f"{batch_tokens!r}")
    mask = chosen_mask.to(chosen_token_log_pi.dtype)
    return -(torch.where(mask.bool(), chosen_token_log_pi, torch.zeros_like(chosen_token_log_pi))).sum() / batch_tokens


def reference_free_pair_loss(loss: str, chosen_log_pi: torch.Tensor, rejected_log_pi: torch.Tensor,
                             chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, beta: float,
                             label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> torch.Tensor:
    """``[N]`` the pair term of ``loss`` (``simpo``, ``cpo`` or ``orpo``) from sequence log-probabilities and the
    responses' token counts (the NLL term of cpo/orpo is added by the caller with :func:`chosen_nll`)."""
    if loss not in REFERENCE_FREE_LOSSES:
        raise ReferenceFreeLossError(f"unknown reference-free loss {loss!r}; choose one of "
                                     f"{', '.join(REFERENCE_FREE_LOSSES)}")
    if loss == "cpo":
        return cpo_pair_loss(chosen_log_pi, rejected_log_pi, beta, label_smoothing)
    mean_w = chosen_log_pi / chosen_lengths.clamp(min=1).to(chosen_log_pi)
    mean_l = rejected_log_pi / rejected_lengths.clamp(min=1).to(rejected_log_pi)
    if loss == "simpo":
        return simpo_loss(mean_w, mean_l, beta, simpo_gamma, label_smoothing)
    if label_smoothing:
        raise ReferenceFreeLossError("--label_smoothing is not part of ORPO: drop it")
    return orpo_odds_ratio_loss(mean_w, mean_l, beta)
