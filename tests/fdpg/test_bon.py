"""Best-of-n (fdpg.bon, ``fdpg bon``): the analytic KL, the pick of the best completion, the nested estimator, and
run directories that analysis draws as method 'Best-of-n' with n = 1 the base model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from fdpg_testing import PROMPTS, toy_scorer
from scipy import integrate

from fdpg.bon import (
    analytic_kl,
    best_of_first,
    choose_prompts,
    load_base_policy,
    parse_ns,
    reward_feature_of,
    run_best_of_n,
    select_best_of_n,
    write_bon_runs,
)
from fdpg.engine import feature_means


def test_analytic_kl_is_log_n_minus_n_minus_1_over_n() -> None:
    assert analytic_kl(1) == 0.0
    assert analytic_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert analytic_kl(16) == pytest.approx(1.8351, abs=1e-4)
    values = [analytic_kl(n) for n in (1, 2, 4, 8, 16, 32)]
    assert all(b > a for a, b in zip(values, values[1:]))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            analytic_kl(bad)


@pytest.mark.parametrize("n", [2, 3, 8])
def test_analytic_kl_is_the_kl_of_the_maximum_of_n_continuous_draws(n: int) -> None:
    """An independent derivation: for a continuous reward, best-of-n has density n F^(n-1) relative to a, so
    KL = E[log(n u^(n-1))] with u ~ Beta(n, 1) (the reward's quantile), integrated numerically."""
    kl, _ = integrate.quad(lambda u: n * u ** (n - 1) * math.log(n * u ** (n - 1)), 0.0, 1.0)
    assert analytic_kl(n) == pytest.approx(kl, rel=1e-7)


def test_with_a_discrete_reward_the_analytic_kl_is_an_upper_bound() -> None:
    """On K equally likely outcomes with distinct rewards, best-of-n picks outcome k with probability
    (k/K)^n - ((k-1)/K)^n: its exact KL to a is below log n - (n-1)/n and tends to it as K grows."""
    def exact(n: int, k: int) -> float:
        cdf = np.arange(k + 1) / k
        q = cdf[1:] ** n - cdf[:-1] ** n
        return float(np.sum(q * np.log(q * k)))

    for n in (2, 4, 16):
        gaps = [analytic_kl(n) - exact(n, k) for k in (4, 64, 4096)]
        assert all(g > 0 for g in gaps) and gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-2


def test_best_of_first_picks_the_highest_reward_of_the_first_n_and_the_first_on_ties() -> None:
    rewards = torch.tensor([[0.1, 0.9, 0.5, 2.0],
                            [0.3, 0.3, 0.7, 0.7],
                            [5.0, 1.0, 1.0, 9.0]])
    assert best_of_first(rewards, 1).tolist() == [0, 0, 0]
    assert best_of_first(rewards, 2).tolist() == [1, 0, 0]   # a tie keeps the first
    assert best_of_first(rewards, 3).tolist() == [1, 2, 0]
    assert best_of_first(rewards, 4).tolist() == [3, 2, 3]
    with pytest.raises(ValueError):
        best_of_first(rewards, 5)
    with pytest.raises(ValueError):
        best_of_first(rewards[0], 1)


def test_parse_ns() -> None:
    assert parse_ns("16, 1,4,4,2") == [1, 2, 4, 16]
    for bad in ("", "0,2", "a,b", "1.5"):
        with pytest.raises(ValueError):
            parse_ns(bad)


def fake_samples(prompts: int, per_prompt: int, seed: int = 0):
    """Prompt-major samples whose text carries its score: a fake scorer reads the number back."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(prompts, per_prompt)).round(6)
    prompt_list = [f"p{i}" for i in range(prompts) for _ in range(per_prompt)]
    texts = [f"{scores[i, j]:+.6f}" for i in range(prompts) for j in range(per_prompt)]
    tokens = [[ord(c) for c in t] for t in texts]
    return prompt_list, texts, tokens, scores


def fake_scorer(completions: list[str], prompts: list[str]) -> dict[str, list[float]]:
    return {"reward": [float(t) for t in completions], "other": [len(p) for p in prompts]}


def test_select_keeps_the_best_completion_and_scores_what_it_kept() -> None:
    prompts, texts, tokens, scores = fake_samples(prompts=50, per_prompt=8)
    raw = fake_scorer(texts, prompts)
    features = {k: torch.tensor(v, dtype=torch.float64) for k, v in raw.items()}
    results = select_best_of_n(prompts, texts, tokens, features, "reward", [1, 2, 8], feature_means)
    assert [r.n for r in results] == [1, 2, 8]
    for result in results:
        want = scores[:, :result.n].max(axis=1)
        assert [float(t) for t in result.completions] == pytest.approx(want.tolist())  # the kept texts are the best
        assert result.prompts == [f"p{i}" for i in range(50)]
        assert result.index.tolist() == scores[:, :result.n].argmax(axis=1).tolist()
        assert result.metrics["score/reward"] == pytest.approx(want.mean())
        assert result.metrics["score/reward_se"] == pytest.approx(want.std(ddof=1) / math.sqrt(50), rel=0.35)
        assert result.metrics["kl_pi_a"] == result.metrics["kl_pi_a_exact"] == pytest.approx(analytic_kl(result.n))
        assert result.metrics["kl_pi_a_source"] == "analytic" and result.metrics["kl_pi_a_exact_se"] == 0.0
    # n = 1 is the base model: the first draw of each prompt, its plain mean
    assert results[0].metrics["score/reward"] == pytest.approx(scores[:, 0].mean())
    # nested: for every prompt the kept reward never decreases with n
    kept = np.array([[float(t) for t in r.completions] for r in results])
    assert (np.diff(kept, axis=0) >= 0).all() and kept[-1].mean() > kept[0].mean() + 0.5


def test_select_refuses_samples_that_are_not_n_per_prompt() -> None:
    prompts, texts, tokens, _ = fake_samples(prompts=3, per_prompt=4)
    features = {"reward": torch.tensor([float(t) for t in texts], dtype=torch.float64)}
    with pytest.raises(ValueError, match="per prompt"):
        select_best_of_n(prompts[:-1], texts[:-1], tokens[:-1], {"reward": features["reward"][:-1]}, "reward", [4],
                         feature_means)
    with pytest.raises(KeyError, match="nope"):
        select_best_of_n(prompts, texts, tokens, features, "nope", [4], feature_means)


def test_choose_prompts() -> None:
    assert choose_prompts(None, 3, 0) == ["", "", ""]
    picked = choose_prompts(PROMPTS, 4, 1)
    assert sorted(picked) == sorted(PROMPTS)  # distinct while the pool has enough
    assert len(choose_prompts(PROMPTS, 9, 1)) == 9
    assert choose_prompts(PROMPTS, 4, 1) == picked


def test_the_reward_is_the_targets_or_the_one_named() -> None:
    from objectives import binary_constraint, rl_with_kl
    from tasks import TaskSpec

    spec = TaskSpec(prompts=None, scorer=toy_scorer, target=rl_with_kl("reward", 0.1), metrics=feature_means)
    assert reward_feature_of(spec, None, 0.1) == "reward"
    spec.target = binary_constraint("b")
    with pytest.raises(ValueError, match="--reward_feature"):
        reward_feature_of(spec, None, 0.1)
    assert reward_feature_of(spec, "b", 0.1) == "b"


@pytest.fixture(scope="module")
def bon_dirs(tiny_model_dir, tmp_path_factory):
    """Best-of-1, 2 and 4 of the tiny model on the toy task, written as run directories."""
    from objectives import rl_with_kl
    from tasks import TaskSpec

    spec = TaskSpec(prompts=PROMPTS, scorer=toy_scorer, target=rl_with_kl("reward", 0.1), metrics=feature_means)
    policy = load_base_policy(str(tiny_model_dir))
    results = run_best_of_n(policy, spec, [2, 4], prompts=24, max_new_tokens=8, seed=3, reward="reward",
                            progress=False)
    out = tmp_path_factory.mktemp("bon")
    settings = {"task": "toy", "model": str(tiny_model_dir), "seed": 3, "max_new_tokens": 8, "prompts": 24}
    return write_bon_runs(out, results, settings), results, policy, spec


@pytest.mark.slow
def test_run_best_of_n_draws_max_n_per_prompt_once_and_n1_is_the_base_samples(bon_dirs) -> None:
    from fdpg.evaluation import sample_for_prompts

    dirs, results, policy, spec = bon_dirs
    assert [r.n for r in results] == [1, 2, 4]  # n = 1 always comes first
    # the same seeded draws again: 4 per prompt, prompt by prompt; n = 1 keeps the first of each
    chosen = choose_prompts(spec.prompts, 24, 3)
    batch = sample_for_prompts(policy, [p for p in chosen for _ in range(4)], 8, 3, progress=False)
    rewards = torch.tensor(toy_scorer(list(batch.texts), list(batch.prompts))["reward"]).reshape(24, 4)
    assert results[0].completions == list(batch.texts)[::4]
    assert results[0].metrics["score/reward"] == pytest.approx(float(rewards[:, 0].mean()))
    assert results[2].metrics["score/reward"] == pytest.approx(float(rewards.max(dim=1).values.mean()))


def test_the_run_directories_are_read_by_analysis_as_best_of_n(bon_dirs) -> None:
    import analysis

    dirs, results, _, _ = bon_dirs
    assert [d.name for d in dirs] == ["bon-toy-n1-seed3", "bon-toy-n2-seed3", "bon-toy-n4-seed3"]
    metrics = analysis.load_runs(dirs)
    assert set(metrics["method"]) == {"Best-of-n"} and set(metrics["algo"]) == {"bon"}
    assert set(metrics["kl_pi_a_source"]) == {"analytic"}
    points = analysis.frontier_points(dirs).set_index("run")
    for result, d in zip(results, dirs):
        row = points.loc[d.name]
        assert row["kl_pi_a_exact"] == pytest.approx(analytic_kl(result.n)) and row["kl_pi_a_exact_se"] == 0.0
        assert row["score/reward"] == pytest.approx(result.metrics["score/reward"])
        assert row["score/reward_se"] == pytest.approx(result.metrics["score/reward_se"])
        assert row["source"] == "eval (n=24)"
    # the base model's point (eval.json's "base") is the n = 1 point: KL 0, the same mean
    base = points[points["method"] == "base a"]
    assert len(base) == 1 and base["kl_pi_a_exact"].iloc[0] == 0.0
    assert base["score/reward"].iloc[0] == pytest.approx(points.loc["bon-toy-n1-seed3", "score/reward"])
    # without eval.json (--source train) the same values, from metrics.jsonl
    train = analysis.frontier_points(dirs, source="train").set_index("run")
    assert train.loc["bon-toy-n4-seed3", "score/reward"] == pytest.approx(results[2].metrics["score/reward"])
    assert train.loc["bon-toy-n4-seed3", "kl_pi_a"] == pytest.approx(analytic_kl(4))
    samples = analysis.load_samples(dirs[2])
    assert len(samples) == 24 and samples["completion"].tolist() == results[2].completions
    assert json.loads((dirs[2] / "config.json").read_text())["config"]["bon_n"] == 4


def test_fdpg_bon_command(tiny_model_dir, tmp_path, capsys) -> None:
    from fdpg.commands.report import cmd_bon

    out = tmp_path / "bon"
    common = ["--task", "lexical", "--output_dir", str(out), "--prompts", "6", "--max_new_tokens", "6",
              "--no_progress", "--n", "1,3"]
    with pytest.raises(ValueError, match="--reward_feature"):  # a constraint names no reward: refused first
        cmd_bon([*common, "--model", str(tmp_path / "no-such-model")])
    assert cmd_bon([*common, "--model", str(tiny_model_dir), "--reward_feature", "b", "--task_args", "word=e"]) == 0
    printed = capsys.readouterr().out
    assert "bon-lexical-n3-seed0" in printed and f"{analytic_kl(3):.4f}" in printed
    assert sorted(p.name for p in out.iterdir()) == ["bon-lexical-n1-seed0", "bon-lexical-n3-seed0"]
    config = json.loads((out / "bon-lexical-n3-seed0" / "config.json").read_text())["config"]
    assert config["algo"] == "bon" and config["reward_feature"] == "b" and config["samples_per_prompt"] == 3
