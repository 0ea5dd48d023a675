r"""Utility functions :math:`U` of ranking-based reward-model training, and prompt-aware utilities.

A reward model :math:`R(\text{prompt}, y)` is trained on rankings by maximising, over the ranked pairs
:math:`(y_w \succ y_l)` of each prompt,

.. math::  \sum_{(w, l)} U\big(R(\text{prompt}, y_w) - R(\text{prompt}, y_l)\big),

with an increasing concave utility :math:`U` (Song, Cai, Lee, Su 2023, "Reward collapse in aligning large
language models"). With a single :math:`U` for every prompt the optimal rewards of every prompt follow one
and the same distribution (*reward collapse*, see :mod:`objectives.reward_collapse`); the remedy is a
*prompt-aware* utility, :class:`PromptAwareUtility`, which picks :math:`U` per pair from the prompt.

The families, by their :func:`get_utility` names:

- ``power`` :math:`U(x) = x^\gamma`, :math:`0 < \gamma < 1`;
- ``neg_power`` :math:`U(x) = -x^{-\gamma}`, :math:`0 < \gamma \le 1` (``neg_power:1`` is :math:`-1/x`);
- ``log`` :math:`U(x) = \log x` (the :math:`\gamma = 0` member between the two);
- ``log_sigmoid`` :math:`U(x) = \log\sigma(x/\sigma_0)` with a temperature :math:`\sigma_0 > 0` (the
  Bradley-Terry log-likelihood when :math:`\sigma_0 = 1`);
- ``linear`` :math:`U(x) = x`.

The first three are *bounded* utilities (:attr:`Utility.bounded`): they are only meaningful for rewards in
:math:`[0, 1]`, whose differences lie in :math:`[-1, 1]`, and their closed forms only exist for
:math:`x > 0`. Training sees negative differences (misordered pairs), so each is continued below a small
:math:`\varepsilon` (the ``eps`` field, :data:`DEFAULT_EPS` :math:`= 10^{-6}`) by its tangent line,

.. math::  U_\varepsilon(x) = \begin{cases} U(x) & x > \varepsilon,\\
           U(\varepsilon) + U'(\varepsilon)\,(x - \varepsilon) & x \le \varepsilon, \end{cases}

which is :math:`C^1`, increasing and concave on the whole real line (the tangent of a concave function lies
above it and :math:`U'` decreases), finite at :math:`x = 0` and for :math:`x < 0`, with finite autograd
gradients everywhere. The slope below :math:`\varepsilon` is :math:`U'(\varepsilon)`: :math:`10^{12}` for
:math:`-1/x` with the default :math:`\varepsilon`, so training with a bounded family usually wants a larger
``eps`` (e.g. ``get_utility("neg_power", gamma=1, eps=1e-2)``), which caps the gradient at
:math:`U'(\varepsilon)`. ``log_sigmoid`` and ``linear`` are defined everywhere and work with unbounded
rewards too.

:func:`ranking_loss` is :math:`-\frac1N\sum_k U(\Delta_k - m_k)` over a batch of pair differences
:math:`\Delta_k = R(\text{prompt}_k, y_{w,k}) - R(\text{prompt}_k, y_{l,k})` and optional margins :math:`m_k`.
"""

from __future__ import annotations

import difflib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from objectives._tensors import as_tensor, check_no_nan
from objectives.errors import ObjectiveError, ScoreError

DEFAULT_EPS = 1e-6
"""Where the bounded families switch to their tangent line (see the module docstring)."""

#: Relative step of the central differences that give the derivatives of a NumPy-only user utility.
FD_RELATIVE_STEP = 1e-4


class UtilityError(ObjectiveError):
    """A utility parameter out of its family's range, or a user function that is not a utility."""


