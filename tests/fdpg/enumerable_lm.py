r"""Exact ground truth for a real Hugging Face causal LM small enough to list every completion.

The ``enumerable_model_dir`` model (``tests/conftest.py``) has 6 tokens; a completion of at most ``T`` new
tokens stops at its first end-of-sequence token, so there are :math:`\sum_{k<T} 5^k + 5^T` of them
(156 for ``T = 3``). Running each through the same code the trainer uses
(:func:`fdpg.log_probs.completion_token_log_probs`, the reference context, the task's scorer, the target)
gives, per prompt :math:`c`, the exact :math:`\log\pi_\theta(x\mid c)` (with its autograd graph),
:math:`\log a`, :math:`\log P`, :math:`Z_c = \sum_x P(x\mid c)` and :math:`\log p`, hence
:math:`D_f(\pi\|p)` and its gradient with respect to the trainable parameters.

With samples from a proposal :math:`q` and a baseline independent of the sample (leave-one-out, a moving
average), the trainer's gradient :math:`-\frac1n\sum_j \frac{\pi}{q}(x_j)(R_j - b_j)\nabla\log\pi(x_j)` has
expectation

.. math:: g = -\sum_{x:\,q(x)>0}\pi(x)\,\big(R_S(x) - E_q[R_S]\big)\,\nabla\log\pi(x),

where :math:`R_S = -f'(\pi/p_S)` with :math:`p_S = P/Z_S` and :math:`Z_S = \sum_{q>0}P` (what the
importance-sampling estimate of ``Z`` converges to). When :math:`q` covers every completion (temperature,
a frozen proposal) the second term vanishes (:math:`\sum_x\pi\nabla\log\pi = 0`) and
:math:`g = \nabla_\theta D_f(\pi_\theta\|p)`; under top-p it is the gradient over the nucleus only.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from fdpg.log_probs import completion_token_log_probs
from fdpg.sampling import SampleBatch, completion_mask_from_eos, encode_prompts, eos_token_ids
from fdpg.scores import checked_features
from objectives import Divergence


def all_completions(vocab_size: int, eos_ids: Sequence[int], max_new_tokens: int) -> list[list[int]]:
    """Every completion: up to ``max_new_tokens`` tokens, ending at (and including) its first EOS."""
    others = [t for t in range(vocab_size) if t not in eos_ids]
    out: list[list[int]] = []
    for length in range(max_new_tokens):
        for body in itertools.product(others, repeat=length):
            out.extend([*body, e] for e in eos_ids)
    out.extend(list(body) for body in itertools.product(others, repeat=max_new_tokens))
    return out


def enumerated_batch(tokenizer, prompt: str, completions: list[list[int]]) -> SampleBatch:
    """A :class:`SampleBatch` holding every completion of ``prompt`` (log-prob fields zero)."""
    width = max(len(c) for c in completions)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([c + [pad] * (width - len(c)) for c in completions])
    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [prompt] * len(completions))
    texts = tokenizer.batch_decode(ids * mask + pad * (1 - mask), skip_special_tokens=True)
    zeros = torch.zeros(ids.shape)
    return SampleBatch([prompt] * len(completions), prompt_ids, prompt_mask, ids, mask, texts, zeros, zeros)


def _token_log_q(model: torch.nn.Module, batch: SampleBatch, temperature: float, top_p: float) -> torch.Tensor:
    """``[N]`` log q of each completion under the processed distribution (``-inf`` outside a top-p nucleus)."""
    warpers = LogitsProcessorList(
        ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
        + ([TopPLogitsWarper(top_p, min_tokens_to_keep=1)] if top_p < 1.0 else []))
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    attention = torch.cat([batch.prompt_mask, batch.completion_mask], 1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions).logits.float()
    t = batch.completion_ids.shape[1]
    logits = logits[:, -t - 1:-1]  # the positions that predict completion tokens
    rows = logits.reshape(-1, logits.shape[-1])
    warped = warpers(None, rows.clone()).reshape(logits.shape)
    chosen = torch.log_softmax(warped, -1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    chosen = torch.where(batch.completion_mask.bool(), chosen, torch.zeros_like(chosen))
    return chosen.double().sum(-1)


@dataclass
class ExactPrompt:
    """Everything exact about one prompt's completions (index i = completion i)."""

    prompt: str
    batch: SampleBatch
    log_pi: torch.Tensor  # with its autograd graph to the trainable parameters
    log_a: torch.Tensor
    log_P: torch.Tensor
    log_q: torch.Tensor
    features: dict[str, torch.Tensor]

    @property
    def log_Z(self) -> float:
        return float(torch.logsumexp(self.log_P, 0))

    @property
    def log_p(self) -> torch.Tensor:
        return self.log_P - self.log_Z

    def index(self, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
        """The enumeration index of each sampled completion (rows of ``completion_ids`` masked by ``mask``)."""
        lookup = {tuple(row[: int(m.sum())].tolist()): i
                  for i, (row, m) in enumerate(zip(self.batch.completion_ids, self.batch.completion_mask))}
        return [lookup[tuple(row[: int(m.sum())].tolist())] for row, m in zip(completion_ids, mask)]


def exact_prompt(trainer, prompt: str, with_proposal: bool = True) -> ExactPrompt:
    """Enumerate ``prompt``'s completions through the trainer's own model, reference, scorer and target.

    ``log_q`` is that of the trainer's off-policy proposal when it has one (``with_proposal``), else that of the
    current weights under the sampling settings (temperature, top-p).
    """
    cfg = trainer.config
    model = trainer._unwrapped()
    tokenizer = trainer.policy.tokenizer
    eos = eos_token_ids(model, tokenizer)
    completions = all_completions(len(tokenizer), eos, cfg.max_new_tokens)
    batch = enumerated_batch(tokenizer, prompt, completions)
    assert torch.equal(completion_mask_from_eos(batch.completion_ids, eos), batch.completion_mask)
    # Under --mixed_precision every pass is in the trainer's precision: the exact values are those of that policy.
    # log q first: swapping in the proposal's weights (in place) must not touch the graph of log pi.
    with trainer.accelerator.autocast():
        if cfg.off_policy and with_proposal:
            trainer._swap_params(trainer.proposal)
            try:
                log_q = _token_log_q(model, batch, cfg.temperature, cfg.top_p)
            finally:
                trainer._swap_params(trainer.proposal)
        else:
            log_q = _token_log_q(model, batch, cfg.temperature, cfg.top_p)
        log_pi = completion_token_log_probs(model, batch).double().sum(-1)
        with torch.no_grad(), trainer.policy.reference(model) as reference:
            log_a = completion_token_log_probs(reference, batch).double().sum(-1)
    total = float(torch.logsumexp(log_pi.detach(), 0))
    assert abs(total) < 1e-5, f"the enumeration misses mass: log sum pi = {total}"
    features = checked_features(trainer.target, trainer.scorer(batch.texts, batch.prompts), len(batch))
    log_P = trainer.target.log_P(log_a, features)
    return ExactPrompt(prompt, batch, log_pi, log_a, log_P.double(), log_q, features)


def flat_grad(value: torch.Tensor, params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """``d value / d params``, flattened and concatenated in the order of ``params``."""
    grads = torch.autograd.grad(value, list(params), retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]).double()


def exact_divergence_gradient(exact: Sequence[ExactPrompt], div: Divergence, params) -> torch.Tensor:
    r"""The mean over prompts of :math:`\nabla_\theta D_f(\pi_\theta(\cdot\mid c)\|p_c)`, by autograd of the
    enumerated :meth:`Divergence.exact`."""
    value = sum(div.exact(e.log_pi, e.log_p) for e in exact) / len(exact)
    return flat_grad(value, params)


def expected_trainer_gradient(exact: Sequence[ExactPrompt], div: Divergence, params) -> torch.Tensor:
    """The expectation ``g`` of the module docstring (support of q, ``Z_S``), averaged over prompts."""
    total = 0.0
    for e in exact:
        support = e.log_q > -math.inf
        log_pi = e.log_pi[support]
        log_P = e.log_P[support]
        log_p = log_P - torch.logsumexp(log_P, 0)
        rewards = div.pseudo_reward(log_pi.detach(), log_p)
        mean_q = float((e.log_q[support].exp() * rewards).sum())
        total = total - (log_pi.detach().exp() * (rewards - mean_q) * log_pi).sum()
    return flat_grad(total / len(exact), params)


# ----------------------------------------------------------------------------- trainers on the enumerable model
def ab_scorer(completions: list[str], prompts: list[str]) -> dict[str, list[float]]:
    """``reward`` = 1 + (#a - #b)/3 (the offset makes log Z far from 0), ``has_a`` = the completion has an a."""
    return {"reward": [1.0 + (t.count("a") - t.count("b")) / 3 for t in completions],
            "has_a": [float("a" in t) for t in completions]}


def enumerable_trainer(model_dir, tmp_path, target=None, prompts=("",), beta: float = 0.5, batch: int = 64,
                       scorer=None, fine_grained=None, generator=None, **overrides: Any):
    """A trainer (``algo`` chooses f-DPG, PPO or GRPO) on the enumerable model with a random LoRA adapter (pi != a),
    completions of at most 3 tokens, two micro-batches, no gradient clipping, the :func:`ab_scorer` reward (or
    ``scorer``, and a task's ``fine_grained`` reward)."""
    from fdpg_testing import nonzero_lora_policy

    from fdpg.algorithms import online_trainer_class
    from fdpg.config import TrainConfig
    from objectives import rl_with_kl

    settings: dict[str, Any] = dict(
        model=str(model_dir), task="exactness", divergence="rkl", beta=beta, steps=100, batch_size=batch,
        samples_per_prompt=batch // len(prompts), generation_batch_size=batch, micro_batch_size=batch // 2,
        max_new_tokens=3, learning_rate=1e-3, max_grad_norm=None, seed=0, output_dir=str(tmp_path / "run"),
        progress=False, lora_r=4, lora_target_modules="all-linear")
    settings.update(overrides)
    config = TrainConfig(**settings)
    policy = nonzero_lora_policy(model_dir)
    if generator is not None:  # a shared engine (vLLM's, started once for the tests)
        policy.generator = generator
    target = rl_with_kl("reward", beta) if target is None else target
    algorithm = online_trainer_class(config.algo)
    return algorithm(config, policy, target, scorer or ab_scorer, list(prompts), fine_grained=fine_grained)


def recorded_gradients(trainer, steps: int, warmup: int = 2) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The gradient of the policy's trainable parameters at each of ``steps`` steps (``[steps, d]``), all at the
    same parameters (the optimizer's step records the gradient and moves nothing), after ``warmup`` steps that
    let the running estimates settle; and the recorded steps' metrics."""
    params = list(trainer._policy_trainable().values())
    grads: list[torch.Tensor] = []

    def record(*args: Any, **kwargs: Any) -> None:
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]).double().clone())

    trainer.optimizer.step = record
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
        metrics = [trainer.train_step(step) for step in range(warmup + steps)]
    return torch.stack(grads[warmup:]), metrics[warmup:]
