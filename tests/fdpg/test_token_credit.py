r"""Fine-grained rewards in the trainers, on the exact enumerable model (completions over the tokens ``a``, ``b``).

The fine-grained reward gives each character its own segment, ``a`` +1/3 and ``b`` -1/3, plus 1 for the whole
text: the same total as :func:`enumerable_lm.ab_scorer`'s reward, now placed on the tokens.

1. f-DPG reverse KL with ``--token_credit`` (each token weighted by its reward-to-go, a per-position leave-one-out
   baseline): the mean of the gradients the real trainer applies is the exact :math:`\nabla KL(\pi\|p)` (Hotelling);
   by enumeration, one sample's token-level estimate has the same mean as the sequence-level one and a lower
   variance (exact ratio 0.84 here, printed).
2. A component whose score for a segment reads later tokens (the whole text's letter count on the first character),
   wrongly declared causal, gives token-level credit a mean off by 14% (by enumeration) while the sequence-level
   estimate stays exact; declared ``causal=False`` it is refused with the reason.
3. PPO takes the per-token rewards: its per-token rewards are the segment rewards minus beta KL_t.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from enumerable_lm import enumerable_trainer, exact_divergence_gradient, exact_prompt, flat_grad, recorded_gradients
from statistics_testing import P_VALUE_FLOOR, projected_hotelling

from fdpg.log_probs import completion_token_log_probs
from objectives import get_divergence
from objectives.fine_grained import Component, FineGrainedReward, reward_to_go

BETA = 0.5
STEPS, WARMUP = 40, 2


def characters(text: str) -> list[tuple[int, int]]:
    return [(i, i + 1) for i in range(len(text))]


def letter_scores(texts: list[str]) -> list[float]:
    return [(t.count("a") - t.count("b")) / 3 for t in texts]


def causal_reward() -> FineGrainedReward:
    return FineGrainedReward([Component("letters", characters, letter_scores),
                              Component("offset", "whole", lambda texts: [1.0] * len(texts))])


def peeking_reward(declared_causal: bool) -> FineGrainedReward:
    """The letter reward of the WHOLE text, put on the first character's segment: it reads the later tokens."""
    first_character = lambda text: [(0, 1)] if text else []  # noqa: E731

    class Peek:
        def __init__(self) -> None:
            self.texts: list[str] = []

        def segments(self, text: str) -> list[tuple[int, int]]:
            self.texts.append(text)
            return first_character(text)

        def __call__(self, pieces: list[str]) -> list[float]:
            scores = letter_scores([t for t in self.texts if t])
            self.texts = []
            return scores

    peek = Peek()
    return FineGrainedReward([Component("peek", peek.segments, peek, causal=declared_causal),
                              Component("offset", "whole", lambda texts: [1.0] * len(texts))])


def scorer_of(reward: FineGrainedReward):
    return lambda completions, prompts: {"reward": reward.totals(completions).tolist()}


def trainer_with(model_dir: Path, tmp_path: Path, reward: FineGrainedReward, **overrides):
    return enumerable_trainer(model_dir, tmp_path, beta=BETA, scorer=scorer_of(reward), fine_grained=reward,
                              **overrides)


def exact_gradient(trainer) -> torch.Tensor:
    params = list(trainer._policy_trainable().values())
    return exact_divergence_gradient([exact_prompt(trainer, p) for p in trainer.prompts], get_divergence("rkl"),
                                     params)


def total_variance(grads: torch.Tensor) -> float:
    return float(grads.var(0).sum())


@pytest.mark.slow
def test_the_token_credit_gradient_the_trainer_applies_is_unbiased(enumerable_model_dir, tmp_path):
    trainer = trainer_with(enumerable_model_dir, tmp_path / "token", causal_reward(), token_credit=True)
    exact = exact_gradient(trainer)
    token_grads, _ = recorded_gradients(trainer, STEPS, WARMUP)
    t2, rank, p_value = projected_hotelling(token_grads, exact)
    assert p_value > P_VALUE_FLOOR, f"token credit: T^2 = {t2:.1f} on {rank} dof (p = {p_value:.2g})"



