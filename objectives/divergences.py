r"""f-divergences, their generators, and the f-DPG pseudo-reward.

An f-divergence between the policy :math:`\pi_\theta` and the target :math:`p` is

.. math::  D_f(\pi_\theta \| p) = \mathbb{E}_{x\sim p}\big[f\big(\pi_\theta(x)/p(x)\big)\big],

for a convex generator :math:`f` with :math:`f(1) = 0` (Go et al. 2023, "Aligning language models
with preferences through f-divergence minimization"). Its gradient is

.. math::  \nabla_\theta D_f(\pi_\theta \| p) = \mathbb{E}_{x\sim\pi_\theta}\big[f'(t(x))\,
           \nabla_\theta \log \pi_\theta(x)\big], \qquad t(x) = \pi_\theta(x)/p(x),

so each sample gets the pseudo-reward :math:`R(x) = -f'(t(x))` and REINFORCE does the rest.

Everything here is evaluated from :math:`\log t` (never from :math:`t`, which overflows): inputs are
promoted to float64 internally and cast back, so :math:`|\log t|` up to 700 gives exact values in
float64 and the correctly rounded value (possibly ``±inf`` when it exceeds the range) in float32,
never NaN. Where :math:`p(x) = 0` (a violated binary constraint) :math:`t = \infty` and the
pseudo-reward is :math:`-f'(\infty)`: finite for forward KL (0), TV (1/2), JS (log 2), Hellinger (1),
infinite for reverse KL, for which :meth:`Divergence.pseudo_reward` raises :class:`ZeroTargetError`
unless an explicit ``max_log_ratio`` clip is requested.

Conventions: ``f`` is the generator of :math:`D_f(\pi\|p)`, so forward KL :math:`KL(p\|\pi)` has
:math:`f(t) = -\log t` and reverse KL :math:`KL(\pi\|p)` has :math:`f(t) = t\log t`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F

from objectives._tensors import as_tensor, broadcast_pair, check_no_nan, wide_dtype
from objectives.errors import ZeroTargetError

LOG2 = math.log(2.0)


class Divergence(ABC):
    r"""An f-divergence :math:`D_f(\pi\|p) = E_p[f(\pi/p)]` given by its generator ``f``.

    Subclasses implement :meth:`_f` and :meth:`_f_prime` on float64 tensors of :math:`\log t` and
    set :attr:`f_prime_inf` :math:`= \lim_{t\to\infty} f'(t)` (``math.inf`` when unbounded).
    """

    name: str = "divergence"
    description: str = ""
    f_prime_inf: float = math.inf

    # ----------------------------------------------------------------- implemented by subclasses
    @abstractmethod
    def _f(self, log_t: torch.Tensor) -> torch.Tensor:
        """``f(exp(log_t))`` on a wide-precision tensor; must be differentiable in ``log_t``."""

    @abstractmethod
    def _f_prime(self, log_t: torch.Tensor) -> torch.Tensor:
        """``f'(exp(log_t))`` on a wide-precision tensor."""

    # ----------------------------------------------------------------- public, dtype-preserving API
    def f(self, log_t: torch.Tensor) -> torch.Tensor:
        r"""The generator :math:`f(t)` at :math:`t = e^{\log t}` (differentiable, dtype preserved)."""
        log_t = as_tensor(log_t, "log_t")
        wide = log_t.to(wide_dtype(log_t))
        raw = self._f(wide)
        # At t = inf keep the generator's own limit (-inf for forward KL); only an undefined inf - inf
        # (e.g. Jensen-Shannon) becomes +inf, the limit of a convex f with f'(inf) > 0.
        out = torch.where((wide == math.inf) & torch.isnan(raw), torch.full_like(wide, math.inf), raw)
        return out.to(log_t.dtype)

    def f_prime(self, log_t: torch.Tensor) -> torch.Tensor:
        r"""The derivative :math:`f'(t)` at :math:`t = e^{\log t}`; ``log_t = +inf`` gives :math:`f'(\infty)`."""
        log_t = as_tensor(log_t, "log_t")
        wide = log_t.to(wide_dtype(log_t))
        safe = torch.where(wide == math.inf, torch.zeros_like(wide), wide)
        out = torch.where(wide == math.inf, torch.full_like(wide, self.f_prime_inf), self._f_prime(safe))
        return out.to(log_t.dtype)

    def log_ratio(
        self, log_pi: torch.Tensor, log_p: torch.Tensor
    ) -> torch.Tensor:
        r""":math:`\log t = \log\pi - \log p` with :math:`\log p = -\infty` mapped to :math:`+\infty`.

        Checks for NaN and broadcastable shapes and works in wide precision; the result has the
        promoted dtype of the two inputs.
        """
        log_pi = as_tensor(log_pi, "log_pi")
        log_p = as_tensor(log_p, "log_p")
        check_no_nan(log_pi, "log_pi")
        check_no_nan(log_p, "log_p")
        log_pi, log_p = broadcast_pair(log_pi, log_p, "log_pi", "log_p")
        if bool((log_p == math.inf).any()):
            raise ZeroTargetError("log_p contains +inf: the target must be a normalised probability (log p <= 0)")
        dtype = wide_dtype(log_pi)
        zero_p = log_p == -math.inf
        log_t = torch.where(zero_p, torch.full_like(log_p, math.inf, dtype=dtype), log_pi.to(dtype) - log_p.to(dtype))
        return log_t

    def pseudo_reward(
        self,
        log_pi: torch.Tensor,
        log_p: torch.Tensor,
        *,
        max_log_ratio: float | None = None,
        grad: bool = False,
    ) -> torch.Tensor:
        r"""The f-DPG pseudo-reward :math:`R(x) = -f'(\pi(x)/p(x))`.

        Args:
            log_pi: :math:`\log\pi_\theta(x)` per sample (any shape broadcastable with ``log_p``).
            log_p: :math:`\log p(x) = \log P(x) - \log Z`; ``-inf`` where :math:`p(x) = 0`.
            max_log_ratio: optional clip :math:`\log t \le` ``max_log_ratio``. Only needed when
                :math:`f'(\infty) = \infty` (reverse KL, Pearson) and some :math:`p(x) = 0`: then the true
                divergence is infinite and the clipped pseudo-reward is a documented, biased surrogate.
            grad: keep the autograd graph (default: computed without gradients).

        Returns:
            The pseudo-reward in the promoted dtype of the inputs.

        Raises:
            ZeroTargetError: :math:`p(x) = 0` for some sample while :math:`f'(\infty) = \infty` and no clip.
            ScoreError: NaN inputs or shapes that do not broadcast.
        """
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            out_dtype = torch.promote_types(as_tensor(log_pi, "log_pi").dtype, as_tensor(log_p, "log_p").dtype)
            log_t = self.log_ratio(log_pi, log_p)
            if max_log_ratio is not None:
                log_t = log_t.clamp(max=float(max_log_ratio))
            elif math.isinf(self.f_prime_inf) and bool((log_t == math.inf).any()):
                n = int((log_t == math.inf).sum())
                raise ZeroTargetError(f"{n} sample(s) have p(x) = 0 (log p = -inf), where "
                                      + self.zero_target_problem())
            return (-self.f_prime(log_t)).to(out_dtype)

    def zero_target_problem(self) -> str:
        """Why this divergence cannot train toward a target with zeros, and what to do instead."""
        return (f"the pseudo-reward of divergence {self.name!r} is -f'(inf) = -inf and D_f(pi||p) is infinite. Use a "
                "divergence with a finite f'(inf) (fkl, tv, js, hellinger, alpha:<1), or pass max_log_ratio=... to "
                "clip log(pi/p) (a biased surrogate).")

    def estimate(
        self, log_pi: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor | None = None
    ) -> torch.Tensor:
        r"""Importance-sampling estimate of :math:`D_f(\pi\|p)` from samples of a proposal :math:`q`.

        Uses :math:`D_f(\pi\|p) = E_p[f(t)] = E_\pi[f(t)/t] = E_q[\tfrac{\pi}{q} f(t)/t]` with
        :math:`f(t)/t \to f'(\infty)` where :math:`p = 0`; ``log_q=None`` means the samples come from
        :math:`\pi` itself. Returns a 0-d tensor (float64 on CPU).
        """
        with torch.no_grad():
            log_t = self.log_ratio(log_pi, log_p)
            finite = log_t != math.inf
            safe = torch.where(finite, log_t, torch.zeros_like(log_t))
            f_over_t = torch.where(finite, self._f(safe) * torch.exp(-safe), torch.full_like(log_t, self.f_prime_inf))
            if log_q is None:
                return f_over_t.mean()
            log_w = as_tensor(log_pi, "log_pi").to(log_t.dtype) - as_tensor(log_q, "log_q").to(log_t.dtype)
            # A sample of q where pi(x) = 0 contributes nothing to E_pi (avoid 0 * inf = NaN).
            terms = torch.where(log_w == -math.inf, torch.zeros_like(f_over_t), torch.exp(log_w) * f_over_t)
            return terms.mean()

    def exact(self, log_pi: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        r"""Exact :math:`D_f(\pi\|p) = \sum_x p(x) f(\pi(x)/p(x))` over an enumerated support.

        ``log_pi`` and ``log_p`` list every sequence of the (finite) support, in the same order.
        Where :math:`p(x) = 0` the term is its limit :math:`\pi(x) f'(\infty)`. Differentiable in
        ``log_pi`` (used as ground truth by the exact toy tests).
        """
        dtype = wide_dtype(log_pi)
        log_pi = log_pi.to(dtype)
        log_p = as_tensor(log_p, "log_p").to(dtype)
        zero_p = log_p == -math.inf
        log_t = torch.where(zero_p, torch.zeros_like(log_pi), log_pi - torch.where(zero_p, 0.0, log_p))
        inside = torch.where(zero_p, torch.zeros_like(log_pi), torch.exp(log_p) * self._f(log_t))
        total = inside.sum()
        if bool(zero_p.any()):
            mass = torch.exp(log_pi[zero_p]).sum()
            if math.isinf(self.f_prime_inf):
                if bool(mass > 0):
                    return total + mass * math.inf
            else:
                total = total + self.f_prime_inf * mass
        return total

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# --------------------------------------------------------------------------------- built-ins
class ReverseKL(Divergence):
    r"""Reverse KL :math:`KL(\pi\|p)`: :math:`f(t) = t\log t`, :math:`f'(t) = \log t + 1`, :math:`f'(\infty) = \infty`.

    With :math:`P = a\,e^{r/\beta}` the pseudo-reward is :math:`r/\beta - \log(\pi/a) + \text{const}`: RLHF.
    """

    name = "rkl"
    description = "reverse KL(pi||p), f(t) = t log t; with P = a exp(r/beta) this is KL-regularised RL (RLHF)"
    f_prime_inf = math.inf

    def _f(self, log_t: torch.Tensor) -> torch.Tensor:
        t = torch.exp(log_t)
        return torch.where(log_t == -math.inf, torch.zeros_like(t), t * log_t)

    def _f_prime(self, log_t: torch.Tensor) -> torch.Tensor:
        return log_t + 1.0


class ForwardKL(Divergence):
    r"""Forward KL :math:`KL(p\|\pi)`: :math:`f(t) = -\log t`, :math:`f'(t) = -1/t`, :math:`f'(\infty) = 0`.

    The pseudo-reward is :math:`p/\pi`: distributional policy gradients (DPG, GDC).
    """

    name = "fkl"
    description = "forward KL(p||pi), f(t) = -log t; the pseudo-reward p/pi is DPG/GDC"
    f_prime_inf = 0.0

    def _f(self, log_t: torch.Tensor) -> torch.Tensor:
        return -log_t

    def _f_prime(self, log_t: torch.Tensor) -> torch.Tensor:
        return -torch.exp(-log_t)


class TotalVariation(Divergence):
    r"""Total variation :math:`\tfrac12\sum|\pi - p|`.

    :math:`f(t) = |t - 1|/2`, :math:`f'(t) = \mathrm{sign}(t-1)/2`, :math:`f'(\infty) = 1/2`.
    """

    name = "tv"
    description = "total variation distance, f(t) = |t - 1| / 2"
    f_prime_inf = 0.5

    def _f(self, log_t: torch.Tensor) -> torch.Tensor:
        return torch.abs(torch.expm1(log_t)) / 2.0

    def _f_prime(self, log_t: torch.Tensor) -> torch.Tensor:
        return torch.sign(log_t) / 2.0


class JensenShannon(Divergence):
    r"""Jensen-Shannon: :math:`f(t) = t\log\frac{2t}{t+1} + \log\frac{2}{t+1}`.

    :math:`D_f = KL(\pi\|m) + KL(p\|m)` with :math:`m = (\pi+p)/2` (twice the usual JS);
    :math:`f'(t) = \log\frac{2t}{t+1} = \log 2 - \mathrm{softplus}(-\log t)`, :math:`f'(\infty) = \log 2`.
    """

    name = "js"
    description = "Jensen-Shannon, f(t) = t log(2t/(t+1)) + log(2/(t+1)) (= KL(pi||m) + KL(p||m))"
    f_prime_inf = LOG2

    def _f(self, log_t: torch.Tensor) -> torch.Tensor:
        t = torch.exp(log_t)
        first = torch.where(log_t == -math.inf, torch.zeros_like(t), t * (LOG2 - F.softplus(-log_t)))
        return first + LOG2 - F.softplus(log_t)

    def _f_prime(self, log_t: torch.Tensor) -> torch.Tensor:
        return LOG2 - F.softplus(-log_t)


class Alpha(Divergence):
    r"""Amari :math:`\alpha`-divergence, :math:`f_\alpha(t) = \frac{t^\alpha-\alpha t-(1-\alpha)}{\alpha(\alpha-1)}`.

    :math:`f'_\alpha(t) = \frac{t^{\alpha-1} - 1}{\alpha - 1}`, :math:`f'(\infty) = 1/(1-\alpha)` for
    :math:`\alpha < 1`, :math:`\infty` otherwise. The limit :math:`\alpha \to 1` is
    :math:`t\log t - t + 1` (reverse KL) and :math:`\alpha \to 0` is :math:`-\log t + t - 1` (forward KL);
    the linear terms do not change :math:`D_f` since :math:`E_p[t - 1] = 0`. :math:`\alpha = 1/2` gives
    :math:`2(\sqrt t - 1)^2`, twice :class:`SquaredHellinger` (four times :math:`\tfrac12\sum(\sqrt\pi - \sqrt p)^2`).
    """

    def __init__(self, alpha: float) -> None:
        self.alpha = float(alpha)
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        self.name = f"alpha:{self.alpha:g}"
        self.description = f"Amari alpha-divergence with alpha = {self.alpha:g} (1 -> reverse KL, 0 -> forward KL)"
        self.f_prime_inf = 1.0 / (1.0 - self.alpha) if self.alpha < 1 else math.inf

    def _f(self, log_t: torch.Tensor) -> torch.Tensor:
        a = self.alpha
        if a == 1.0:
            return ReverseKL()._f(log_t) - torch.expm1(log_t)
        if a == 0.0:
            return -log_t + torch.expm1(log_t)
        out = (torch.expm1(a * log_t) - a * torch.expm1(log_t)) / (a * (a - 1.0))
        # Both powers overflow only beyond |log t| ~ 709; f_alpha >= 0, so the limit there is +inf.
        return torch.where(torch.isnan(out), torch.full_like(out, math.inf), out)

    def _f_prime(self, log_t: torch.Tensor) -> torch.Tensor:
        a = self.alpha
        if a == 1.0:
            return log_t
        return torch.expm1((a - 1.0) * log_t) / (a - 1.0)


class PearsonChi2(Divergence):
    r"""Pearson :math:`\chi^2(\pi\|p)`: :math:`f(t) = (t-1)^2`, :math:`f'(t) = 2(t-1)`, :math:`f'(\infty)=\infty`."""

    name = "chi2"
    description = "Pearson chi-squared, f(t) = (t - 1)^2"
    f_prime_inf = math.inf

    def _f(self, log_t: torch.Tensor) -> torch.Tensor:
        return torch.expm1(log_t) ** 2

    def _f_prime(self, log_t: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.expm1(log_t)


class SquaredHellinger(Divergence):
    r"""Squared Hellinger: :math:`f(t) = (\sqrt t - 1)^2`, :math:`f'(t) = 1 - t^{-1/2}`, :math:`f'(\infty) = 1`."""

    name = "hellinger"
    description = "squared Hellinger distance, f(t) = (sqrt(t) - 1)^2"
    f_prime_inf = 1.0

    def _f(self, log_t: torch.Tensor) -> torch.Tensor:
        return torch.expm1(log_t / 2.0) ** 2

    def _f_prime(self, log_t: torch.Tensor) -> torch.Tensor:
        return -torch.expm1(-log_t / 2.0)


# --------------------------------------------------------------------------------- user-defined
GeneratorFn = Callable[[torch.Tensor], torch.Tensor]


class CustomDivergence(Divergence):
    r"""A divergence from a user's generator ``f(t)`` written with torch operations.

    :math:`f'` comes from autograd (in float64 at :math:`t = e^{\log t}`), :math:`f'(\infty)` from a
    limit (or the ``f_prime_inf`` argument). Validated at construction: :math:`f(1) = 0`, ``f`` and
    :math:`f'` finite on the grid :math:`t \in [e^{-10}, e^{10}]`, and convexity (:math:`f'`
    non-decreasing on the grid); a failure raises :class:`InvalidGeneratorError` naming the check and t.

    Example::

        # Neyman chi-squared, f(t) = (t - 1)^2 / t
        neyman = CustomDivergence(lambda t: (t - 1) ** 2 / t, name="neyman")
    """

    def __init__(
        self,
        fn: GeneratorFn,
        name: str = "custom",
        description: str = "",
        f_prime_inf: float | None = None,
        validate: bool = True,
    ) -> None:
        from objectives.generator_checks import limit_f_prime_at_infinity, validate_generator

        self._fn = fn
        self.name = name
        self.description = description or f"user-defined generator {name!r}"
        if validate:
            validate_generator(self, name)
        self.f_prime_inf = float(f_prime_inf) if f_prime_inf is not None else limit_f_prime_at_infinity(self)

    def _f(self, log_t: torch.Tensor) -> torch.Tensor:
        return self._fn(torch.exp(log_t))

    def _f_prime(self, log_t: torch.Tensor) -> torch.Tensor:
        # Keep the graph (create_graph) when log_t carries one, e.g. pseudo_reward(..., grad=True).
        keep = log_t.requires_grad
        with torch.enable_grad():
            t = torch.exp(log_t) if keep else torch.exp(log_t.detach()).requires_grad_(True)
            (grad,) = torch.autograd.grad(self._fn(t).sum(), t, create_graph=keep)
        return grad
