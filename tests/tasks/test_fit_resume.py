"""The lambda fit of a distributional task through ``fdpg train``: recorded in ``config.json``, restored on resume.

The tiny random model writes neither gendered words nor professions, so the detector of the constrained
feature (gender's ``female``, professions' ``science``) is replaced by "the completion has a vowel" (about
half of its 8-character completions): the fit itself, the CLI's base sampler, the run and its resumption
are the real ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fdpg.cli import build_trainer, main, parse_train_args
from tasks.constraints import restore_fit

PROMPTS = ["bio:", "she"]
FIT_SAMPLES = 32
MAX_NEW_TOKENS = 8
MOMENT = 0.8
#: task -> (its feature, --task_args)
TASKS = {"gender": ("female", f"moment={MOMENT}"),
         "professions": ("science", f"science={MOMENT},art=none,sports=none,business=none")}


def has_vowel(text: str) -> float:
    return float(any(v in text for v in "aeiou"))


@pytest.fixture
def base_samplings(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """The tasks' features replaced by ``has a vowel``; returns a function giving the number of base samplings."""
    import tasks.constraints

    monkeypatch.setattr("tasks.gender.is_female", has_vowel)
    monkeypatch.setattr("tasks.professions.field_features",
                        lambda text: {"science": has_vowel(text), "art": 0.0, "sports": 0.0, "business": 0.0})
    calls = {"n": 0}
    real = tasks.constraints.base_sampler

    def counting_sampler(*args: Any, **kwargs: Any):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks.constraints, "base_sampler", counting_sampler)
    return lambda: calls["n"]


def _argv(task: str, tiny_model_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return ["--model", str(tiny_model_dir), "--task", task, "--task_args", TASKS[task][1],
            "--prompts_file", str(prompts), "--fit_samples", str(FIT_SAMPLES), "--max_new_tokens", str(MAX_NEW_TOKENS),
            "--batch_size", "4", "--samples_per_prompt", "2", "--progress", "false", "--eval_samples", "0", *extra]


def _per_prompt_moment(texts: list[str], prompts: list[str], lam: float) -> float:
    """Prompt-averaged E_p[phi] of p(x|c) = a(x|c) e^(lam phi) / Z_c on base samples, computed here."""
    groups: dict[str, list[float]] = {}
    for text, prompt in zip(texts, prompts):
        groups.setdefault(prompt, []).append(has_vowel(text))
    total = 0.0
    for phi in groups.values():
        w = [math.exp(lam * v) for v in phi]
        total += len(phi) / len(texts) * sum(a * b for a, b in zip(w, phi)) / sum(w)
    return total


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.slow
def test_fit_is_recorded_in_config_json_and_restored_on_resume(task: str, base_samplings: Callable[[], int],
                                                               tiny_model_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    from fdpg.policy import Policy
    from tasks.constraints import base_sampler

    feature = TASKS[task][0]
    run_dir = tmp_path / "run"
    assert main(["train", *_argv(task, tiny_model_dir, tmp_path, "--steps", "1", "--output_dir", str(run_dir))]) == 0
    assert base_samplings() == 1
    err = capsys.readouterr().err
    assert f"fitting the target on {FIT_SAMPLES} samples of the base model" in err and "lambda = " in err
    config = json.loads((run_dir / "config.json").read_text())["config"]
    fit = config["target_fit"]
    assert fit["n"] == FIT_SAMPLES and fit["conditional"] is True and fit["target_moments"] == {feature: MOMENT}
    lam = fit["lambdas"][feature]
    assert lam > 0 and config["target"] == restore_fit(_spec(task), fit).target.describe()

    # the recorded lambda meets the moment on the base samples the CLI drew (stratified, seed + 1), computed here
    texts, prompts = base_sampler(Policy.from_pretrained(str(tiny_model_dir)), PROMPTS, MAX_NEW_TOKENS, seed=1)(
        FIT_SAMPLES)
    assert sorted(prompts) == sorted(PROMPTS * (FIT_SAMPLES // 2))
    assert fit["base_moments"][feature] == pytest.approx(sum(map(has_vowel, texts)) / FIT_SAMPLES)
    assert fit["base_moments"][feature] < MOMENT - 0.1  # so that lambda has work to do
    assert _per_prompt_moment(texts, prompts, lam) == pytest.approx(MOMENT, abs=1e-5)

    # resume: the target is the recorded one, rebuilt from config.json without sampling the base model again
    samplings = base_samplings()
    resume_argv = _argv(task, tiny_model_dir, tmp_path, "--steps", "2", "--resume", str(run_dir))
    trainer = build_trainer(parse_train_args(resume_argv))
    assert base_samplings() == samplings, "resuming sampled the base model to fit lambda again"
    assert trainer.target == restore_fit(_spec(task), fit).target
    summary = trainer.train()
    assert summary["status"] == "finished" and summary["steps_completed"] == 2
    out = capsys.readouterr()
    assert "warning: the target was" not in out.out + out.err
    assert json.loads((run_dir / "config.json").read_text())["config"]["target_fit"] == fit
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_resume_of_a_run_without_a_recorded_fit_fits_again(base_samplings: Callable[[], int], tiny_model_dir: Path,
                                                          tmp_path: Path) -> None:
    """A run directory from before fits were recorded: resuming fits lambda again on the same seeded samples."""
    run_dir = tmp_path / "run"
    argv = _argv("gender", tiny_model_dir, tmp_path, "--steps", "1", "--output_dir", str(run_dir))
    assert main(["train", *argv]) == 0
    record = json.loads((run_dir / "config.json").read_text())
    fit = record["config"].pop("target_fit")
    (run_dir / "config.json").write_text(json.dumps(record))
    trainer = build_trainer(parse_train_args(_argv("gender", tiny_model_dir, tmp_path, "--steps", "2", "--resume",
                                                   str(run_dir))))
    assert base_samplings() == 2
    assert trainer.target == restore_fit(_spec("gender"), fit).target  # seeded: the same samples, the same lambda
    assert trainer.train()["status"] == "finished"


def _spec(task: str):
    from fdpg.config import TrainConfig
    from tasks import get_task

    return get_task(task).build(0.1, TrainConfig(task_args=TASKS[task][1]).task_options(), PROMPTS)
