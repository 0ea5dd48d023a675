"""Looking divergences up by name: ``"rkl"``, ``"fkl"``, ``"tv"``, ``"js"``, ``"alpha:0.5"``, ...

A name is ``family`` or ``family:parameter``. :func:`register_divergence` adds a family, so that a
user's divergence can be chosen from the CLI (``--divergence mine``) like the built-in ones.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from objectives.divergences import (
    Alpha,
    Divergence,
    ForwardKL,
    JensenShannon,
    PearsonChi2,
    ReverseKL,
    SquaredHellinger,
    TotalVariation,
)
from objectives.errors import UnknownDivergenceError

Factory = Callable[[str | None], Divergence]

_FACTORIES: dict[str, Factory] = {}
_DESCRIPTIONS: dict[str, str] = {}
_ALIASES: dict[str, str] = {}


def _no_parameter(cls: type[Divergence]) -> Factory:
    def make(param: str | None) -> Divergence:
        if param is not None:
            raise UnknownDivergenceError(f"divergence {cls.name!r} takes no parameter, got {cls.name}:{param}")
        return cls()

    return make


def _alpha(param: str | None) -> Divergence:
    if param is None:
        raise UnknownDivergenceError("the alpha-divergence needs its parameter, e.g. 'alpha:0.5'")
    try:
        value = float(param)
    except ValueError as exc:
        raise UnknownDivergenceError(f"'alpha:{param}': alpha must be a number, e.g. 'alpha:0.5'") from exc
    return Alpha(value)


def register_divergence(
    name: str,
    divergence: Divergence | type[Divergence] | Factory,
    description: str = "",
    aliases: tuple[str, ...] = (),
) -> None:
    """Register a divergence family under ``name`` (case-insensitive).

    ``divergence`` is an instance (e.g. ``CustomDivergence(f, name="mine")``), a :class:`Divergence`
    subclass taking no argument, or a factory ``param -> Divergence`` receiving the text after
    ``name:`` (``None`` when absent), like the built-in ``alpha``.
    """
    key = name.lower()
    if isinstance(divergence, Divergence):
        factory = _no_parameter_instance(divergence)
        description = description or divergence.description
    elif isinstance(divergence, type) and issubclass(divergence, Divergence):
        factory = _no_parameter(divergence)
        description = description or divergence.description
    elif callable(divergence):
        factory = divergence
    else:
        raise TypeError(
            f"register_divergence({name!r}, ...) needs a Divergence, a subclass or a factory, got {divergence!r}"
        )
    _FACTORIES[key] = factory
    _DESCRIPTIONS[key] = description
    for alias in aliases:
        _ALIASES[alias.lower()] = key


def _no_parameter_instance(instance: Divergence) -> Factory:
    def make(param: str | None) -> Divergence:
        if param is not None:
            raise UnknownDivergenceError(f"divergence {instance.name!r} takes no parameter, got ':{param}'")
        return instance

    return make


def get_divergence(spec: str | Divergence) -> Divergence:
    """The divergence named by ``spec`` (``"rkl"``, ``"alpha:0.5"``, an alias) or ``spec`` itself."""
    if isinstance(spec, Divergence):
        return spec
    if not isinstance(spec, str):
        raise UnknownDivergenceError(f"a divergence is a name like 'rkl' or a Divergence, got {spec!r}")
    family, _, param = spec.strip().partition(":")
    key = _ALIASES.get(family.lower(), family.lower())
    if key not in _FACTORIES:
        close = difflib.get_close_matches(key, list(_FACTORIES) + list(_ALIASES), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownDivergenceError(
            f"unknown divergence {spec!r}.{hint} Known: {', '.join(available_divergences())}"
            " (alpha takes a parameter, e.g. 'alpha:0.5'); add your own with register_divergence()."
        )
    return _FACTORIES[key](param if param != "" else None)


def available_divergences() -> list[str]:
    """The registered family names, sorted."""
    return sorted(_FACTORIES)


def describe_divergences() -> dict[str, str]:
    """Name -> one-line description of every registered family."""
    return {name: _DESCRIPTIONS[name] for name in available_divergences()}


register_divergence("rkl", ReverseKL, aliases=("reverse_kl", "kl", "reverse-kl"))
register_divergence("fkl", ForwardKL, aliases=("forward_kl", "forward-kl", "dpg"))
register_divergence("tv", TotalVariation, aliases=("total_variation",))
register_divergence("js", JensenShannon, aliases=("jensen_shannon", "jsd"))
register_divergence("chi2", PearsonChi2, aliases=("pearson",))
register_divergence("hellinger", SquaredHellinger, aliases=("squared_hellinger",))
register_divergence("alpha", _alpha, description="Amari alpha-divergence, 'alpha:A' (A=1: reverse KL, A=0: forward KL)")
