r"""The exact-per-token estimate of KL(pi||a) (and of the entropy) against enumeration.

On the enumerable model every completion is listed, so the chain rule can be checked exactly:
:math:`\sum_x \pi(x)\sum_t KL(\pi(\cdot\mid s_t)\|a(\cdot\mid s_t)) = \sum_x\pi(x)\log\frac{\pi(x)}{a(x)}`, each
per-sample value is non-negative, and its variance under :math:`\pi` is far below that of
:math:`\log\pi(x) - \log a(x)`. The trainer's logged ``kl_pi_a_exact`` averages to the exact KL.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from enumerable_lm import enumerable_trainer, exact_prompt, recorded_gradients

from fdpg.log_probs import exact_token_kl


@pytest.mark.parametrize("prompt", ["", "ab"])
@pytest.mark.slow
def test_exact_token_kl_obeys_the_chain_rule_exactly(enumerable_model_dir: Path, tmp_path: Path,
                                                     prompt: str) -> None:
    trainer = enumerable_trainer(enumerable_model_dir, tmp_path, prompts=(prompt,))
    e = exact_prompt(trainer, prompt)
    model = trainer._unwrapped()
    stats = exact_token_kl(model, lambda: trainer.policy.reference(model), e.batch, chunk_rows=7)
    kl, entropy = stats.kl, stats.entropy
    log_pi = e.log_pi.detach()
    # the same pass gives each completion's log-probability under both models
    torch.testing.assert_close(stats.log_pi, log_pi, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.log_a, e.log_a, atol=1e-5, rtol=0)
    pi = log_pi.exp()
    assert bool((kl >= 0).all())
    sequence_kl = float((pi * (log_pi - e.log_a)).sum())
    assert sequence_kl > 0.05
    assert float((pi * kl).sum()) == pytest.approx(sequence_kl, rel=1e-5)
    assert float((pi * entropy).sum()) == pytest.approx(float(-(pi * log_pi).sum()), rel=1e-5)
    # variance under pi, exactly: the per-token estimate against log pi(x) - log a(x)
    var_exact = float((pi * (kl - sequence_kl) ** 2).sum())
    var_k1 = float((pi * (log_pi - e.log_a - sequence_kl) ** 2).sum())
    assert var_exact < 0.5 * var_k1, (var_exact, var_k1)


@pytest.mark.slow
def test_logged_exact_kl_averages_to_the_exact_kl(enumerable_model_dir: Path, tmp_path: Path) -> None:
    trainer = enumerable_trainer(enumerable_model_dir, tmp_path, exact_kl_every=2)
    (e,) = [exact_prompt(trainer, p) for p in trainer.prompts]
    log_pi = e.log_pi.detach()
    exact = float((log_pi.exp() * (log_pi - e.log_a)).sum())
    _, metrics = recorded_gradients(trainer, steps=20, warmup=0)
    logged = [m for m in metrics if "kl_pi_a_exact" in m]
    assert [m["step"] for m in logged] == list(range(1, 21, 2))  # every 2 steps, from the first
    values = torch.tensor([m["kl_pi_a_exact"] for m in logged], dtype=torch.float64)
    se = float(values.std()) / math.sqrt(len(values))
    assert abs(float(values.mean()) - exact) < 4 * se + 1e-9, (float(values.mean()), exact, se)
    assert all(m["kl_pi_a_exact_se"] > 0 for m in logged)
    # the per-token estimate's spread across batches is below the plain one's
    plain = torch.tensor([m["kl_pi_a"] for m in logged], dtype=torch.float64)
    assert float(values.std()) < float(plain.std())
    assert "time/exact_kl" in metrics[0] and "time/exact_kl" not in metrics[1]


def test_an_exact_kl_step_takes_log_a_from_its_own_reference_pass(tiny_model_dir: Path, tmp_path: Path) -> None:
    """On an exact-KL step the reference runs once: the per-token log a come from the exact-KL pass and equal the
    reference pass's; on the other steps the reference pass runs as before."""
    from fdpg_testing import build_trainer

    trainer = build_trainer(tiny_model_dir, tmp_path, lora_r=4, exact_kl_every=2, micro_batch_size=3)
    with torch.no_grad():
        for name, p in trainer._policy_trainable().items():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # pi != a
    calls = []
    original = trainer.token_log_probs

    def counted(batch, reference):
        calls.append(reference)
        return original(batch, reference)

    trainer.token_log_probs = counted
    batch, _, token_log_a = trainer.rollout(0)  # step 0: an exact-KL step
    assert calls == [] and trainer._exact_kl is not None
    want = original(batch, reference=True)
    assert token_log_a.shape == want.shape and token_log_a.dtype == torch.float64
    torch.testing.assert_close(token_log_a, want, atol=1e-5, rtol=0)
    assert float((want * batch.completion_mask).abs().sum()) > 1.0
    trainer._exact_kl = None
    trainer.rollout(1)
    assert calls == [True]
