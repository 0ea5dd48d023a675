r"""The mathematics of f-DPG, free of any Hugging Face code.

- :mod:`objectives.divergences`: generators f, :math:`f'` from :math:`\log t`, the pseudo-reward
  :math:`R = -f'(\pi/p)`, estimates and exact values of :math:`D_f(\pi\|p)`; user-defined generators.
- :mod:`objectives.registry`: look divergences up by name (``"rkl"``, ``"alpha:0.5"``, ...).
- :mod:`objectives.targets`: energy-based targets :math:`P = a\prod_k\Phi_k` and their composition.
- :mod:`objectives.moments`: fitting :math:`\lambda` of :math:`a e^{\lambda\cdot\phi}` to moments.
- :mod:`objectives.partition`: log-space importance-sampling estimates of :math:`\log Z` per prompt.
- :mod:`objectives.estimators`: baselines and the surrogate loss of the f-DPG gradient.
"""

from objectives.divergences import (
    Alpha,
    CustomDivergence,
    Divergence,
    ForwardKL,
    JensenShannon,
    PearsonChi2,
    ReverseKL,
    SquaredHellinger,
    TotalVariation,
)
from objectives.errors import (
    InvalidGeneratorError,
    ObjectiveError,
    ScoreError,
    UnknownDivergenceError,
    UnreachableMomentError,
    ZeroTargetError,
)
from objectives.estimators import BASELINES, MovingAverageBaseline, batch_baseline, surrogate_loss
from objectives.moments import MomentFit, fit_lambdas
from objectives.partition import LogZEstimator
from objectives.registry import (
    available_divergences,
    describe_divergences,
    get_divergence,
    register_divergence,
)
from objectives.targets import (
    BinaryConstraint,
    Energy,
    ExponentialFamily,
    KLRegularisedReward,
    Target,
    binary_constraint,
    exponential_family,
    rl_with_kl,
)

__all__ = [
    "Alpha", "CustomDivergence", "Divergence", "ForwardKL", "JensenShannon", "PearsonChi2", "ReverseKL",
    "SquaredHellinger", "TotalVariation",
    "InvalidGeneratorError", "ObjectiveError", "ScoreError", "UnknownDivergenceError", "UnreachableMomentError",
    "ZeroTargetError",
    "BASELINES", "MovingAverageBaseline", "batch_baseline", "surrogate_loss",
    "MomentFit", "fit_lambdas", "LogZEstimator",
    "available_divergences", "describe_divergences", "get_divergence", "register_divergence",
    "BinaryConstraint", "Energy", "ExponentialFamily", "KLRegularisedReward", "Target", "binary_constraint",
    "exponential_family", "rl_with_kl",
]
