r"""Training moves the score the right way: a short run on the tiny Llama with a known scorer.

The reward is the fraction of vowels in a completion (``fdpg_testing.toy_scorer``; about 7% for the
random tiny model). Toward ``P = a exp(reward / beta)`` the vowel fraction of the samples must rise,
toward ``P = a exp(-reward / beta)`` (the same scorer negated) it must fall; "rise" means the mean over
the samples of the last steps exceeds that of the first steps by several standard errors of the
difference. A loss with the wrong sign (ascending :math:`D_f(\pi\|p)` instead of descending it) fails every case.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

import pytest
from fdpg_testing import read_jsonl, vowel_fraction

STEPS = 24
WINDOW = 5  # steps averaged at each end
Z = 3.0  # standard errors the change must exceed


def negated_scorer(completions: list[str], prompts: list[str]) -> dict[str, list[float]]:
    """``reward`` = minus the fraction of vowels."""
    return {"reward": [-vowel_fraction(t) for t in completions]}


def vowel_fraction_change(samples: list[dict[str, Any]]) -> tuple[float, float]:
    """(mean vowel fraction of the last ``WINDOW`` steps' samples - the first ``WINDOW``'s, its standard error)."""
    steps = sorted({s["step"] for s in samples})
    first = [vowel_fraction(s["completion"]) for s in samples if s["step"] in steps[:WINDOW]]
    last = [vowel_fraction(s["completion"]) for s in samples if s["step"] in steps[-WINDOW:]]
    stderr = math.sqrt(statistics.variance(first) / len(first) + statistics.variance(last) / len(last))
    return statistics.mean(last) - statistics.mean(first), stderr


@pytest.mark.parametrize(("divergence", "sign"), [("rkl", 1), ("rkl", -1), ("fkl", 1)],
                         ids=["rkl-more-vowels", "rkl-fewer-vowels", "fkl-more-vowels"])
@pytest.mark.slow
def test_score_moves_toward_the_target(make_trainer: Callable[..., Any], divergence: str, sign: int) -> None:
    scorer = {1: None, -1: negated_scorer}[sign]
    extra = {} if scorer is None else {"scorer": scorer}
    trainer = make_trainer(divergence=divergence, steps=STEPS, learning_rate=1e-2, batch_size=16,
                           generation_batch_size=16, micro_batch_size=16, samples_per_prompt=4, max_new_tokens=6,
                           **extra)
    assert trainer.train()["status"] == "finished"
    samples = read_jsonl(trainer.run_dir / "samples.jsonl")
    assert len(samples) == 16 * STEPS
    # the logged score is the scorer's reward of each sample, with its sign
    assert all(s["scores"]["reward"] == pytest.approx(sign * vowel_fraction(s["completion"])) for s in samples)
    change, stderr = vowel_fraction_change(samples)
    assert sign * change > Z * stderr, (
        f"vowel fraction changed by {change:+.3f} (standard error {stderr:.3f}); expected "
        f"{'a rise' if sign > 0 else 'a fall'} of more than {Z} standard errors")
    # and the policy left the base model to get there
    metrics = read_jsonl(trainer.run_dir / "metrics.jsonl")
    assert statistics.mean(m["kl_pi_a"] for m in metrics[-WINDOW:]) > 0.1
