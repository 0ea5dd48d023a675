"""List-wise training on DPO's engine: the applied gradient is the gradient of each paper's loss written out (RRHF,
PRO reference-free with no reference pass; LiPO with the reference), bad data and settings are refused with the
reason, and ``fdpg train --algo listwise`` runs from a rankings file."""

from __future__ import annotations

import math

import pytest
import torch
from fdpg_testing import PROMPTS, read_jsonl, run_cli, toy_scorer
from test_dpo import SMALL, assert_gradient_of, sequence_log_prob, step_gradient, write_jsonl

from fdpg.config import TrainConfig
from fdpg.preferences import PreferenceDataError
from fdpg.ranked_lists import load_ranked_lists
from objectives import rl_with_kl

BETA = 0.5
RANKINGS = [
    {"prompt": PROMPTS[i % len(PROMPTS)], "responses": [f"aeiou {i}", f"ea ea {i}", f"bcd {i}", f"zzz kk {i}"][:k]}
    for i, k in enumerate([4, 3, 4, 2, 3, 4, 4, 2])]


def listwise_trainer(model_dir, tmp_path, **overrides):
    from fdpg.algorithms.listwise import ListwiseTrainer
    from fdpg.policy import Policy

    path = write_jsonl(tmp_path / "rankings.jsonl", RANKINGS)
    settings = dict(algo="listwise", preferences=str(path), model=str(model_dir), task="toy", beta=BETA, steps=2,
                    batch_size=4, samples_per_prompt=2, generation_batch_size=4, micro_batch_size=5,
                    max_new_tokens=6, learning_rate=1e-2, seed=0, output_dir=str(tmp_path / "run"), progress=False,
                    eval_samples=0, eval_every=0, exact_kl_every=0, heldout_fraction=0.0)
    config = TrainConfig(**{**settings, **overrides})
    torch.manual_seed(0)
    policy = Policy.from_pretrained(config.model)
    lists = load_ranked_lists(str(path), policy.tokenizer, policy.max_positions)
    return ListwiseTrainer(config, policy, rl_with_kl("reward", BETA), toy_scorer, PROMPTS, pairs=lists)


@pytest.mark.parametrize("loss", ["rrhf", "pro", "lipo"])
def test_trainer_gradient_is_the_gradient_of_the_papers_loss(tiny_model_dir, tmp_path, loss):
    trainer = listwise_trainer(tiny_model_dir, tmp_path, list_loss=loss, nll_coef=0.4)
    lists, model = trainer.pairs, trainer.model
    index = trainer.step_pairs(0)
    reference = None
    if loss == "lipo":
        trainer.reference_log_probs = trainer.reference_pass()
        with torch.no_grad():
            reference = [[float(sequence_log_prob(model, lists.prompt_ids[g], r)) for r in lists.response_ids[g]]
                         for g in index]
        with torch.no_grad():  # move the policy off its reference
            for p in trainer._trainable().values():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    else:
        assert trainer.reference_log_probs is None  # no reference pass at all
    got = step_gradient(trainer)
    total = 0.0
    for n, g in enumerate(index):
        k = len(lists.response_ids[g])
        logp = [sequence_log_prob(model, lists.prompt_ids[g], r) for r in lists.response_ids[g]]
        p = [logp[i] / len(lists.response_ids[g][i]) for i in range(k)]
        if loss == "rrhf":
            term = sum(torch.relu(p[j] - p[i]) for i in range(k) for j in range(i + 1, k)) - 0.4 * logp[0]
        elif loss == "pro":
            term = -sum(p[m] - torch.logsumexp(torch.stack(p[m:]), 0) for m in range(k - 1)) - 0.4 * p[0]
        else:
            s = [BETA * (logp[i] - reference[n][i]) for i in range(k)]
            psi = [(k - 1 - i) / (k - 1) for i in range(k)]
            order = sorted(range(k), key=lambda i: -float(s[i]))
            tau = {i: order.index(i) + 1 for i in range(k)}
            term = sum(abs(2 ** psi[i] - 2 ** psi[j]) * abs(1 / math.log2(1 + tau[i]) - 1 / math.log2(1 + tau[j]))
                       * -torch.nn.functional.logsigmoid(s[i] - s[j]) for i in range(k) for j in range(k)
                       if psi[i] > psi[j])
        total = total + term
    assert_gradient_of(total / len(index), trainer, got)


def test_pairs_only_data_and_a_ranking_of_one_are_refused(tmp_path, tiny_tokenizer):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(PreferenceDataError, match=r"rankings.*use --algo dpo"):
        load_ranked_lists(str(pairs), tiny_tokenizer, None)
    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "a", "responses": ["b"]}])
    with pytest.raises(PreferenceDataError, match="fewer than two responses|at least two"):
        load_ranked_lists(str(one), tiny_tokenizer, None)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(), r"--algo listwise learns from K-wise rankings"),
    (dict(preferences="task"), r"--algo listwise learns from K-wise rankings"),
    (dict(preferences="r.jsonl", list_loss="lambda"), r"--list_loss must be one of rrhf, pro, lipo"),
    (dict(preferences="r.jsonl", list_loss="rrhf", divergence="js"), r"reference-free: it reads no pi/pi_ref"),
    (dict(preferences="r.jsonl", divergence="tv"), r"is not defined"),
    (dict(preferences="r.jsonl", preference_loss="ipo"), r"--algo listwise takes --list_loss"),
])
def test_bad_listwise_settings_are_refused_with_the_reason(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(algo="listwise", output_dir=str(tmp_path), eval_samples=0, **settings)


@pytest.mark.slow
def test_cli_listwise_from_a_rankings_file(tiny_model_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "rankings.jsonl", RANKINGS)
    code, _, err = run_cli(["train", "--algo", "listwise", "--preferences", str(path), "--list_loss", "lipo",
                            "--model", str(tiny_model_dir), "--task", "sentiment", "--steps", "3", "--eval_every",
                            "2", "--heldout_fraction", "0.25", "--output_dir", str(tmp_path / "run"), *SMALL], capsys)
    assert code == 0, err
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(k in metrics[0] for k in ("loss", "list/top1_accuracy", "heldout/loss", "kl_pi_a"))
    assert (tmp_path / "run" / "reference_log_probs.safetensors").is_file()
