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
- ``exo_pair`` (EXO, Ji et al. 2024, Eq. 16): :math:`KL(q\|p_\varepsilon)` between the policy's preference
  :math:`q = (\sigma(\beta\Delta), \sigma(-\beta\Delta))` and the smoothed label :math:`(1-\varepsilon, \varepsilon)`,
  i.e. :math:`\sum_k q_k(\log q_k - \log p_k)`: the reverse KL of the label where DPO is its forward KL (needs
  :math:`\varepsilon > 0`);
- ``discopop`` (DiscoPOP, Lu et al. 2024, Eq. 5): :math:`(1-m)\,(-\log\sigma(\beta\Delta)) + m\,e^{-\beta\Delta}`
  with :math:`m = \sigma(\beta\Delta/\tau)` (``discopop_tau``, 0.05 as in TRL), a log-ratio-modulated blend of the
  logistic and the exponential loss;
- ``sigmoid_norm``: DPO on the length-normalised scores, :math:`-\log\sigma(\beta(s_w/|y_w| - s_l/|y_l|))`.

Losses of the whole batch (reverse KL only; the log-ratios sorted over the batch, so a pair's loss depends on the
others: :func:`batch_preference_loss`), AOT (Melnyk et al. 2024, distributional alignment by optimal transport):

- ``aot``: :math:`\delta_{(i)} = \mathrm{sort}(\log\pi(y_w) - \log\pi(y_l))_i - \mathrm{sort}(\log\pi_{ref}(y_w) -
  \log\pi_{ref}(y_l))_i`, then the (smoothed) logistic loss of :math:`\beta\delta_{(i)}`: the policy's margins
  dominate the reference's in distribution (first-order stochastic dominance), not pair by pair;
- ``aot_unpaired``: :math:`\delta_{(i)} = \mathrm{sort}(\rho_w)_i - \mathrm{sort}(\rho_l)_i`, the chosen log-ratios'
  distribution against the rejected ones'.

Losses of the log-ratios themselves (reverse KL only: they do not read :math:`f'`, so another divergence is refused),
with :math:`\rho = \log\frac{\pi_\theta}{\pi_{ref}}`:

- ``nca_pair`` (NCA, Chen et al. 2024): :math:`-\log\sigma(\beta\rho_w) - \tfrac12\log\sigma(-\beta\rho_w)
  - \tfrac12\log\sigma(-\beta\rho_l)`, absolute rather than relative rewards;
- ``bco_pair`` (BCO, Jung et al. 2024, paired form): :math:`-\log\sigma(\beta\rho_w) - \log\sigma(-\beta\rho_l)`, each
  response classified on its own;
- ``sppo_hard`` (SPPO, Wu et al. 2024, hard win probabilities): :math:`(\rho_w - \frac{1}{2\beta})^2
  + (\rho_l + \frac{1}{2\beta})^2`, each log-ratio regressed to :math:`\pm\frac{1}{2\beta}`;
