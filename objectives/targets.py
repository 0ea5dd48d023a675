r"""Energy-based targets :math:`p(x) \propto P(x)` built from the base model and energy terms.

An unnormalised target is the base model times a product of factors,

.. math::  P(x \mid c) = a(x \mid c)\, \prod_k \Phi_k(x, c), \qquad \log P = \log a + \sum_k \log\Phi_k,

with the built-in factors (Korbak et al. 2022; Khalifa et al. 2021; Go et al. 2023):

=====================================  =================================  ======================
factor                                 :math:`\log\Phi(x)`                recovers
=====================================  =================================  ======================
:class:`KLRegularisedReward`           :math:`r(x)/\beta`                 RLHF (with reverse KL)
:class:`BinaryConstraint`              :math:`\log b(x)`, ``-inf`` if b=0  GDC/DPG (forward KL)
:class:`ExponentialFamily`             :math:`\sum_i \lambda_i\phi_i(x)`  distributional GDC
=====================================  =================================  ======================

Factors compose with ``*`` (a product of targets multiplies their factors). A *conditional*
target (CDPG, Korbak et al. 2022) has one partition function :math:`Z_c` per prompt ``c``; the
formula for :math:`\log P` is the same, only the :class:`~objectives.partition.LogZEstimator` keys
differ. Scores arrive as a mapping ``feature name -> tensor of shape [batch]``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from objectives._tensors import as_tensor, check_no_nan
from objectives.errors import ScoreError

Features = Mapping[str, "torch.Tensor | list[float]"]


class Energy(ABC):
    r"""One factor :math:`\Phi(x)` of the unnormalised target, given as :math:`\log\Phi(x)`."""

    @property
    @abstractmethod
    def features(self) -> tuple[str, ...]:
        """Names of the scores this factor reads."""

    @abstractmethod
    def log_factor(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        r""":math:`\log\Phi(x)` per sample from validated float tensors of shape ``[batch]``."""

    def describe(self) -> str:
        return repr(self)


@dataclass(frozen=True)
class KLRegularisedReward(Energy):
    r""":math:`\Phi(x) = \exp(r(x)/\beta)`: with reverse KL, :math:`\max_\pi E_\pi[r] - \beta KL(\pi\|a)`."""

    reward: str = "reward"
    beta: float = 0.1

    def __post_init__(self) -> None:
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a positive finite number (the KL coefficient), got {self.beta!r}")

    @property
    def features(self) -> tuple[str, ...]:
        return (self.reward,)

    def log_factor(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return features[self.reward] / self.beta

    def describe(self) -> str:
        return f"exp({self.reward}/{self.beta:g})"


@dataclass(frozen=True)
class BinaryConstraint(Energy):
    r""":math:`\Phi(x) = b(x) \in \{0, 1\}`: :math:`\log b = 0` where satisfied, ``-inf`` where not."""

    feature: str = "b"

    @property
    def features(self) -> tuple[str, ...]:
        return (self.feature,)

    def log_factor(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        b = features[self.feature]
        if not bool(((b == 0) | (b == 1)).all()):
            bad = b[(b != 0) & (b != 1)][0]
            raise ScoreError(
                f"binary constraint {self.feature!r} must score every sample 0 or 1 (or False/True), "
                f"got {float(bad)!r}; use ExponentialFamily for graded features"
            )
        return torch.where(b > 0, torch.zeros_like(b), torch.full_like(b, -math.inf))

    def describe(self) -> str:
        return f"{self.feature}"


@dataclass
class ExponentialFamily(Energy):
    r""":math:`\Phi(x) = \exp\big(\sum_i \lambda_i \phi_i(x)\big)`.

    The coefficients are usually fitted with :func:`objectives.moments.fit_lambdas` so that the
    normalised target meets moment constraints :math:`E_p[\phi_i] = \bar\mu_i`.
    """

    lambdas: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.lambdas:
            raise ValueError("ExponentialFamily needs at least one feature: lambdas={'feature': value}")
        for name, lam in self.lambdas.items():
            if not math.isfinite(float(lam)):
                raise ValueError(f"lambda for feature {name!r} must be finite, got {lam!r}")

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(self.lambdas)

    def log_factor(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = None
        for name, lam in self.lambdas.items():
            term = float(lam) * features[name]
            total = term if total is None else total + term
        assert total is not None
        return total

    def describe(self) -> str:
        return "exp(" + " + ".join(f"{lam:.4g}*{name}" for name, lam in self.lambdas.items()) + ")"


@dataclass(frozen=True)
class Target:
    r"""An unnormalised target :math:`P(x\mid c) = a(x\mid c)^{[\text{include\_base}]}\prod_k\Phi_k(x, c)`.

    Attributes:
        energies: the factors :math:`\Phi_k`.
        include_base: multiply by the base model :math:`a` (almost always; ``False`` for a target that
            is only the energy, e.g. a uniform prior).
        conditional: one partition function :math:`Z_c` per prompt ``c`` (CDPG) instead of one global Z.
    """

    energies: tuple[Energy, ...] = ()
    include_base: bool = True
    conditional: bool = False

    @property
    def features(self) -> tuple[str, ...]:
        """Every score name the target needs, in order of first use."""
        seen: dict[str, None] = {}
        for energy in self.energies:
            for name in energy.features:
                seen.setdefault(name, None)
        return tuple(seen)

    def validate(self, log_a: torch.Tensor, features: Features) -> dict[str, torch.Tensor]:
        """Check presence, shape and NaN-freedom of the scores; return them as float tensors."""
        missing = [name for name in self.features if name not in features]
        if missing:
            raise ScoreError(
                f"the target {self.describe()} needs scores {missing} but got {sorted(features)}; "
                "make the task's scorers return them"
            )
        out: dict[str, torch.Tensor] = {}
        for name in self.features:
            t = as_tensor(features[name], f"score {name!r}").to(device=log_a.device)
            if t.shape != log_a.shape:
                raise ScoreError(
                    f"score {name!r} has shape {tuple(t.shape)} but log_a has shape {tuple(log_a.shape)}: "
                    "scorers must return one number per sample"
                )
            check_no_nan(t, f"score {name!r}")
            out[name] = t.to(torch.float64 if log_a.device.type != "mps" else torch.float32)
        return out

    def log_energy(self, features: Features, like: torch.Tensor) -> torch.Tensor:
        r""":math:`\sum_k \log\Phi_k(x)` per sample (``like`` gives batch shape and device)."""
        checked = self.validate(like, features)
        total = torch.zeros(like.shape, dtype=next(iter(checked.values())).dtype if checked else torch.float64,
                            device=like.device)
        for energy in self.energies:
            total = total + energy.log_factor(checked)
        return total

    def log_P(self, log_a: torch.Tensor, features: Features) -> torch.Tensor:
        r""":math:`\log P(x\mid c) = \log a(x\mid c) + \sum_k \log\Phi_k(x, c)` per sample (float64 on CPU)."""
        log_a = as_tensor(log_a, "log_a")
        check_no_nan(log_a, "log_a")
        log_energy = self.log_energy(features, log_a)
        if not self.include_base:
            return log_energy
        return log_a.to(log_energy.dtype) + log_energy

    def __mul__(self, other: Target | Energy) -> Target:
        if isinstance(other, Energy):
            other = Target((other,))
        if not isinstance(other, Target):
            return NotImplemented
        return Target(
            self.energies + other.energies,
            include_base=self.include_base or other.include_base,
            conditional=self.conditional or other.conditional,
        )

    def as_conditional(self, conditional: bool = True) -> Target:
        """The same target with one partition function per prompt (``conditional=True``)."""
        return Target(self.energies, self.include_base, conditional)

    def describe(self) -> str:
        parts = (["a"] if self.include_base else []) + [e.describe() for e in self.energies]
        text = " * ".join(parts) or "1"
        return f"P(x|c) = {text}" if self.conditional else f"P(x) = {text}"


def rl_with_kl(reward: str = "reward", beta: float = 0.1) -> Target:
    r""":math:`P = a\,\exp(r/\beta)`: reverse KL toward it is KL-regularised RL (RLHF)."""
    return Target((KLRegularisedReward(reward, beta),))


def binary_constraint(feature: str = "b") -> Target:
    r""":math:`P = a\,b`: forward KL toward it is GDC/DPG with a pointwise constraint."""
    return Target((BinaryConstraint(feature),))


def exponential_family(lambdas: Mapping[str, float] | Iterable[str]) -> Target:
    r""":math:`P = a\,\exp(\sum_i\lambda_i\phi_i)`; feature names alone start at :math:`\lambda = 0`."""
    lam = dict(lambdas) if isinstance(lambdas, Mapping) else {name: 0.0 for name in lambdas}
    return Target((ExponentialFamily({k: float(v) for k, v in lam.items()}),))