class UnknownUtilityError(UtilityError, KeyError):
    """A utility name, or a prompt-aware key, that is not known."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


def _format(value: float) -> str:
    return f"{value:g}"


# --------------------------------------------------------------------------------------------- base class
class Utility(ABC):
    r"""An increasing concave utility :math:`U` applied elementwise to reward differences.

    Subclasses implement :meth:`_value` (differentiable in torch) and may override :meth:`derivative` and
    :meth:`second_derivative` with closed forms; the defaults use autograd.
    """

    #: Whether :math:`U` is only meaningful for rewards in :math:`[0, 1]` (differences in :math:`[-1, 1]`).
    bounded: ClassVar[bool] = False

    @property
    @abstractmethod
    def name(self) -> str:
        """The spec that :func:`get_utility` parses back into this utility (e.g. ``"power:0.5"``)."""

    @abstractmethod
    def _value(self, diff: torch.Tensor) -> torch.Tensor:
        """:math:`U` on a floating tensor, differentiable, finite wherever the family is defined."""

    def __call__(self, diff: torch.Tensor | float | Sequence[float]) -> torch.Tensor:
        """:math:`U(\\text{diff})` elementwise, in the dtype of ``diff`` (floats and lists become float64)."""
        return self._value(as_tensor(diff, "diff"))

    def derivative(self, diff: torch.Tensor | float | Sequence[float]) -> torch.Tensor:
        """:math:`U'(\\text{diff})` elementwise (no graph kept)."""
        return _autograd_derivatives(self._value, as_tensor(diff, "diff"))[0]

    def second_derivative(self, diff: torch.Tensor | float | Sequence[float]) -> torch.Tensor:
        """:math:`U''(\\text{diff})` elementwise (no graph kept)."""
        return _autograd_derivatives(self._value, as_tensor(diff, "diff"))[1]

    def __str__(self) -> str:
        return self.name


def _autograd_derivatives(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """First and second derivatives of an elementwise ``fn`` at ``x`` by autograd (zeros where unused)."""
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        y = fn(x)
        if not y.requires_grad:  # a constant function
            return torch.zeros_like(x), torch.zeros_like(x)
        (d1,) = torch.autograd.grad(y.sum(), x, create_graph=True, allow_unused=True)
        if d1 is None:
            return torch.zeros_like(x).detach(), torch.zeros_like(x).detach()
        if not d1.requires_grad:  # a linear function
            return d1.detach(), torch.zeros_like(x)
        (d2,) = torch.autograd.grad(d1.sum(), x, allow_unused=True)
        d2 = torch.zeros_like(x) if d2 is None else d2
    return d1.detach(), d2.detach()


# --------------------------------------------------------------------------------------------- families
def _check_eps(family: str, eps: float) -> None:
    if not (isinstance(eps, int | float) and 0.0 < eps < 1.0):
        raise UtilityError(
            f"{family}: eps={eps!r} must lie in (0, 1); it is where U switches to its tangent line, pick a small "
            f"value such as {DEFAULT_EPS:g} (or 1e-2 for gentler training gradients)"
        )


class BoundedUtility(Utility):
    r"""A bounded family (rewards in :math:`[0, 1]`): its closed form above ``eps``, its tangent line below.

    Subclasses give :math:`U, U', U''` on :math:`x \ge \varepsilon`; :math:`U'' = 0` below.
    """

    bounded: ClassVar[bool] = True
    eps: float

    @abstractmethod
    def _closed(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`U` on :math:`x \\ge \\varepsilon`."""

    @abstractmethod
    def _closed_d1(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`U'` on :math:`x \\ge \\varepsilon`."""

    @abstractmethod
    def _closed_d2(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`U''` on :math:`x \\ge \\varepsilon`."""

    def _value(self, diff: torch.Tensor) -> torch.Tensor:
        # The closed form only ever sees x >= eps (so neither its value nor its gradient is inf/NaN);
        # torch.where then routes the gradient of each element to the branch it uses.
        safe = diff.clamp(min=self.eps)
        eps = torch.full_like(diff, self.eps)
        tangent = self._closed(eps) + self._closed_d1(eps) * (diff - self.eps)
        return torch.where(diff > self.eps, self._closed(safe), tangent)

    def derivative(self, diff: torch.Tensor | float | Sequence[float]) -> torch.Tensor:
        diff = as_tensor(diff, "diff").detach()
        return self._closed_d1(diff.clamp(min=self.eps))

    def second_derivative(self, diff: torch.Tensor | float | Sequence[float]) -> torch.Tensor:
        diff = as_tensor(diff, "diff").detach()
        return torch.where(diff > self.eps, self._closed_d2(diff.clamp(min=self.eps)), torch.zeros_like(diff))


@dataclass(frozen=True)
class Power(BoundedUtility):
    r""":math:`U(x) = x^\gamma` for :math:`0 < \gamma < 1`, tangent line below ``eps``."""

    gamma: float
    eps: float = DEFAULT_EPS

    def __post_init__(self) -> None:
        g = self.gamma
        if not (isinstance(g, int | float) and 0.0 < g < 1.0):
            hint = " (gamma = 1 is 'linear', gamma = 0 is 'log')" if g in (0, 1) else ""
            raise UtilityError(f"power (x^gamma): gamma={g!r} must lie in the open interval (0, 1){hint}")
        _check_eps("power", self.eps)

    @property
    def name(self) -> str:
        return f"power:{_format(self.gamma)}"

    def _closed(self, x: torch.Tensor) -> torch.Tensor:
        return x.pow(self.gamma)

    def _closed_d1(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * x.pow(self.gamma - 1.0)

    def _closed_d2(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * (self.gamma - 1.0) * x.pow(self.gamma - 2.0)


@dataclass(frozen=True)
class NegPower(BoundedUtility):
    r""":math:`U(x) = -x^{-\gamma}` for :math:`0 < \gamma \le 1` (``gamma=1``: :math:`-1/x`), tangent below ``eps``."""

    gamma: float
    eps: float = DEFAULT_EPS

    def __post_init__(self) -> None:
        g = self.gamma
        if not (isinstance(g, int | float) and 0.0 < g <= 1.0):
            hint = " (gamma = 0 is 'log')" if g == 0 else ""
            raise UtilityError(f"neg_power (-x^-gamma): gamma={g!r} must lie in the half-open interval (0, 1]{hint}")
        _check_eps("neg_power", self.eps)

    @property
    def name(self) -> str:
        return f"neg_power:{_format(self.gamma)}"

    def _closed(self, x: torch.Tensor) -> torch.Tensor:
        return -x.pow(-self.gamma)

    def _closed_d1(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * x.pow(-self.gamma - 1.0)

    def _closed_d2(self, x: torch.Tensor) -> torch.Tensor:
        return -self.gamma * (self.gamma + 1.0) * x.pow(-self.gamma - 2.0)


@dataclass(frozen=True)
class Log(BoundedUtility):
    r""":math:`U(x) = \log x`, tangent line below ``eps``."""

    eps: float = DEFAULT_EPS

    def __post_init__(self) -> None:
        _check_eps("log", self.eps)

    @property
    def name(self) -> str:
        return "log"

    def _closed(self, x: torch.Tensor) -> torch.Tensor:
        return x.log()

    def _closed_d1(self, x: torch.Tensor) -> torch.Tensor:
        return x.reciprocal()

    def _closed_d2(self, x: torch.Tensor) -> torch.Tensor:
        return -x.pow(-2.0)


@dataclass(frozen=True)
class LogSigmoid(Utility):
    r""":math:`U(x) = \log\sigma(x/\sigma_0) = -\log(1 + e^{-x/\sigma_0})`, defined on the whole real line."""

    sigma: float = 1.0

    def __post_init__(self) -> None:
        s = self.sigma
        if not (isinstance(s, int | float) and 0.0 < s < math.inf):
            raise UtilityError(f"log_sigmoid: sigma={s!r} must be a positive finite temperature, e.g. 1.0")

    @property
    def name(self) -> str:
        return f"log_sigmoid:{_format(self.sigma)}"

    def _value(self, diff: torch.Tensor) -> torch.Tensor:
        return F.logsigmoid(diff / self.sigma)

    def derivative(self, diff: torch.Tensor | float | Sequence[float]) -> torch.Tensor:
        diff = as_tensor(diff, "diff").detach()
        return torch.sigmoid(-diff / self.sigma) / self.sigma

    def second_derivative(self, diff: torch.Tensor | float | Sequence[float]) -> torch.Tensor:
        z = as_tensor(diff, "diff").detach() / self.sigma
        return -torch.sigmoid(z) * torch.sigmoid(-z) / self.sigma**2


@dataclass(frozen=True)
class Linear(Utility):
    r""":math:`U(x) = x`: the Borda-count-like utility, whose optimal rewards are polarised at 0 and 1."""

    @property
    def name(self) -> str:
        return "linear"

    def _value(self, diff: torch.Tensor) -> torch.Tensor:
        return diff.clone()

    def derivative(self, diff: torch.Tensor | float | Sequence[float]) -> torch.Tensor:
        return torch.ones_like(as_tensor(diff, "diff"))

    def second_derivative(self, diff: torch.Tensor | float | Sequence[float]) -> torch.Tensor:
        return torch.zeros_like(as_tensor(diff, "diff"))


# --------------------------------------------------------------------------------------------- user-defined
@dataclass(frozen=True)
class FunctionUtility(Utility):
    r"""A user's :math:`U` from a function; see :func:`utility_from_function`."""

    fn: Callable[[Any], Any]
    label: str = "custom"
    is_bounded: bool = False
    uses_torch: bool = True
    d1: Callable[[Any], Any] | None = field(default=None, repr=False)
    d2: Callable[[Any], Any] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.label

    @property
    def bounded(self) -> bool:  # type: ignore[override]
        return self.is_bounded

    def _apply(self, fn: Callable[[Any], Any], diff: torch.Tensor) -> torch.Tensor:
        if self.uses_torch:
            out = fn(diff)
            return out if isinstance(out, torch.Tensor) else torch.as_tensor(out, dtype=diff.dtype)
        values = np.asarray(fn(diff.detach().cpu().numpy().astype(np.float64)), dtype=np.float64)
        return torch.as_tensor(values, dtype=diff.dtype, device=diff.device)

    def _value(self, diff: torch.Tensor) -> torch.Tensor:
        return self._apply(self.fn, diff)

    def derivative(self, diff: torch.Tensor | float | Sequence[float]) -> torch.Tensor:
        diff = as_tensor(diff, "diff").detach()
        if self.d1 is not None:
            return self._apply(self.d1, diff)
        if self.uses_torch:
            return _autograd_derivatives(self.fn, diff)[0]
        h = _fd_step(diff)
        return (self._value(diff + h) - self._value(diff - h)) / (2 * h)

    def second_derivative(self, diff: torch.Tensor | float | Sequence[float]) -> torch.Tensor:
        diff = as_tensor(diff, "diff").detach()
        if self.d2 is not None:
            return self._apply(self.d2, diff)
        if self.d1 is not None:
            h = _fd_step(diff)
            return (self._apply(self.d1, diff + h) - self._apply(self.d1, diff - h)) / (2 * h)
        if self.uses_torch:
            return _autograd_derivatives(self.fn, diff)[1]
        h = _fd_step(diff)
        return (self._value(diff + h) - 2 * self._value(diff) + self._value(diff - h)) / h**2


def _fd_step(x: torch.Tensor) -> torch.Tensor:
    """A relative finite-difference step, so that :math:`x \\pm h` stays positive for positive :math:`x`."""
    return FD_RELATIVE_STEP * x.abs().clamp(min=1e-12)


def utility_from_function(
    fn: Callable[[Any], Any],
    name: str = "custom",
    bounded: bool = False,
    *,
    derivative: Callable[[Any], Any] | None = None,
    second_derivative: Callable[[Any], Any] | None = None,
) -> FunctionUtility:
    r"""Wrap a user's increasing concave :math:`U` (a torch or NumPy elementwise function) as a :class:`Utility`.

    A torch function (one that returns a tensor with a graph for a tensor input) gets its derivatives by
    autograd and can be trained through. A NumPy-only function is evaluated on NumPy copies (no gradient flows
    through it in training) and its derivatives are central differences with relative step
    :data:`FD_RELATIVE_STEP`, unless ``derivative`` / ``second_derivative`` are given. ``bounded`` says whether
    the function is only meaningful for rewards in :math:`[0, 1]` (then :func:`ranking_loss` checks that
    :math:`|\Delta| \le 1`); the function itself must be finite where it will be evaluated.
    """
    if not callable(fn):
        raise UtilityError(f"utility_from_function: fn={fn!r} is not callable; pass a function of the differences")
    probe = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    try:
        out = fn(probe)
        uses_torch = isinstance(out, torch.Tensor) and out.requires_grad
    except Exception:  # any failure on a tensor means a NumPy-only function
        uses_torch = False
    if uses_torch and out.shape != probe.shape:
        raise UtilityError(
            f"utility_from_function({name!r}): fn must be elementwise, but it maps 3 differences to shape "
            f"{tuple(out.shape)}"
        )
    if not uses_torch:
        try:
            values = np.asarray(fn(np.array([0.25, 0.5, 1.0])), dtype=np.float64)
        except Exception as exc:
            raise UtilityError(
                f"utility_from_function({name!r}): fn fails on both a torch tensor and a NumPy array of "
                f"differences ({exc}); it must map an array of differences to an array of utilities"
            ) from exc
        if values.shape != (3,):
            raise UtilityError(
                f"utility_from_function({name!r}): fn must be elementwise, but it maps 3 differences to shape "
                f"{values.shape}"
            )
    return FunctionUtility(fn, name, bool(bounded), uses_torch, derivative, second_derivative)


# --------------------------------------------------------------------------------------------- registry
_FAMILIES: dict[str, tuple[Callable[..., Utility], str | None, str]] = {
    "power": (Power, "gamma", "x^gamma, 0 < gamma < 1 (bounded)"),
    "neg_power": (NegPower, "gamma", "-x^(-gamma), 0 < gamma <= 1 (bounded); neg_power:1 is -1/x"),
    "log": (Log, None, "log x (bounded)"),
    "log_sigmoid": (LogSigmoid, "sigma", "log sigmoid(x / sigma), sigma > 0"),
    "linear": (Linear, None, "x"),
}


def register_utility(name: str, utility: Utility | Callable[..., Utility], param: str | None = None,
                     description: str = "a user-registered utility", overwrite: bool = False) -> None:
    """Make ``name`` a utility of :func:`get_utility` (and so of ``--utility`` / ``--utilities``).

    ``utility`` is a :class:`Utility` (e.g. from :func:`utility_from_function`), or a factory taking the family's
    one parameter ``param`` as a keyword (``register_utility("tanh", make_tanh, param="scale")`` then
    ``--utility tanh:2``). A built-in name is refused unless ``overwrite``. Put the call in a plugin
    (:mod:`fdpg.plugins`) to have it in every fdpg process."""
    key = str(name).strip().lower()
    if not key or ":" in key or "," in key or "=" in key:
        raise UtilityError(f"register_utility: name {name!r} must be a non-empty word without ':', ',' or '='")
    if key in _FAMILIES and not overwrite:
        raise UtilityError(f"register_utility: {key!r} is already a utility; pick another name or overwrite=True")
    if isinstance(utility, Utility):
        if param is not None:
            raise UtilityError(f"register_utility({key!r}): a Utility instance takes no parameter; give a factory")
        instance = utility

        def factory(**params: float) -> Utility:
            if params:
                raise TypeError(f"{key} takes no parameter")
            return instance
    elif callable(utility):
        factory = utility
    else:
        raise UtilityError(f"register_utility({key!r}): give a Utility or a factory returning one, got {utility!r:.80}")
    _FAMILIES[key] = (factory, param, description)


def available_utilities() -> list[str]:
    """The family names :func:`get_utility` knows."""
    return list(_FAMILIES)


def describe_utilities() -> str:
    """One line per family: its name, parameter and formula."""
    return "\n".join(
        f"{name}{':' + param if param else ''}: {desc}" for name, (_, param, desc) in _FAMILIES.items()
    )


def get_utility(spec: str | Utility, **params: float) -> Utility:
    r"""The utility named by ``spec``: ``"power"``, ``"neg_power"``, ``"log"``, ``"log_sigmoid"``, ``"linear"``.

    The family's parameter comes either after a colon (``"power:0.5"``, ``"neg_power:1"``,
    ``"log_sigmoid:1.0"``) or as a keyword (``get_utility("power", gamma=0.5)``); other keywords (``eps``) are
    passed on. A :class:`Utility` is returned unchanged (without keywords).
    """
    if isinstance(spec, Utility):
        if params:
            raise UtilityError(f"get_utility({spec.name!r}): a Utility instance takes no parameters, got {params}")
        return spec
    if not isinstance(spec, str):
        raise UtilityError(f"get_utility: spec={spec!r} must be a name such as 'power:0.5' or a Utility")
    family, _, text = spec.strip().partition(":")
    family = family.strip().lower()
    if family not in _FAMILIES:
        close = difflib.get_close_matches(family, list(_FAMILIES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownUtilityError(
            f"unknown utility {spec!r}{hint}; known utilities: {', '.join(_FAMILIES)} "
            "(or wrap your own with utility_from_function)"
        )
    factory, param, _ = _FAMILIES[family]
    if text.strip():
        if param is None:
            raise UtilityError(f"utility {family!r} takes no parameter after ':', got {spec!r}")
        if param in params:
            raise UtilityError(f"utility {spec!r}: {param} given twice (in the spec and as a keyword)")
        try:
            params[param] = float(text)
        except ValueError as exc:
            raise UtilityError(f"utility {spec!r}: {param}={text!r} must be a number, e.g. '{family}:0.5'") from exc
    elif param == "gamma" and "gamma" not in params:
        raise UtilityError(f"utility {family!r} needs gamma, e.g. '{family}:0.5' or get_utility({family!r}, gamma=0.5)")
    try:
        return factory(**params)
    except TypeError as exc:
        raise UtilityError(f"utility {family!r}: unexpected parameters {sorted(params)} ({exc})") from exc


# --------------------------------------------------------------------------------------------- prompt-aware
def _identity(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class PromptAwareUtility:
    r"""A utility chosen per pair: :math:`U_{\kappa(c_k)}(\Delta_k)` with :math:`\kappa` = ``rule``.

    ``rule`` maps the context :math:`c_k` of pair :math:`k` (its prompt, or the value of a data column such
    as ``"open"`` / ``"closed"``) to a key of ``utilities``. A call takes one context per pair and applies
    each pair's own utility, so one batch can mix prompts of different kinds. Values of ``utilities`` may be
    :class:`Utility` objects or specs for :func:`get_utility`.
    """

    rule: Callable[[Any], Hashable]
    utilities: Mapping[Hashable, Utility]

    def __post_init__(self) -> None:
        if not callable(self.rule):
            raise UtilityError(f"PromptAwareUtility: rule={self.rule!r} must map a prompt to a key of utilities")
        if not isinstance(self.utilities, Mapping) or not self.utilities:
            raise UtilityError(
                f"PromptAwareUtility: utilities={self.utilities!r} must be a non-empty dict key -> utility"
            )
        resolved = {key: get_utility(u) if isinstance(u, str) else u for key, u in self.utilities.items()}
        for key, u in resolved.items():
            if not isinstance(u, Utility):
                raise UtilityError(
                    f"PromptAwareUtility: utilities[{key!r}]={u!r} is not a Utility; use get_utility or "
                    "utility_from_function"
                )
        object.__setattr__(self, "utilities", resolved)

    @classmethod
    def from_column(cls, utilities: Mapping[Hashable, Utility | str]) -> PromptAwareUtility:
        """The utility of each pair is ``utilities[value]``, where ``value`` is the pair's entry of a data column."""
        return cls(_identity, utilities)  # type: ignore[arg-type]

    @property
    def name(self) -> str:
        return "prompt_aware(" + ", ".join(f"{k}={u.name}" for k, u in self.utilities.items()) + ")"

    @property
    def bounded(self) -> bool:
        """True if any of the utilities needs rewards in :math:`[0, 1]`."""
        return any(u.bounded for u in self.utilities.values())

    def key(self, context: Any) -> Hashable:
        """The key of ``utilities`` that ``rule`` assigns to one context (a prompt or an attribute value)."""
        key = self.rule(context)
        if key not in self.utilities:
            raise UnknownUtilityError(
                f"prompt-aware utility: context {context!r:.80} maps to key {key!r}, which is not one of "
                f"{list(self.utilities)}; add a utility for it or fix the rule / the data column"
            )
        return key

    def utility_for(self, context: Any) -> Utility:
        """The utility applied to pairs with this context."""
        return self.utilities[self.key(context)]

    def keys(self, contexts: Sequence[Any]) -> list[Hashable]:
        """One key per pair."""
        return [self.key(c) for c in contexts]

    def __call__(self, diff: torch.Tensor, contexts: Sequence[Any]) -> torch.Tensor:
        """:math:`U_{\\kappa(c_k)}(\\Delta_k)` for each pair ``k`` of the 1-D ``diff`` (differentiable)."""
        diff = as_tensor(diff, "diff")
        if diff.ndim != 1 or isinstance(contexts, str) or len(contexts) != diff.numel():
            raise ScoreError(
                f"prompt-aware utility: diff has shape {tuple(diff.shape)} and contexts has "
                f"{'a string' if isinstance(contexts, str) else len(contexts)} entries; pass a 1-D diff and one "
                "context (prompt or attribute value) per pair"
            )
        keys = self.keys(contexts)
        out = torch.zeros_like(diff)
        for key in dict.fromkeys(keys):
            idx = torch.tensor([i for i, k in enumerate(keys) if k == key], dtype=torch.long, device=diff.device)
            out = out.index_put((idx,), self.utilities[key](diff[idx]).to(diff.dtype))
        return out


# --------------------------------------------------------------------------------------------- loss
def ranking_loss(
    diff: torch.Tensor,
    utility: Utility | PromptAwareUtility | str,
    margin: torch.Tensor | float | None = None,
    contexts: Sequence[Any] | None = None,
) -> torch.Tensor:
    r"""The reward-model loss :math:`-\frac1N\sum_k U(\Delta_k - m_k)` of a batch of ranked pairs.

    Args:
        diff: :math:`\Delta_k = R(\text{prompt}_k, y_{w,k}) - R(\text{prompt}_k, y_{l,k})`, winner minus loser.
        utility: a :class:`Utility`, a spec for :func:`get_utility`, or a :class:`PromptAwareUtility`.
        margin: optional :math:`m_k` (a scalar or one per pair): the winner is asked to beat the loser by at
            least :math:`m_k`, as in :math:`-\log\sigma(\Delta - m)`; ``None`` means 0.
        contexts: one prompt / attribute value per pair, required by (and only by) a prompt-aware utility.

    A bounded utility needs rewards in :math:`[0, 1]`, so :math:`|\Delta_k| \le 1` is checked.
    """
    diff = as_tensor(diff, "diff")
    check_no_nan(diff, "diff")
    if diff.numel() == 0:
        raise ScoreError("ranking_loss: diff is empty; pass at least one ranked pair")
    if isinstance(utility, str):
        utility = get_utility(utility)
    if utility.bounded and bool((diff.detach().abs() > 1.0 + 1e-6).any()):
        worst = float(diff.detach().abs().max())
        raise ScoreError(
            f"ranking_loss: utility {utility.name!r} is bounded (rewards in [0, 1]) but |diff| reaches {worst:.4g} "
            "> 1; squash the reward model's output into [0, 1] (e.g. a sigmoid) or use log_sigmoid / linear"
        )
    shifted = diff
    if margin is not None:
        m = as_tensor(margin, "margin").to(diff.dtype)
        check_no_nan(m, "margin")
        if m.numel() not in (1, diff.numel()):
            raise ScoreError(
                f"ranking_loss: margin has {m.numel()} values for {diff.numel()} pairs; pass a scalar or one per pair"
            )
        shifted = diff - m.reshape(diff.shape) if m.numel() > 1 else diff - m.reshape(())
    if isinstance(utility, PromptAwareUtility):
        if contexts is None:
            raise ScoreError("ranking_loss: a prompt-aware utility needs contexts (one prompt or attribute per pair)")
        values = utility(shifted.reshape(-1), contexts)
    else:
        if contexts is not None:
            raise ScoreError(
                f"ranking_loss: contexts were given but utility {utility.name!r} is not prompt-aware; drop them or "
                "use a PromptAwareUtility"
            )
        values = utility(shifted)
    return -values.mean()