- ``apo_zero`` / ``apo_down`` (APO, D'Oosterlinck et al. 2024, Eqs. 7-8): :math:`(1 - \sigma(\beta\rho_w)) +
  \sigma(\beta\rho_l)` (raise the chosen, lower the rejected) / :math:`\sigma(\beta\rho_w) + (1 -
  \sigma(\beta(\rho_w - \rho_l)))` (lower both, the rejected more);
- ``rdpo`` (R-DPO, Park et al. 2024): :math:`-\log\sigma(\beta(\rho_w - \rho_l) - \alpha(|y_w| - |y_l|))`, the
  margin charged :math:`\alpha` (``length_alpha``) per token the chosen response is longer: in the reverse-KL
  reading, the target :math:`a\,e^{(r - \alpha|y|)/\beta}`, a length penalty in the reward;
- ``dpop`` (DPO-Positive, Pal et al. 2024): :math:`-\log\sigma(\beta(\rho_w - \rho_l - \lambda\max(0, -\rho_w)))`
  (``positive_lambda``, 50 in the paper): DPO plus a penalty whenever the chosen response's likelihood falls below
  the reference's, which plain DPO allows as long as the rejected one falls faster.

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

from objectives.divergences import Divergence, ReverseKL
from objectives.errors import ObjectiveError

#: The per-pair losses of :func:`preference_loss`.
PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "discopop", "sigmoid_norm", "nca_pair",
                     "bco_pair", "sppo_hard", "apo_zero", "apo_down", "rdpo", "dpop", "aot", "aot_unpaired")
#: Losses that read the log-ratios themselves, not the f-DPO scores: reverse KL only.
LOG_RATIO_LOSSES = ("nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "rdpo", "dpop", "aot",
                    "aot_unpaired")
#: Losses that normalise by the responses' token counts (``chosen_lengths``/``rejected_lengths`` needed).
LENGTH_LOSSES = ("ipo", "sigmoid_norm", "rdpo")
#: Losses of the whole batch (:func:`batch_preference_loss`): a pair's value depends on the batch's other pairs.
BATCH_LOSSES = ("aot", "aot_unpaired")
#: Losses that read ``label_smoothing``.
SMOOTHED_LOSSES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")


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
    *,
    length_alpha: float = 0.0,
    positive_lambda: float = 50.0,
    discopop_tau: float = 0.05,
) -> torch.Tensor:
    r"""``[N]`` per-pair loss from the log-ratios :math:`\log\frac{\pi}{\pi_{ref}}` of the chosen and rejected
    responses (see the module docstring); ``ipo``, ``sigmoid_norm`` and ``rdpo`` need the responses' token counts.
    A divergence f-DPO is not defined for (total variation) is refused here, not only by the config
    (:func:`f_dpo_problem`), and so is any divergence but reverse KL for the log-ratio losses."""
    check_preference_settings(loss, beta, label_smoothing, divergence)
    problem = f_dpo_problem(divergence)
    if problem is not None:
        raise PreferenceLossError(f"f-DPO is not defined for this divergence: {problem}; choose rkl, fkl, js, "
                                  "alpha:A, chi2 or hellinger")
    if loss in LENGTH_LOSSES and (chosen_lengths is None or rejected_lengths is None):
        raise PreferenceLossError(f"loss {loss!r} reads the response lengths: pass chosen_lengths and "
                                  "rejected_lengths (token counts)")
    rho_w, rho_l, eps = chosen_log_ratio, rejected_log_ratio, label_smoothing
    if loss in BATCH_LOSSES:
        raise PreferenceLossError(f"loss {loss!r} sorts over the batch: use batch_preference_loss")
    if loss in LOG_RATIO_LOSSES:
        if loss == "nca_pair":
            return (-F.logsigmoid(beta * rho_w) - 0.5 * F.logsigmoid(-beta * rho_w)
                    - 0.5 * F.logsigmoid(-beta * rho_l))
        if loss == "bco_pair":
            return -F.logsigmoid(beta * rho_w) - F.logsigmoid(-beta * rho_l)
        if loss == "sppo_hard":
            return (rho_w - 0.5 / beta) ** 2 + (rho_l + 0.5 / beta) ** 2
        if loss == "apo_zero":
            return (1.0 - torch.sigmoid(beta * rho_w)) + torch.sigmoid(beta * rho_l)
        if loss == "apo_down":
            return torch.sigmoid(beta * rho_w) + (1.0 - torch.sigmoid(beta * (rho_w - rho_l)))
        if loss == "rdpo":
            length_gap = (chosen_lengths.to(rho_w) - rejected_lengths.to(rho_l))
            return -F.logsigmoid(beta * (rho_w - rho_l) - length_alpha * length_gap)
        return -F.logsigmoid(beta * (rho_w - rho_l - positive_lambda * torch.relu(-rho_w)))  # dpop
    s_w, s_l = f_dpo_scores(rho_w, divergence), f_dpo_scores(rho_l, divergence)
    if loss in ("ipo", "sigmoid_norm"):
        delta = s_w / chosen_lengths.clamp(min=1).to(s_w) - s_l / rejected_lengths.clamp(min=1).to(s_l)
        return (delta - 1.0 / (2.0 * beta)) ** 2 if loss == "ipo" else -F.logsigmoid(beta * delta)
    z = beta * (s_w - s_l)
    if loss == "sigmoid":
        return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    if loss == "hinge":
        return torch.relu(1.0 - z)
    if loss == "exo_pair":
        return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
                + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    if loss == "discopop":
        mix = torch.sigmoid(z / discopop_tau)
        return -F.logsigmoid(z) * (1.0 - mix) + torch.exp(-z) * mix
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)  # robust


def batch_preference_loss(loss: str, chosen_log_ratio: torch.Tensor, rejected_log_ratio: torch.Tensor, beta: float,
                          label_smoothing: float = 0.0, reference_chosen: torch.Tensor | None = None,
                          reference_rejected: torch.Tensor | None = None) -> torch.Tensor:
    r"""``[N]`` the losses of :data:`BATCH_LOSSES` over a batch of ``N`` pairs (module docstring); ``aot`` also
    needs the reference's sequence log-probabilities (``reference_chosen``, ``reference_rejected``). The
    :math:`i`-th value belongs to the :math:`i`-th smallest margin, not to pair :math:`i`: only the mean is a loss."""
    check_preference_settings(loss, beta, label_smoothing)
    if loss not in BATCH_LOSSES:
        raise PreferenceLossError(f"batch_preference_loss: {loss!r} is not a batch loss ({', '.join(BATCH_LOSSES)})")
    if loss == "aot":
        if reference_chosen is None or reference_rejected is None:
            raise PreferenceLossError("loss 'aot' sorts the policy's and the reference's margins: pass "
                                      "reference_chosen and reference_rejected (sequence log-probabilities)")
        ref_margin = reference_chosen.to(chosen_log_ratio) - reference_rejected.to(chosen_log_ratio)
        margin = chosen_log_ratio - rejected_log_ratio + ref_margin  # log pi(y_w) - log pi(y_l)
        delta = torch.sort(margin, dim=0).values - torch.sort(ref_margin, dim=0).values
    else:
        delta = torch.sort(chosen_log_ratio, dim=0).values - torch.sort(rejected_log_ratio, dim=0).values
    z = beta * delta
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def implicit_rewards(log_ratio: torch.Tensor, divergence: Divergence, beta: float) -> torch.Tensor:
    r"""The implicit reward :math:`\beta\,s(y) = \beta(f'(t) - f'(1))` of each response (DPO: :math:`\beta\log t`)."""
    return beta * f_dpo_scores(log_ratio, divergence)


def check_preference_settings(loss: str, beta: float, label_smoothing: float,
                              divergence: Divergence | None = None) -> None:
    """Refuse an unknown loss, a non-positive beta, a label smoothing outside its range or on a loss that does not
    read it, and a divergence other than reverse KL on a log-ratio loss, naming the fix."""
    if loss not in PREFERENCE_LOSSES:
        raise PreferenceLossError(f"--preference_loss must be one of {', '.join(PREFERENCE_LOSSES)}, got {loss!r}")
    if not (math.isfinite(beta) and beta > 0):
        raise PreferenceLossError(f"--beta must be a positive number, got {beta!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise PreferenceLossError(f"--label_smoothing {label_smoothing!r} is out of range: it is the probability that "
                                  "a preference label is flipped, in [0, 0.5)")
    if label_smoothing and loss not in SMOOTHED_LOSSES:
        raise PreferenceLossError(f"--label_smoothing is used by the {', '.join(SMOOTHED_LOSSES)} losses only, not "
                                  f"{loss!r}: drop it or choose one of those")
    if loss == "exo_pair" and not label_smoothing > 0:
        raise PreferenceLossError("--preference_loss exo_pair is the KL to the label (1 - eps, eps), infinite at eps "
                                  "= 0: give --label_smoothing in (0, 0.5), e.g. 0.001")
    if divergence is not None and loss in LOG_RATIO_LOSSES and not isinstance(divergence, ReverseKL):
        raise PreferenceLossError(f"--preference_loss {loss} reads the log-ratios log(pi/pi_ref) themselves, not an "
                                  f"f-divergence's f'(pi/pi_ref): it has no --divergence {divergence.name} form (TRL "
                                  "has none either); use rkl, or one of sigmoid, ipo, hinge, robust, exo_pair, "
                                  "discopop, sigmoid_norm")
