"""``gender``: the word-list detector, the lambda fit hook, and a 2-step run toward the fitted target."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from objectives import ExponentialFamily, UnreachableMomentError
from tasks import get_task
from tasks.constraints import restore_fit
from tasks.gender import gender_counts, is_female

SHE = "She was born in Lyon. Her mother was a teacher, and she studied physics."
HE = "He was born in Ohio. His father was a farmer; he became a lawyer."


@pytest.mark.parametrize(("text", "expected"), [
    (SHE, 1.0),
    (HE, 0.0),
    ("Mrs. Smith founded the company with her sister.", 1.0),
    ("Mr. Smith and his wife moved to Paris.", 0.0),  # 2 male words (mr, his) vs 1 female (wife)
    ("The actress and the actor met.", 0.0),  # tie: 1 vs 1
    ("The committee published a report in 1999.", 0.0),  # no gendered word
    ("This history of Shell is thorough.", 0.0),  # whole words only: history, shell are not his, she
    ("SHE'S A QUEEN.", 1.0),
])
def test_detector(text: str, expected: float) -> None:
    assert is_female(text) == expected


def test_counts() -> None:
    assert gender_counts(SHE) == (4, 0)  # she, her, mother, she
    assert gender_counts(HE) == (0, 4)  # he, his, father, he


def _fixed_sampler(texts: list[str], prompts: list[str]):
    calls = []

    def sample(n: int):
        calls.append(n)
        return [texts[i % len(texts)] for i in range(n)], [prompts[i % len(prompts)] for i in range(n)]

    return sample, calls


@pytest.mark.parametrize("conditional", [True, False])
def test_fit_hook_reaches_the_moment(conditional: bool) -> None:
    spec = get_task("gender").build(0.1, {"moment": "0.5", "conditional": str(conditional).lower()})
    assert spec.needs_fit and spec.fit_samples == 256 and spec.target.conditional is conditional
    # placeholder before the fit: lambda = 0, i.e. P = a
    assert spec.target.energies[0].lambdas == {"female": 0.0}
    prompts = spec.prompts[:2]
    texts = [SHE, HE, HE, HE, HE]  # base rate 1/5 in each prompt's samples
    sample, calls = _fixed_sampler(texts, prompts)
    fitted, fit = spec.fitted(sample, 40)
    assert calls == [40]
    target, report = spec.fit(sample, 40)  # the engine's call: unpacks as (target, report)
    assert target == fitted.target and report == fit.report and calls == [40, 40]
    lam = fit.details["lambdas"]["female"]
    assert lam == pytest.approx(math.log(4), abs=1e-5)  # 1/5 -> 1/2 needs odds x4
    assert fit.details["base_moments"]["female"] == pytest.approx(0.2)
    assert fit.details["achieved_moments"]["female"] == pytest.approx(0.5, abs=1e-6)
    assert "female" in fit.report and "lambda" in fit.report
    energy = fitted.target.energies[0]
    assert isinstance(energy, ExponentialFamily) and energy.lambdas["female"] == pytest.approx(lam)
    assert fitted.target.conditional is conditional and not fitted.needs_fit
    restored = restore_fit(spec, json.loads(json.dumps(fit.details)))  # e.g. from the run directory on resume
    assert restored.target == fitted.target and not restored.needs_fit


def test_fit_report_warns_about_prompts_that_cannot_move() -> None:
    spec = get_task("gender").build(0.1, {}, ["a", "b", "c"])
    texts = {"a": [SHE, HE, HE], "b": [HE, SHE, HE], "c": [HE, HE, HE]}

    def sample(n: int):
        prompts = ["a", "b", "c"] * (n // 3)
        return [texts[p][(i // 3) % 3] for i, p in enumerate(prompts)], prompts

    _, fit = spec.fitted(sample, 30)
    assert "constant on the samples of 1 of 3 prompts" in fit.report
    assert fit.details["achieved_moments"]["female"] == pytest.approx(0.5, abs=1e-6)


def test_fit_hook_unreachable_on_texts_without_women() -> None:
    spec = get_task("gender").build(0.1, {})
    sample, _ = _fixed_sampler(["zq xv", HE], spec.prompts)
    with pytest.raises(UnreachableMomentError, match="base-model rates"):
        spec.fitted(sample, 8)
    with pytest.raises(ValueError, match="at least 2"):
        spec.fitted(sample, 1)


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="moment must be in"):
        get_task("gender").build(0.1, {"moment": "1.5"})
    with pytest.raises(ValueError, match="not a valid float"):
        get_task("gender").build(0.1, {"moment": "half"})


def _per_prompt_moment(texts: list[str], prompts: list[str], lam: float) -> float:
    """The prompt-averaged E_p[female] of p(x|c) = a(x|c) e^(lam female) / Z_c on samples (x, c), computed here."""
    by_prompt: dict[str, list[float]] = {}
    for text, prompt in zip(texts, prompts):
        by_prompt.setdefault(prompt, []).append(is_female(text))
    total = 0.0
    for phi in by_prompt.values():
        weights = [math.exp(lam * v) for v in phi]
        total += len(phi) / len(texts) * sum(w * v for w, v in zip(weights, phi)) / sum(weights)
    return total


@pytest.mark.slow
def test_two_steps_toward_the_fitted_target(smoke_run, tmp_path) -> None:
    """Random tiny-model text has no gendered words: fit on fixed texts, then train toward that target.

    The fitted lambda meets the moment on the fit samples (computed here, per prompt), the run trains
    toward that target (``config.json``), and its logged female fraction is that of its samples.
    """
    spec = get_task("gender").build(0.1, {}, ["bio:", "she"])
    sample, calls = _fixed_sampler([SHE, HE, HE], spec.prompts)
    fitted, fit = spec.fitted(sample)
    assert calls == [256]  # the task's suggestion when the caller gives no n
    lam = fit.details["lambdas"]["female"]
    texts, prompts = sample(256)
    assert _per_prompt_moment(texts, prompts, lam) == pytest.approx(0.5, abs=1e-6)
    assert _per_prompt_moment(texts, prompts, 0.0) == pytest.approx(1 / 3, abs=0.01)  # the base rate
    metrics = smoke_run(fitted, divergence="fkl")
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert config["target"] == fitted.target.describe() != spec.target.describe()
    described = re.fullmatch(r"P\(x\|c\) = a \* exp\((.+)\*female\)", config["target"])
    assert described and float(described.group(1)) == pytest.approx(lam, rel=1e-3)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    for m in metrics:
        scores = [s["scores"]["female"] for s in samples if s["step"] == m["step"]]
        assert scores == [is_female(s["completion"]) for s in samples if s["step"] == m["step"]]
        assert m["score/female_fraction"] == pytest.approx(sum(scores) / len(scores))
        assert m["score/female_fraction"] == pytest.approx(0.5 + m["score/female_fraction_error"])
    log_p = fitted.target.log_P(torch.zeros(2), {"female": torch.tensor([1.0, 0.0])})
    assert log_p[0] > log_p[1]
