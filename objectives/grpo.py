r"""GRPO: group-relative policy optimisation (Shao et al. 2024, DeepSeekMath), with the variants TRL 1.16 has.

For each prompt :math:`c`, :math:`G` completions :math:`y_1..y_G \sim \pi_{old}(\cdot\mid c)` and their rewards
:math:`r_i`. No critic: the advantage of every token of :math:`y_i` is its group-relative reward

.. math:: \hat A_i = \frac{r_i - \operatorname{mean}(r_1..r_G)}{\operatorname{std}(r_1..r_G) + \epsilon}

(:func:`group_advantages`; ``scale="batch"``: the std of the whole batch, ``"none"``: no division, as Dr. GRPO,
Liu et al. 2025). With :math:`\rho_{it} = \pi_\theta(y_{it}\mid c, y_{i,<t})/\pi_{old}(\cdot)` the per-token loss
(:func:`per_token_loss`) is PPO's clipped surrogate plus the k3 estimate of the KL to the reference :math:`a`,

.. math:: \ell_{it} = -\min(\rho_{it}\hat A_i, \operatorname{clip}(\rho_{it}, 1-\epsilon_l, 1+\epsilon_h)\hat A_i)
          + \beta_{KL}\Big(\frac{a_{it}}{\pi_{it}} - \log\frac{a_{it}}{\pi_{it}} - 1\Big),

with :math:`\epsilon_h > \epsilon_l` DAPO's clip-higher (Yu et al. 2025), ``delta`` a cap on the unclipped ratio
(two-sided clipping), and GSPO's sequence-level ratio (Zheng et al. 2025) :math:`\rho_i = \exp(\frac1{|y_i|}
\sum_t\log\rho_{it})` in place of :math:`\rho_{it}` (``level="sequence"``). ``cispo`` (MiniMax-M1) is
:math:`-\operatorname{sg}(\min(\rho_{it}, \epsilon_h))\hat A_i\log\pi_{it}`. The aggregations (:func:`aggregate`):

- ``grpo``: :math:`\frac1B\sum_i\frac1{|y_i|}\sum_t\ell_{it}` (the paper's; a length-dependent weight per sequence);
- ``bnpo``: :math:`\sum_{it}\ell_{it}/\sum_i|y_i|` over each micro-batch, averaged over the micro-batches (TRL's);
- ``dr_grpo``: :math:`\sum_{it}\ell_{it}/(B\,L_{max})` (Dr. GRPO: a constant normaliser);
- ``dapo``: :math:`\sum_{it}\ell_{it}` over the tokens per optimizer step of the whole generation batch (DAPO);
- ``luspo``: :math:`\frac1B\sum_i\sum_t\ell_{it}` (a sum per sequence); ``cispo`` aggregates as ``dapo``.

**Its f-DPG reading** (proved on the exact enumerable model in ``tests/fdpg/algorithms/test_grpo.py``). With one
inner step (:math:`\pi_{old} = \pi_\theta`, so :math:`\rho = 1` and nothing is clipped), no std scaling, no KL
term and the constant ``dr_grpo`` normaliser, the gradient is
:math:`-\frac1{BL}\sum_i(r_i - \bar r_{g(i)})\nabla\log\pi_\theta(y_i\mid c_i)`. The group mean holds :math:`r_i`
itself with weight :math:`1/G` and the other :math:`G-1` samples, independent of :math:`y_i`, add nothing in
expectation, so

.. math:: E[\nabla\mathcal L] = -\frac{1}{L}\Big(1-\frac1G\Big)\nabla_\theta E_{c}E_{\pi_\theta}[r]
          = \frac{\beta}{L}\Big(1-\frac1G\Big)\nabla_\theta KL(\pi_\theta\|p_t)\big|_{\theta=\theta_t},
          \qquad p_t\propto\pi_{\theta_t}\,e^{r/\beta}:

the f-DPG reverse-KL gradient toward the target tilted from the *current* policy (any :math:`\beta`: at
:math:`\theta_t` the :math:`KL(\pi_\theta\|\pi_{\theta_t})` part of the divergence has zero gradient), scaled by
:math:`(1 - 1/G)\beta/L`; f-DPG's (and PPO's) target tilts the fixed reference :math:`a` instead, which is what
keeps them near :math:`a` without a KL term. GRPO's own KL term, k3 differentiated through :math:`\pi` at the
sampled tokens, has the expected gradient :math:`\sum_t E[\nabla KL(a_t\|\pi_t)]`, the *forward* KL of each
next-token distribution to the reference's (:math:`E_{y\sim\pi}[(1 - a/\pi)\nabla\log\pi] = -\sum_y a\nabla\log\pi`),
not the reverse KL it estimates; multiplied by the (differentiable) ratio, as TRL 1.16 does by default, its gradient
at :math:`\rho = 1` is :math:`\sum_t\log\frac{\pi_t}{a_t}\nabla\log\pi_t`, the reverse KL's without the
later tokens' terms (PPO's k1 reward-to-go keeps those). Std scaling (a per-group, data-dependent weight), the
``grpo``/``bnpo``/``dapo`` normalisers (random, length-dependent) and :math:`\mu > 1` inner steps each move GRPO
away from the special case.
"""

from __future__ import annotations

import torch

from objectives.rl import kl_per_token

