r"""KTO: Kahneman-Tversky optimisation from unpaired binary feedback (Ethayarajh et al. 2024), and APO-zero unpaired.

Data: completions :math:`y` of prompts :math:`x`, each labelled desirable or undesirable (no pairs). With the
implicit reward :math:`r_\theta(x, y) = \log\frac{\pi_\theta(y\mid x)}{\pi_{ref}(y\mid x)}` and the reference point
:math:`z_0 = \max(0, \widehat{KL}(\pi_\theta\|\pi_{ref}))`, the KL estimated on the batch's *mismatched* pairs
:math:`(x_j, y'_j)` (another example's completion, so that it is a sample of the marginal, not of the matched
data) and not differentiated (:func:`reference_point`), KTO's value is a logistic (Kahneman-Tversky) function of the
gain or loss against :math:`z_0` (paper Eq. 7; :func:`kto_losses`):

.. math:: \ell(x, y) = \begin{cases} \lambda_D\,(1 - \sigma(\beta(r_\theta - z_0))) & y \text{ desirable}\\
                                     \lambda_U\,(1 - \sigma(\beta(z_0 - r_\theta))) & y \text{ undesirable,}\end{cases}

averaged over the batch; :math:`\lambda_D, \lambda_U` weight the two kinds (the paper advises
:math:`\lambda_D n_D / \lambda_U n_U \in [1, 4/3]`). ``apo_zero_unpaired`` (D'Oosterlinck et al. 2024) drops the
reference point: :math:`1 - \sigma(\beta r_\theta)` and :math:`\sigma(\beta r_\theta)`.

**Its f-divergence reading.** The implicit reward is DPO's, :math:`\beta\log\frac{\pi}{\pi_{ref}}`, the reverse-KL
one: the optimum of a loss that pushes :math:`r_\theta` up where the human reward :math:`r` is high is the f-DPG
reverse-KL target :math:`p\propto\pi_{ref}e^{r/\beta}`, and :math:`z_0` estimates
:math:`E_{\pi_\theta}[r_\theta] = KL(\pi_\theta\|\pi_{ref})`, the expected implicit reward: the baseline the gains
and losses are measured from (a prospect-theory reference point; f-DPG's baseline plays the same part in its
gradient). Another f would replace :math:`\log\frac{\pi}{\pi_{ref}}` by :math:`f'(\pi/\pi_{ref})`, whose
expectation under :math:`\pi` is no longer a divergence (nor the batch estimate TRL makes), so KTO here, as in TRL,
is reverse KL only.
"""

from __future__ import annotations

import torch

#: ``--kto_loss``: TRL 1.16's KTO loss types.
KTO_LOSSES = ("kto", "apo_zero_unpaired")


def reference_point(mismatched_log_ratios: torch.Tensor) -> torch.Tensor:
    r""":math:`z_0 = \max(0, \operatorname{mean}_j\log\frac{\pi_\theta}{\pi_{ref}}(y'_j\mid x_j))`, detached: the
    batch's estimate of :math:`KL(\pi_\theta\|\pi_{ref})` from its mismatched pairs."""
    if mismatched_log_ratios.numel() == 0:
        raise ValueError("KTO's reference point needs at least one mismatched (prompt, completion) pair")
    return mismatched_log_ratios.detach().mean().clamp(min=0)


def kto_losses(log_ratios: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor | float, beta: float,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
               loss_type: str = "kto") -> torch.Tensor:
    r"""Per-example loss (module docstring) of the implicit log-ratios :math:`r_\theta` (``[N]``) with the labels
    ``desirable`` (``[N]`` bool) against the reference point ``z0``; the batch's loss is their mean."""
    if loss_type not in KTO_LOSSES:
        raise ValueError(f"unknown KTO loss {loss_type!r}; choose one of {', '.join(KTO_LOSSES)}")
    if not beta > 0:
        raise ValueError(f"KTO's beta must be positive, got {beta!r}")
    desirable = desirable.to(torch.bool)
    z0 = torch.as_tensor(z0, dtype=log_ratios.dtype, device=log_ratios.device) if loss_type == "kto" else 0.0
    gain = torch.sigmoid(beta * (log_ratios - z0))
    if loss_type == "kto":
        undesirable_loss = 1 - torch.sigmoid(beta * (z0 - log_ratios))
    else:
        undesirable_loss = gain
    return torch.where(desirable, desirable_weight * (1 - gain), undesirable_weight * undesirable_loss)