def one_sample_gradients(trainer):
    """By enumeration of every completion x: pi(x), the single-sample estimates g_seq(x) = G_0(x) grad log pi(x)
    and g_tok(x) = sum_t G_t(x) grad log pi(y_t | y_<t) (rows; no baseline), and -grad KL(pi || p) (these are
    ascent directions: the loss is minus them)."""
    exact = exact_prompt(trainer, "")
    batch = exact.batch
    model = trainer._unwrapped()
    params = list(trainer._policy_trainable().values())
    token_log_pi = completion_token_log_probs(model, batch).double()
    with torch.no_grad(), trainer.policy.reference(model) as reference:
        token_log_a = completion_token_log_probs(reference, batch).double()
    dense = trainer.token_rewards(batch, exact.features)
    to_go = reward_to_go(dense, token_log_pi.detach() - token_log_a, batch.completion_mask, BETA)
    seq = torch.stack([flat_grad(to_go[i, 0] * token_log_pi[i].sum(), params) for i in range(len(batch))])
    tok = torch.stack([flat_grad((to_go[i] * token_log_pi[i]).sum(), params) for i in range(len(batch))])
    return exact.log_pi.detach().exp(), seq, tok, -exact_gradient(trainer)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.slow
def test_token_credit_lowers_the_exact_variance_of_one_sample_estimate(enumerable_model_dir, tmp_path):
    """Both estimates have the mean grad KL(pi || p), and E|g_tok - g|^2 < E|g_seq - g|^2: the exact ratio."""
    trainer = trainer_with(enumerable_model_dir, tmp_path / "run", causal_reward(), token_credit=True)
    pi, seq, tok, want = one_sample_gradients(trainer)
    mean_seq, mean_tok = pi @ seq, pi @ tok
    # equal up to the enumeration's float32 mass error (sum pi = 1 to 1e-5) times the dropped constant log Z + 1
    assert relative_error(mean_seq, want) < 1e-4 and relative_error(mean_tok, want) < 1e-4
    var_seq = float(pi @ (seq**2).sum(1) - mean_seq.pow(2).sum())
    var_tok = float(pi @ (tok**2).sum(1) - mean_tok.pow(2).sum())
    print(f"exact variance of one sample's gradient, token-level / sequence-level credit: {var_tok / var_seq:.3f}")
    assert var_tok < 0.9 * var_seq


@pytest.mark.slow
def test_a_component_that_reads_later_tokens_biases_token_credit(enumerable_model_dir, tmp_path):
    """The same total, but the first token's reward depends on the tokens after it: by enumeration, the
    token-level estimate's mean is off while the sequence-level one is exact; declared, it is refused."""
    lying = trainer_with(enumerable_model_dir, tmp_path / "lying", peeking_reward(declared_causal=True),
                         token_credit=True)
    pi, seq, tok, want = one_sample_gradients(lying)
    assert relative_error(pi @ seq, want) < 1e-4
    bias = relative_error(pi @ tok, want)
    print(f"relative bias of token-level credit with the peeking component: {bias:.3f}")
    assert bias > 0.05
    with pytest.raises(ValueError, match=r"\['peek'\] are declared non-causal.*Drop --token_credit"):
        trainer_with(enumerable_model_dir, tmp_path / "refused", peeking_reward(declared_causal=False),
                     token_credit=True)


def test_token_credit_settings_are_checked(tmp_path):
    from fdpg.config import TrainConfig

    for bad, needle in ((dict(divergence="js"), "reverse-KL"), (dict(temperature=1.5), "on-policy"),
                        (dict(algo="ppo"), "drop --token_credit"), (dict(baseline="moving_average"), "per-position")):
        with pytest.raises(ValueError, match=needle):
            TrainConfig(token_credit=True, output_dir=str(tmp_path), **bad)


def test_ppo_takes_the_per_token_rewards(enumerable_model_dir, tmp_path):
    trainer = trainer_with(enumerable_model_dir, tmp_path / "ppo", causal_reward(), algo="ppo",
                           missing_eos_penalty=0.25)
    batch, features, _ = trainer.rollout(0)
    dense = trainer.dense_rewards
    torch.testing.assert_close(dense.sum(-1), features["reward"].double())
    scores = trainer.sequence_rewards(batch, features["reward"])
    token = trainer.token_scores(batch, scores, features["reward"])
    torch.testing.assert_close(token.sum(-1), scores)  # the EOS penalty lands on the last token
    tokenizer = trainer.policy.tokenizer
    for row in range(len(batch)):  # each letter's reward on its own token, the whole text's on the last token
        n = int(batch.lengths[row])
        pieces = [tokenizer.decode([i]) for i in batch.completion_ids[row, :n].tolist()]
        expected = [{"a": 1 / 3, "b": -1 / 3}.get(piece, 0.0) for piece in pieces]
        expected[-1] += 1.0
        assert dense[row, :n].tolist() == pytest.approx(expected), pieces
