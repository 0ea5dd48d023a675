"""``professions``: the four keyword features, several moments, and a 2-step run."""

from __future__ import annotations

import pytest

from objectives import UnreachableMomentError
from tasks import get_task
from tasks.professions import FIELDS, field_features

TEXTS = {
    "science": "She is a physicist who worked in a laboratory on quantum theory.",
    "art": "He is a painter and sculptor whose paintings hang in a gallery.",
    "sports": "A tennis player who won an Olympic medal and later became a coach.",
    "business": "An entrepreneur and investor, she founded a software company and served as CEO.",
    "none": "He was born in 1950 and lived in a small town near the river.",
}


@pytest.mark.parametrize("field", FIELDS)
def test_each_field_detects_its_biography(field: str) -> None:
    feats = field_features(TEXTS[field])
    assert feats[field] == 1.0
    assert sum(feats.values()) == 1.0, feats  # and no other field


def test_no_field_and_several_fields() -> None:
    assert sum(field_features(TEXTS["none"]).values()) == 0.0
    both = field_features("A physicist who was also a famous football player.")
    assert both["science"] == both["sports"] == 1.0
    assert field_features("Artistically inclined.")["art"] == 0.0  # whole words only
    assert field_features("ART FAIR")["art"] == 1.0


def _sampler(prompts: list[str]):
    texts = list(TEXTS.values())

    def sample(n: int):
        return [texts[i % len(texts)] for i in range(n)], [prompts[(i // len(texts)) % len(prompts)] for i in range(n)]

    return sample


def test_fit_of_four_moments() -> None:
    # the five texts are exclusive (one field each, or none): the moments must sum to less than 1
    moments = {"science": 0.3, "art": 0.25, "sports": 0.2, "business": 0.2}
    spec = get_task("professions").build(0.1, {k: str(v) for k, v in moments.items()})
    fitted, fit = spec.fitted(_sampler(spec.prompts), 50)
    assert set(fit.details["lambdas"]) == set(FIELDS)
    for field, moment in moments.items():
        assert fit.details["base_moments"][field] == pytest.approx(0.2)
        assert fit.details["achieved_moments"][field] == pytest.approx(moment, abs=1e-6)
    lam = fit.details["lambdas"]
    assert lam["science"] > lam["art"] > lam["sports"] == pytest.approx(lam["business"])
    feats = spec.scorer(list(TEXTS.values()), [""] * len(TEXTS))
    metrics = spec.metrics(feats)
    assert {f"score/{f}_fraction" for f in FIELDS} <= set(metrics)
    assert metrics["score/moment_error"] == pytest.approx(0.1)  # science: 0.2 vs 0.3


def test_unconstrained_field_and_bad_options() -> None:
    spec = get_task("professions").build(0.1, {"sports": "none"})
    assert spec.target.features == ("science", "art", "business")
    assert "score/sports_fraction" in spec.metrics(spec.scorer([TEXTS["sports"]], [""]))
    with pytest.raises(ValueError, match="must be in"):
        get_task("professions").build(0.1, {"art": "1"})
    with pytest.raises(ValueError, match="unknown --task_args"):
        get_task("professions").build(0.1, {"politics": "0.2"})
    spec = get_task("professions").build(0.1, {})
    with pytest.raises(UnreachableMomentError):
        spec.fitted(lambda n: (["nothing here"] * n, [spec.prompts[0]] * n), 10)


@pytest.mark.slow
def test_two_steps_toward_the_fitted_target(smoke_run) -> None:
    spec = get_task("professions").build(0.1, {f: "0.2" for f in FIELDS}, ["bio:", "life:"])
    fitted, _ = spec.fitted(_sampler(spec.prompts), 40)
    metrics = smoke_run(fitted)
    assert {f"score/{f}_fraction" for f in FIELDS} <= set(metrics[-1])
