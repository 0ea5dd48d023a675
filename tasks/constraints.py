r"""Shared machinery of the constraint tasks: word-list detectors and the :math:`\lambda` fit hook.

Word lists
    :func:`words` splits a text into lowercase alphabetic tokens (``"She's"`` -> ``she``, ``s``;
    ``"Mrs."`` -> ``mrs``); the detectors of :mod:`tasks.gender` and :mod:`tasks.professions` count
    tokens that belong to a documented vocabulary. Whole tokens only, so ``"amazingly"`` is not
    ``"amazing"`` and ``"history"`` is not ``"his"``.

Fitting :math:`\lambda` before training
    A distributional-constraint target :math:`P(x\mid c) = a(x\mid c)\,e^{\lambda\cdot\phi(x)}` needs
    :math:`\lambda` such that the *normalised* target meets the moments :math:`E_p[\phi] = \bar\mu`
    (Khalifa et al. 2021). :func:`moment_fit_hook` builds the ``fit`` hook of a
    :class:`~tasks.base.TaskSpec`: it draws base samples through the engine's
    :data:`~tasks.base.SampleFn`, scores them and fits :math:`\lambda` with :func:`fit_moments`.
    :func:`base_sampler` is such a sampler, with prompts stratified (each prompt equally often).

    With prompts and a *conditional* target (one :math:`Z_c` per prompt, CDPG) the moment that
    training can reach is the prompt average :math:`\sum_c u(c)\,E_{p(\cdot\mid c)}[\phi]`, where
    :math:`p(x\mid c) = a(x\mid c)e^{\lambda\cdot\phi(x)}/Z_c(\lambda)` is normalised per prompt. Its
    convex dual is

    .. math::  L(\lambda) = \sum_c u(c)\log E_{x\sim a(\cdot\mid c)}\big[e^{\lambda\cdot\phi(x)}\big]
               - \lambda\cdot\bar\mu,

    gradient :math:`\sum_c u(c) E_{p_c}[\phi] - \bar\mu`, Hessian :math:`\sum_c u(c)\mathrm{Cov}_{p_c}[\phi]`.
    :func:`fit_moments` minimises it from grouped samples (``u(c)`` = the share of samples of prompt
    ``c``). With a single group it *is* :func:`objectives.fit_lambdas` (which it then calls). A global
    normaliser over all prompts would instead reweight the prompts themselves by :math:`Z_c(\lambda)`,
    which a policy cannot do (it does not choose its prompts), so the trained policy would miss
    :math:`\bar\mu`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import logsumexp

from objectives import MomentFit, UnreachableMomentError, exponential_family, fit_lambdas
from objectives.errors import ScoreError
from objectives.moments import checked_fit
from tasks.base import FitHook, SampleFn, Scorer, TargetFit, TaskSpec, features_to_tensors

if TYPE_CHECKING:
    from fdpg.policy import Policy

_WORD = re.compile(r"[a-z]+")


def words(text: str) -> list[str]:
    """Lowercase alphabetic tokens of ``text`` (apostrophes, digits and punctuation split tokens)."""
    return _WORD.findall(text.lower())


def count_words(text: str, vocabulary: Iterable[str]) -> int:
    """How many tokens of ``text`` belong to ``vocabulary`` (lowercase words)."""
    vocab = vocabulary if isinstance(vocabulary, (set, frozenset)) else set(vocabulary)
    return sum(token in vocab for token in words(text))


def contains_any(text: str, vocabulary: Iterable[str]) -> bool:
    """Whether some token of ``text`` belongs to ``vocabulary``."""
    vocab = vocabulary if isinstance(vocabulary, (set, frozenset)) else set(vocabulary)
    return any(token in vocab for token in words(text))


# ---------------------------------------------------------------------------------------------- fitting
def fit_moments(
    phi: Mapping[str, torch.Tensor | Sequence[float]],
    target_moments: Mapping[str, float],
    groups: Sequence[Hashable] | None = None,
    tol: float = 1e-6,
) -> MomentFit:
    r"""Fit :math:`\lambda` so that the prompt-averaged moments of the per-prompt normalised target are met.

    Args:
        phi: feature -> values on base samples ``x_j ~ a(.|c_j)``.
        target_moments: feature -> :math:`\bar\mu_i`.
        groups: the prompt ``c_j`` of each sample (``None`` or one distinct value: a single
            normaliser, exactly :func:`objectives.fit_lambdas`).
        tol: required accuracy of the achieved moments.

    Returns:
        a :class:`objectives.MomentFit`; ``achieved_moments`` are prompt-averaged, ``ess`` is the
        effective sample size of the mixture weights :math:`u(c)\,p_c(x_j)`.

    Raises:
        UnreachableMomentError: a moment outside the open range reachable from the samples
            (:math:`\sum_c u(c)\min_{j\in c}\phi_j` to :math:`\sum_c u(c)\max_{j\in c}\phi_j`).
    """
    if groups is None or len(set(groups)) <= 1:
        return fit_lambdas(phi, target_moments, tol=tol)
    names = list(phi)
    if not names:
        raise ScoreError("fit_moments needs at least one feature")
    if set(target_moments) != set(names):
        raise ScoreError(f"target_moments names {sorted(target_moments)} must equal the features {sorted(names)}")
    matrix = np.stack([np.asarray(torch.as_tensor(phi[k], dtype=torch.float64).reshape(-1)) for k in names], axis=1)
    n = matrix.shape[0]
    if len(groups) != n:
        raise ScoreError(f"groups has {len(groups)} entries for {n} samples (one prompt per sample)")
    if np.isnan(matrix).any():
        raise ScoreError("a feature contains NaN; fix its scorer before fitting lambda")
    mu = np.array([float(target_moments[k]) for k in names])
    keys: dict[Hashable, int] = {}
    gid = np.array([keys.setdefault(g, len(keys)) for g in groups])
    members = [np.flatnonzero(gid == i) for i in range(len(keys))]
    share = np.array([len(m) / n for m in members])

    lo = sum(u * matrix[m].min(0) for u, m in zip(share, members))
    hi = sum(u * matrix[m].max(0) for u, m in zip(share, members))
    for i, name in enumerate(names):
        if not lo[i] < mu[i] < hi[i]:
            raise UnreachableMomentError(
                f"target moment {name} = {mu[i]:g} is outside the open range ({lo[i]:g}, {hi[i]:g}) that a per-prompt "
                f"normalised target can reach from these {n} samples of {len(members)} prompts: no finite lambda "
                "reaches it. Draw more (or more diverse) samples (--fit_samples N), or pick a moment inside."
            )

    def group_probs(lam: np.ndarray) -> tuple[float, np.ndarray]:
        """``sum_c u_c log mean_{j in c} e^{lam.phi_j}`` and the mixture weights ``u_c p_c(j)``."""
        logits = matrix @ lam
        total, probs = 0.0, np.empty(n)
        for u, m in zip(share, members):
            lse = logsumexp(logits[m])
            total += u * (lse - np.log(len(m)))
            probs[m] = u * np.exp(logits[m] - lse)
        return total, probs

    def objective(lam: np.ndarray) -> tuple[float, np.ndarray]:
        value, probs = group_probs(lam)
        return value - lam @ mu, probs @ matrix - mu

    def hessian(lam: np.ndarray) -> np.ndarray:
        _, probs = group_probs(lam)
        out = np.zeros((len(names), len(names)))
        for u, m in zip(share, members):
            p = probs[m] / u
            centred = matrix[m] - p @ matrix[m]
            out += u * (centred * p[:, None]).T @ centred
        return out

    result = minimize(objective, np.zeros(len(names)), jac=True, hess=hessian, method="trust-exact",
                      options={"gtol": tol * 1e-2, "maxiter": 1000})
    _, probs = group_probs(result.x)
    return checked_fit(names, result.x, mu, probs, matrix, int(result.nit), str(result.message), tol)


def moment_fit_hook(
    scorer: Scorer, moments: Mapping[str, float], default_n: int, conditional: bool, name: str = "task"
) -> FitHook:
    r"""The ``fit`` hook of a distributional-constraint task: base samples -> fitted :math:`a e^{\lambda\cdot\phi}`.

    Args:
        scorer: the task's scorer; it must return every feature named in ``moments``.
        moments: feature -> target moment :math:`\bar\mu`.
        default_n: number of base samples to draw when the caller gives none.
        conditional: per-prompt normalisers (the target is conditional and the fit groups by prompt).
        name: the task's name, for the report.
    """
    moments = {k: float(v) for k, v in moments.items()}

    def fit(sample_fn: SampleFn, n: int | None = None) -> TargetFit:
        n = default_n if n is None else int(n)
        if n < 2:
            raise ValueError(f"task {name!r}: fitting lambda needs at least 2 base samples, got {n}")
        completions, prompts = sample_fn(n)
        if len(completions) != len(prompts) or not completions:
            raise ValueError(f"the base sampler returned {len(completions)} completions for {len(prompts)} prompts")
        raw = features_to_tensors(scorer(list(completions), list(prompts)))
        phi = {k: raw[k] for k in moments}
        base = {k: float(v.mean()) for k, v in phi.items()}
        try:
            result = fit_moments(phi, moments, groups=list(prompts) if conditional else None)
        except UnreachableMomentError as exc:
            rates = ", ".join(f"{k}={v:.3f}" for k, v in base.items())
            raise UnreachableMomentError(
                f"task {name!r}: {exc}\n(base-model rates on these samples: {rates}; with per-prompt normalisers a "
                "prompt whose samples all have the same feature value cannot move: more samples per prompt help)"
            ) from exc
        lines = [f"[fdpg] task {name}: lambda fitted on {len(completions)} base samples "
                 f"({'per-prompt normalised' if conditional else 'one normaliser'})",
                 *(f"  {k}: base rate {base[k]:.4f} -> target {moments[k]:.4f}, lambda = {result.lambdas[k]:+.4f}, "
                   f"achieved on the samples {result.achieved_moments[k]:.4f}" for k in moments),
                 f"  effective sample size {result.ess:.1f} of {result.n}"]
        if conditional:
            for k in moments:
                values: dict[str, set[float]] = {}
                for prompt, v in zip(prompts, phi[k].tolist()):
                    values.setdefault(prompt, set()).add(v)
                stuck = sum(len(v) == 1 for v in values.values())
                if stuck:
                    lines.append(f"  warning: {k} is constant on the samples of {stuck} of {len(values)} prompts: "
                                 "their moments cannot move in the fit, which biases lambda; draw more samples "
                                 "(--fit_samples N)")
        if result.ess < 0.1 * result.n:
            lines.append("  warning: ESS below 10% of the samples; the fit rests on few samples, draw more "
                         "(--fit_samples N)")
        details: dict[str, Any] = {
            "lambdas": result.lambdas, "target_moments": result.target_moments,
            "achieved_moments": result.achieved_moments, "base_moments": base, "ess": result.ess,
            "n": result.n, "conditional": conditional, "iterations": result.iterations,
        }
        return TargetFit(result.target(conditional=conditional), "\n".join(lines), details)

    return fit


def restore_fit(spec: TaskSpec, details: Mapping[str, Any]) -> TaskSpec:
    """``spec`` with the target of a saved fit (``TargetFit.details``), e.g. on ``--resume``, without sampling again."""
    target = exponential_family(dict(details["lambdas"])).as_conditional(bool(details["conditional"]))
    return dataclasses.replace(spec, target=target, fit=None)


# ---------------------------------------------------------------------------------------------- base samples
def base_sampler(
    policy: Policy,
    prompts: Sequence[str] | None,
    max_new_tokens: int,
    seed: int = 0,
    batch_size: int = 16,
) -> SampleFn:
    r"""A :data:`~tasks.base.SampleFn` drawing from the base model :math:`a` (the policy's reference).

    Prompts are stratified: every prompt of the pool appears ``n // len(pool)`` or one more times (in a
    seeded shuffled order), so that per-prompt normalisers are estimated from similar sample counts.
    Sampling is pure (temperature 1, no top-k/top-p): the samples really come from :math:`a`.
    """
    from contextlib import nullcontext

    from fdpg.generation import generator_of
    from fdpg.onednn_linears import onednn_linears

    pool = list(prompts) if prompts else [""]

    def sample(n: int) -> tuple[list[str], list[str]]:
        rng = np.random.default_rng(seed)
        order = [pool[i] for i in rng.permutation(len(pool))]
        drawn = [order[i % len(order)] for i in range(n)]
        texts: list[str] = []
        generator = generator_of(policy)
        with policy.reference() as model, torch.no_grad(), \
                onednn_linears(model, prepack_rows=batch_size) if generator.exact_policy else nullcontext():
            for lo in range(0, n, batch_size):
                chunk = drawn[lo:lo + batch_size]
                batch = generator.generate(model, policy.tokenizer, chunk, max_new_tokens,
                                           seed=int(np.random.SeedSequence([seed, lo, 7]).generate_state(1)[0]))
                texts.extend(batch.texts)
        return texts, drawn

    return sample
