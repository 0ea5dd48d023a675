"""``tasks.evaluation.evaluate``: a task's metrics on given samples, metric-only features included."""

from __future__ import annotations

import pytest

from tasks import available_tasks, get_task
from tasks.evaluation import evaluate

PROMPT = 'def f(x):\n    """Return x."""\n'


def test_lexical_base_rate() -> None:
    spec = get_task("lexical").build(0.1, {})
    out = evaluate(spec, ["amazing!", "fine", "Amazing", "amazingly"])
    assert out["score/constraint_satisfaction"] == 0.5 and out["feature/b"] == 0.5 and out["n_samples"] == 4


def test_metric_only_features_reach_the_metrics_and_chunks_agree() -> None:
    spec = get_task("code").build(0.1, {}, [PROMPT])
    completions = ["    return x\n", "    return  x\n", "    return x +\n"] * 3
    out = evaluate(spec, completions, [PROMPT] * 9, batch_size=2)
    assert out["score/compile_rate"] == pytest.approx(2 / 3)
    assert out["score/pep8_per_line"] == pytest.approx(1 / 3)  # E271 in one of three
    assert out == evaluate(spec, completions, [PROMPT] * 9, batch_size=100)


def test_gender_and_professions_on_fixed_texts() -> None:
    texts = ["She is a physicist.", "He plays football for a famous team.", "She founded a company.", "A poem."]
    assert evaluate(get_task("gender").build(0.1, {}), texts)["score/female_fraction"] == 0.5
    out = evaluate(get_task("professions").build(0.1, {}), texts)
    assert [out[f"score/{f}_fraction"] for f in ("science", "art", "sports", "business")] == [0.25] * 4


def test_errors() -> None:
    spec = get_task("lexical").build(0.1, {})
    with pytest.raises(ValueError, match="2 completions but 1 prompts"):
        evaluate(spec, ["a", "b"], ["x"])
    with pytest.raises(ValueError, match="at least one"):
        evaluate(spec, [])


def test_every_task_is_registered() -> None:
    assert set(available_tasks()) >= {"sentiment", "lexical", "gender", "professions", "code", "toxicity"}
    for name in available_tasks():
        assert get_task(name).description
