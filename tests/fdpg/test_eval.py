"""``fdpg eval``: sampling a policy for evaluation, and loading a trained run directory back.

A run trained for two steps at a high learning rate has moved away from its base model, so its
:math:`KL(\\pi\\|a)` is clearly positive, while the base model's own is zero up to float rounding:
``fdpg eval`` on the run directory must report the former, i.e. sample and score the loaded weights
(``final/``) against the base model named in ``config.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from fdpg_testing import build_trainer, toy_scorer, trainable_state, vowel_fraction

from fdpg.algorithms.f_dpg import feature_means
from fdpg.cli import main
from fdpg.evaluation import draw_samples, evaluate_policy, load_run_policy, sequence_log_probs
from fdpg.metrics import distinct_n
from fdpg.policy import Policy
from objectives import rl_with_kl
from tasks import TaskSpec

pytestmark = pytest.mark.filterwarnings("ignore:Setting .save_embedding_layers. to .True.:UserWarning")

EVAL_PROMPTS = ["hello", "my review:"]


def toy_spec() -> TaskSpec:
    """The engine tests' toy task: reward = fraction of vowels, P = a exp(reward / 0.1)."""
    return TaskSpec(prompts=list(EVAL_PROMPTS), scorer=toy_scorer, target=rl_with_kl("reward", 0.1),
                    metrics=feature_means)


#: Full fine-tuning, and LoRA including the LM head: the tiny model's head (init std 0.02) gives near-uniform
#: logits whatever the hidden states, so an adapter on the attention alone hardly moves its distribution.
RUNS = {"full": dict(lora_r=0, learning_rate=5e-2),
        "lora": dict(lora_r=4, learning_rate=1e-1, lora_target_modules="q_proj,v_proj,lm_head")}