#: The loss types (``--grpo_loss``), TRL's names.
GRPO_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo")
#: How the group-relative rewards are scaled (``--scale_rewards``), TRL's names.
REWARD_SCALINGS = ("group", "batch", "none")
#: Where the importance ratio is taken (``--importance_sampling``): per token (GRPO) or per sequence (GSPO).
IMPORTANCE_LEVELS = ("token", "sequence")
#: Added to the std before dividing (TRL's).
STD_EPSILON = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    r"""``[N]`` :math:`\hat A_i = (r_i - \bar r_{g(i)})/(\sigma + \epsilon)` for ``N`` rewards in consecutive groups
    of ``group_size`` (one prompt each); :math:`\sigma` the unbiased std of the group (``"group"``) or of all
    ``N`` (``"batch"``), no division for ``"none"``."""
    if scale not in REWARD_SCALINGS:
        raise ValueError(f"unknown reward scaling {scale!r}; choose one of {', '.join(REWARD_SCALINGS)}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group-relative advantages need groups of at least 2 completions that tile the batch: "
                         f"{rewards.numel()} rewards in groups of {group_size}")
    groups = rewards.reshape(-1, group_size)
    advantages = (groups - groups.mean(-1, keepdim=True)).reshape(-1)
    if scale == "group":
        return advantages / (groups.std(-1).repeat_interleave(group_size) + STD_EPSILON)
    if scale == "batch":
        return advantages / (rewards.std() + STD_EPSILON)
    return advantages


def log_importance_weights(log_pi: torch.Tensor, log_old: torch.Tensor, mask: torch.Tensor,
                           level: str = "token") -> torch.Tensor:
    r"""``[B, T]`` :math:`\log\rho_{it}` (``"token"``) or ``[B, 1]`` GSPO's :math:`\frac1{|y_i|}\sum_t\log\rho_{it}`."""
    log_ratio = log_pi - log_old
    if level == "token":
        return log_ratio
    if level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(f"unknown importance-sampling level {level!r}; choose one of {', '.join(IMPORTANCE_LEVELS)}")


def per_token_loss(log_pi: torch.Tensor, log_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                   loss_type: str = "dapo", epsilon_low: float = 0.2, epsilon_high: float | None = None,
                   delta: float | None = None, level: str = "token", log_ref: torch.Tensor | None = None,
                   kl_coef: float = 0.0, kl_ratio_correction: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``[B, T]`` :math:`\ell_{it}` (module docstring; ``advantages`` ``[B]``) and the ratio :math:`\rho` (``[B, T]``
    or ``[B, 1]``, detached) for the clip statistics. ``log_ref`` (the reference's per-token log-probs) is needed
    when ``kl_coef > 0``; ``kl_ratio_correction`` multiplies the k3 term by :math:`\rho` (differentiable; TRL
    1.16's default ``use_bias_correction_kl``, after DeepSeek-V3.2)."""
    if loss_type not in GRPO_LOSSES:
        raise ValueError(f"unknown GRPO loss {loss_type!r}; choose one of {', '.join(GRPO_LOSSES)}")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    advantages = advantages.reshape(-1, 1).to(log_pi.dtype)
    live_ratio = torch.exp(log_importance_weights(log_pi, log_old, mask, level))
    ratio = live_ratio
    if loss_type == "cispo":
        loss = -ratio.clamp(max=epsilon_high).detach() * advantages * log_pi
    else:
        clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
        unclipped = ratio if delta is None else ratio.clamp(max=delta)
        loss = -torch.minimum(unclipped * advantages, clipped * advantages)
    loss = loss.expand_as(log_pi) if loss.shape != log_pi.shape else loss
    if kl_coef:
        if log_ref is None:
            raise ValueError("a GRPO KL term (kl_coef > 0) needs the reference's per-token log-probabilities")
        kl = kl_per_token(log_pi, log_ref, "k3")
        loss = loss + kl_coef * (kl * live_ratio if kl_ratio_correction else kl)
    return loss, ratio.detach()


def aggregate(loss: torch.Tensor, mask: torch.Tensor, loss_type: str, n_sequences: int,
              n_tokens: float, max_completion_length: int, n_micro_batches: int = 1) -> torch.Tensor:
    r"""One micro-batch's share of its optimizer step's loss (module docstring): ``n_sequences`` the optimizer
    step's sequences on this process; ``n_tokens`` ``dapo``/``cispo``'s normaliser (tokens per optimizer step of the
    generation batch, per process); ``n_micro_batches`` the micro-batches of the step (``grpo``'s and ``bnpo``'s
    per-micro-batch means are averaged over them, as TRL's gradient accumulation does)."""
    mask = mask.to(loss.dtype)
    summed = loss * mask
    if loss_type == "grpo":
        return (summed.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / n_sequences
    if loss_type == "bnpo":
        return summed.sum() / mask.sum().clamp(min=1.0) / n_micro_batches
    if loss_type == "dr_grpo":
        return summed.sum() / (n_sequences * max_completion_length)
    if loss_type in ("dapo", "cispo"):
        return summed.sum() / max(n_tokens, 1.0)
    if loss_type == "luspo":
        return summed.sum() / n_sequences
    raise ValueError(f"unknown GRPO loss {loss_type!r}; choose one of {', '.join(GRPO_LOSSES)}")
