"""An enumerable toy autoregressive model: the exact ground truth of the ``objectives`` tests.

:class:`ToyAutoregressive` is a real softmax policy over sequences of fixed length ``L`` from a
vocabulary of ``V`` tokens: every prefix (of length 0 .. L-1) has its own row of ``V`` logits, and

    log pi(x) = sum_k log_softmax(logits[prefix(x_<k)])[x_k].

Its ``V**L`` sequences can be enumerated, so ``Z``, ``p``, ``D_f(pi||p)`` and the gradient of
``D_f`` are exact (autograd through :meth:`ToyAutoregressive.log_probs_all`).

Sampling: :meth:`ToyAutoregressive.sample` draws sequence *indices* by a multinomial over the exact
sequence distribution ``exp(log_probs_all())``, which is the same distribution as ancestral sampling
(:meth:`ToyAutoregressive.sample_ancestral`, kept to check exactly that) and much faster.

:func:`make_problem` builds the policy, a frozen base model ``a`` (a different random init), per
sequence scores and an ``objectives`` target, with the exact ``log P``, ``log Z`` and ``log p``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from objectives import Target, binary_constraint, exponential_family, fit_lambdas, rl_with_kl

DTYPE = torch.float64


class ToyAutoregressive(nn.Module):
    """Tabular softmax policy over ``vocab ** length`` sequences (float64)."""

    def __init__(self, vocab: int = 3, length: int = 3, seed: int = 0, scale: float = 1.0) -> None:
        super().__init__()
        self.vocab = vocab
        self.length = length
        # prefixes of length k get ids offset_k + (base-V number of the prefix)
        self.offsets = [sum(vocab**j for j in range(k)) for k in range(length)]
        n_prefixes = sum(vocab**k for k in range(length))
        gen = torch.Generator().manual_seed(seed)
        self.logits = nn.Parameter(scale * torch.randn(n_prefixes, vocab, generator=gen, dtype=DTYPE))
        seqs = torch.tensor(list(itertools.product(range(vocab), repeat=length)), dtype=torch.long)
        self.register_buffer("_seqs", seqs)

    @property
    def n_sequences(self) -> int:
        return self.vocab**self.length

    def all_sequences(self) -> torch.Tensor:
        """Every sequence, shape ``[V**L, L]``, in lexicographic order (row i is sequence index i)."""
        return self._seqs

    def index_of(self, seqs: torch.Tensor) -> torch.Tensor:
        """The enumeration index of each sequence of ``seqs`` (shape ``[n, L]``)."""
        powers = self.vocab ** torch.arange(self.length - 1, -1, -1)
        return (seqs * powers).sum(-1)

    def prefix_ids(self, seqs: torch.Tensor) -> torch.Tensor:
        """Row of ``logits`` used at each position, shape ``[n, L]``."""
        ids = []
        number = torch.zeros(seqs.shape[0], dtype=torch.long)
        for k in range(self.length):
            ids.append(self.offsets[k] + number)
            number = number * self.vocab + seqs[:, k]
        return torch.stack(ids, dim=1)

    def log_prob(self, seqs: torch.Tensor) -> torch.Tensor:
        """``log pi(x)`` of each sequence (differentiable), shape ``[n]``."""
        log_softmax = torch.log_softmax(self.logits, dim=-1)
        return log_softmax[self.prefix_ids(seqs), seqs].sum(-1)

    def log_probs_all(self) -> torch.Tensor:
        """Exact ``log pi`` of every sequence (differentiable), shape ``[V**L]``."""
        return self.log_prob(self._seqs)

    def probs_all(self) -> torch.Tensor:
        return self.log_probs_all().detach().exp()

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` sequence indices drawn i.i.d. from pi (multinomial over the exact distribution)."""
        return torch.multinomial(self.probs_all(), n, replacement=True, generator=generator)

    @torch.no_grad()
    def sample_ancestral(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` sequences ``[n, L]`` drawn token by token (ancestral sampling)."""
        seqs = torch.zeros(n, self.length, dtype=torch.long)
        number = torch.zeros(n, dtype=torch.long)
        for k in range(self.length):
            probs = torch.softmax(self.logits[self.offsets[k] + number], dim=-1)
            seqs[:, k] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            number = number * self.vocab + seqs[:, k]
        return seqs


def base_model(vocab: int = 3, length: int = 3, seed: int = 1, scale: float = 1.0) -> ToyAutoregressive:
    """A frozen base model ``a`` (its own random init)."""
    model = ToyAutoregressive(vocab, length, seed=seed, scale=scale)
    model.requires_grad_(False)
    return model


def contains_token(seqs: torch.Tensor, token: int) -> torch.Tensor:
    """Feature: 1.0 where the sequence contains ``token``, else 0.0."""
    return (seqs == token).any(-1).to(DTYPE)


def first_equals_last(seqs: torch.Tensor) -> torch.Tensor:
    """1.0 where the first and last tokens agree (a third of the sequences when V=3)."""
    return (seqs[:, 0] == seqs[:, -1]).to(DTYPE)


@dataclass
class ToyProblem:
    """A policy, a base model, per-sequence scores and a target, with exact normalisation.

    ``log_P``, ``log_p`` and ``features`` are over the enumeration (index i = sequence i).
    """

    policy: ToyAutoregressive
    base: ToyAutoregressive
    target: Target
    features: dict[str, torch.Tensor]
    log_a: torch.Tensor
    log_P: torch.Tensor
    log_Z: float
    log_p: torch.Tensor
    extra: dict = field(default_factory=dict)

    def scores(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The scores of the sampled sequences ``idx``, as a task's scorers would return them."""
        return {k: v[idx] for k, v in self.features.items()}

    def sampled_log_P(self, idx: torch.Tensor) -> torch.Tensor:
        """``log P`` of sampled sequences, computed by the target itself from the sampled scores."""
        return self.target.log_P(self.log_a[idx], self.scores(idx))

    def exact_divergence(self, div, log_pi_all: torch.Tensor | None = None) -> torch.Tensor:
        log_pi_all = self.policy.log_probs_all() if log_pi_all is None else log_pi_all
        return div.exact(log_pi_all, self.log_p)

    def exact_gradient(self, div) -> torch.Tensor:
        """Exact gradient of ``D_f(pi||p)`` with respect to the policy logits (flattened)."""
        self.policy.zero_grad(set_to_none=True)
        value = self.exact_divergence(div)
        (grad,) = torch.autograd.grad(value, self.policy.logits)
        return grad.reshape(-1)


def make_problem(
    kind: str,
    vocab: int = 3,
    length: int = 3,
    policy_seed: int = 0,
    base_seed: int = 1,
    reward_seed: int = 2,
    beta: float = 1.0,
    moment: float = 0.5,
    policy_scale: float = 0.5,
) -> ToyProblem:
    """A toy problem of ``kind`` ``"rl"`` (P = a exp(r/beta)), ``"binary"`` (P = a b) or ``"expfam"``.

    ``"expfam"`` is P = a exp(lam phi). The reward is a fixed random N(0, 1) per sequence; ``b`` is 0
    where the first and last tokens agree; ``phi`` = "contains token 0", with ``lam`` fitted exactly
    so that ``E_p[phi] = moment``.
    """
    policy = ToyAutoregressive(vocab, length, seed=policy_seed, scale=policy_scale)
    base = base_model(vocab, length, seed=base_seed)
    seqs = policy.all_sequences()
    log_a = base.log_probs_all().detach()
    gen = torch.Generator().manual_seed(reward_seed)
    features = {
        "reward": torch.randn(policy.n_sequences, generator=gen, dtype=DTYPE),
        "b": 1.0 - first_equals_last(seqs),
        "phi": contains_token(seqs, 0),
    }
    extra: dict = {}
    if kind == "rl":
        target = rl_with_kl("reward", beta)
    elif kind == "binary":
        target = binary_constraint("b")
    elif kind == "expfam":
        fit = fit_lambdas({"phi": features["phi"]}, {"phi": moment}, log_weights=log_a)
        target = exponential_family(fit.lambdas)
        extra["fit"] = fit
    else:
        raise ValueError(f"unknown toy problem kind {kind!r}")
    log_P = target.log_P(log_a, features)
    log_Z = float(torch.logsumexp(log_P, 0))
    return ToyProblem(policy, base, target, features, log_a, log_P, log_Z, log_P - log_Z, extra)


def exact_moment(log_a: torch.Tensor, phi: torch.Tensor, lam: float) -> float:
    """``E_p[phi]`` for ``p ∝ a exp(lam phi)``, by direct enumeration (independent of fit_lambdas)."""
    weights = torch.exp(log_a + lam * phi - torch.logsumexp(log_a + lam * phi, 0))
    return float((weights * phi).sum())


def log_sum_exp_mean(log_w: torch.Tensor) -> float:
    """``log mean exp(log_w)`` (a direct IS estimate of log Z, for comparisons)."""
    return float(torch.logsumexp(log_w, 0)) - math.log(log_w.numel())