@pytest.fixture(scope="module", params=list(RUNS))
def trained_run(request: pytest.FixtureRequest, tiny_model_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finished 3-step run at a high learning rate: its directory and its trained parameters."""
    settings = RUNS[request.param]
    trainer = build_trainer(tiny_model_dir, tmp_path_factory.mktemp("eval") / "run", steps=3, **settings)
    assert trainer.train()["status"] == "finished"
    return {"dir": trainer.run_dir, "params": trainable_state(trainer), "lora_r": settings["lora_r"]}


@pytest.mark.slow
def test_evaluation_samples_the_policy_and_scores_its_samples(tiny_model_dir: Path) -> None:
    policy = Policy.from_pretrained(str(tiny_model_dir))
    spec = toy_spec()
    out = evaluate_policy(policy, spec, n=12, max_new_tokens=6, seed=3)
    assert out["n"] == 12 and 0 < out["completion_length"] <= 6
    assert {e["prompt"] for e in out["examples"]} <= set(EVAL_PROMPTS) and len(out["examples"]) == 5
    # the numbers are those of the seeded samples themselves
    batch = draw_samples(policy, spec.prompts, 12, 6, seed=3, progress=False)
    assert [e["completion"] for e in out["examples"]] == list(batch.texts)[:5]
    assert out["score/reward"] == pytest.approx(sum(map(vowel_fraction, batch.texts)) / 12)
    tokens = [row[:k].tolist() for row, k in zip(batch.completion_ids, batch.lengths)]
    assert out["distinct_2"] == pytest.approx(distinct_n(tokens, 2))
    # the base model against itself: KL(pi||a) is 0 up to rounding
    assert abs(out["kl_pi_a"]) < 1e-4
    assert evaluate_policy(policy, spec, n=12, max_new_tokens=6, seed=3) == out  # seeded
    assert evaluate_policy(policy, spec, n=12, max_new_tokens=6, seed=4)["examples"] != out["examples"]


@pytest.mark.slow
def test_loading_a_run_gives_its_trained_weights_and_its_base_model(trained_run: dict[str, Any],
                                                                     tiny_model_dir: Path) -> None:
    loaded = load_run_policy(trained_run["dir"])
    assert loaded.uses_lora is (trained_run["lora_r"] > 0)
    weights = dict(loaded.model.named_parameters())
    for name, trained in trained_run["params"].items():
        torch.testing.assert_close(weights[name].detach(), trained, rtol=0, atol=0, msg=name)
    base = Policy.from_pretrained(str(tiny_model_dir))
    batch = draw_samples(loaded, EVAL_PROMPTS, 8, 6, seed=0, progress=False)
    with loaded.reference() as reference:
        log_a = sequence_log_probs(reference, batch)
    torch.testing.assert_close(log_a, sequence_log_probs(base.model, batch), atol=1e-5, rtol=0)
    assert not torch.allclose(batch.log_pi.double(), log_a, atol=1e-2)  # the loaded policy is not the base


@pytest.mark.slow
def test_evaluation_of_a_trained_run_measures_the_trained_weights(trained_run: dict[str, Any],
                                                                   tiny_model_dir: Path) -> None:
    spec = toy_spec()
    trained = evaluate_policy(load_run_policy(trained_run["dir"]), spec, n=32, max_new_tokens=6, seed=0)
    base = evaluate_policy(Policy.from_pretrained(str(tiny_model_dir)), spec, n=32, max_new_tokens=6, seed=0)
    assert abs(base["kl_pi_a"]) < 1e-4
    assert trained["kl_pi_a"] > max(0.05, 5 * trained["kl_pi_a_se"]), trained
    assert trained["examples"] != base["examples"]


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _eval_argv(model: Path | str, prompts_file: Path, *extra: str) -> list[str]:
    return ["eval", "--task", "sentiment", "--model", str(model), "--n", "8", "--max_new_tokens", "6",
            "--prompts_file", str(prompts_file), *extra]


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(EVAL_PROMPTS) + "\n")
    return path


@pytest.mark.slow
def test_cli_eval_of_a_run_directory(trained_run: dict[str, Any], prompts_file: Path, tiny_model_dir: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    run_dir: Path = trained_run["dir"]
    code, out, err = _run_cli(_eval_argv(run_dir, prompts_file, "--json"), capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["task"] == "sentiment" and result["model"] == str(run_dir) and result["n"] == 8
    assert {"score/reward", "score/positive_fraction", "kl_pi_a", "distinct_1", "completion_length"} <= set(result)
    assert result["kl_pi_a"] > 0.05  # sampled from the trained weights, not the base model
    assert json.loads((run_dir / "eval-sentiment.json").read_text()) == result  # written into the run
    # the same numbers as the library call on the loaded run (the CLI's default seed is 1234)
    from tasks import get_task

    spec = get_task("sentiment").build(0.1, {}, EVAL_PROMPTS)
    direct = evaluate_policy(load_run_policy(run_dir), spec, 8, 6, seed=1234)
    assert {k: v for k, v in result.items() if k not in ("task", "model")} == json.loads(json.dumps(direct))
    # a plain model directory is evaluated too, and nothing is written into it unless --output says where
    code, out, err = _run_cli(_eval_argv(tiny_model_dir, prompts_file, "--json"), capsys)
    assert code == 0, err
    assert abs(json.loads(out)["kl_pi_a"]) < 1e-4 and not list(Path(tiny_model_dir).glob("eval-*.json"))
    target = prompts_file.parent / "base.json"
    assert _run_cli(_eval_argv(tiny_model_dir, prompts_file, "--output", str(target)), capsys)[0] == 0
    assert json.loads(target.read_text())["n"] == 8


def test_cli_eval_of_an_unfinished_run_says_so(trained_run: dict[str, Any], prompts_file: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    unfinished = tmp_path / "unfinished"
    shutil.copytree(trained_run["dir"], unfinished)
    shutil.rmtree(unfinished / "final")
    code, _, err = _run_cli(_eval_argv(unfinished, prompts_file), capsys)
    assert code == 2 and "has no final/ model" in err and "Traceback" not in err
    code, _, err = _run_cli(_eval_argv(unfinished, prompts_file, "--n", "0"), capsys)
    assert code == 2 and "--n must be a positive" in err


@pytest.mark.slow
def test_every_finished_run_is_evaluated_once_and_the_base_model_is_cached(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """eval.json at the end of a run (policy and base, each with standard errors); the base model's evaluation
    is computed once per setting; a finished run without eval.json evaluates when resumed, one with it does not."""
    import fdpg.evaluation as evaluation

    monkeypatch.setenv("FDPG_EVAL_CACHE", str(tmp_path / "cache"))
    calls: list[bool] = []
    real = evaluation.evaluate_policy

    def counted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(bool(kwargs.get("of_reference")))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_policy", counted)
    first = build_trainer(tiny_model_dir, tmp_path / "first", steps=1, eval_samples=16)
    assert first.train()["status"] == "finished"
    assert calls == [False, True]
    result = json.loads((first.run_dir / "eval.json").read_text())
    assert result["n"] == 16 and result["base"]["kl_pi_a"] == 0 and result["policy"]["kl_pi_a_exact"] >= 0
    assert result["policy"]["score/reward_se"] > 0 and len(list((tmp_path / "cache").glob("base-*.json"))) == 1
    second = build_trainer(tiny_model_dir, tmp_path / "second", steps=1, eval_samples=16)
    second.train()
    assert calls == [False, True, False]  # the base model's evaluation came from the cache
    assert json.loads((second.run_dir / "eval.json").read_text())["base"] == result["base"]

    (first.run_dir / "eval.json").unlink()  # as if the run had been killed while evaluating
    resumed = build_trainer(tiny_model_dir, tmp_path / "ignored", steps=1, eval_samples=16,
                            resume=str(first.run_dir))
    assert resumed.train()["status"] == "finished"
    assert calls[3:] == [False] and (first.run_dir / "eval.json").is_file()
    build_trainer(tiny_model_dir, tmp_path / "ignored", steps=1, eval_samples=16, resume=str(first.run_dir)).train()
    assert len(calls) == 4  # evaluated already: not again


def test_cli_eval_prints_a_table_for_a_person(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """Without --json: one line per metric with its value and standard error, a few examples; --out the JSON."""
    target = tmp_path / "eval.json"
    code, out, err = _run_cli(_eval_argv(tiny_model_dir, prompts_file, "--out", str(target)), capsys)
    assert code == 0, err
    result = json.loads(target.read_text())
    assert out.splitlines()[0].endswith("on sentiment: 8 completions") and f"wrote {target}" in out
    line = next(row for row in out.splitlines() if row.startswith("score/reward "))
    assert line.split()[1:] == [f"{result['score/reward']:.4f}", f"{result['score/reward_se']:.4f}"]
    assert "examples:" in out and not out.lstrip().startswith("{")


def test_the_base_evaluation_is_shared_by_every_divergence(tiny_model_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """One base-model evaluation per setting whatever the divergence: D_f(a||p) of another divergence comes from
    the cached samples' log-ratios and equals a fresh evaluation's."""
    import fdpg.evaluation as evaluation
    from objectives import get_divergence

    calls: list[bool] = []
    real = evaluation.evaluate_policy

    def counted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(bool(kwargs.get("of_reference")))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_policy", counted)
    policy, spec, key = Policy.from_pretrained(str(tiny_model_dir)), toy_spec(), {"model": "tiny", "task": "toy"}
    results = {name: evaluation.base_evaluation(policy, spec, 16, 5, key, get_divergence(name), progress=False,
                                                cache_dir=tmp_path)
               for name in ("rkl", "js", "tv")}
    assert calls == [True] and len(list(tmp_path.glob("base-*.json"))) == 1
    for name, result in results.items():
        fresh = real(policy, spec, 16, 5, evaluation.EVAL_SEED, get_divergence(name), progress=False,
                     of_reference=True, chunk=evaluation.EVAL_CHUNK)
        assert result["d_f"] == pytest.approx(fresh["d_f"], rel=1e-9, abs=1e-12)
        assert result["d_f_se"] == pytest.approx(fresh["d_f_se"], rel=1e-9, abs=1e-12)
        assert result["score/reward"] == fresh["score/reward"] and "log_ratios" not in result
    assert results["rkl"]["d_f"] != pytest.approx(results["js"]["d_f"])
    assert "d_f" not in evaluation.base_evaluation(policy, spec, 16, 5, key, None, progress=False, cache_dir=tmp_path)
