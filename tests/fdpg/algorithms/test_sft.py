"""Supervised fine-tuning: the loss is transformers' causal-LM loss on the completion tokens, the applied gradient is
its gradient (micro-batched), bad demonstrations are refused with the reason, and `fdpg train --algo sft` runs."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from fdpg_testing import PROMPTS, read_jsonl, run_cli, toy_scorer

from fdpg.config import TrainConfig
from fdpg.demonstrations import DemonstrationDataError, load_demonstrations, tokenize_demonstrations
from fdpg.log_probs import completion_token_log_probs
from fdpg.policy import LoraSettings, Policy
from objectives import rl_with_kl
from objectives.likelihood import completion_nll

ROWS = {"prompt": ["hello", "the cat sat on", "", "my review:", "a", "one more"],
        "completion": [" world.", " the mat, then slept", "once upon a time", " great!", "b c d", " and done"]}


def hf_causal_lm_loss(model, demonstrations, index, pad_id: int) -> torch.Tensor:
    """transformers' own loss: prompt + completion right-padded, labels -100 on the prompt and the padding."""
    rows = [demonstrations.prompt_ids[i] + demonstrations.completion_ids[i] for i in index]
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = input_ids.clone()
    for j, i in enumerate(index):
        labels[j, :len(demonstrations.prompt_ids[i])] = -100
    labels[attention == 0] = -100
    return model(input_ids=input_ids, attention_mask=attention, labels=labels).loss


def sft_trainer(model_dir, tmp_path, **overrides):
    from fdpg.algorithms.sft import SFTTrainer

    settings = dict(algo="sft", data="unused", model=str(model_dir), task="toy", steps=2, batch_size=4,
                    micro_batch_size=3, max_new_tokens=6, learning_rate=1e-3, lora_r=4, heldout_fraction=0.2,
                    eval_every=1, output_dir=str(tmp_path / "run"), progress=False, eval_samples=0,
                    samples_per_prompt=1, generation_batch_size=4)
    settings.update(overrides)
    config = TrainConfig(**settings)
    torch.manual_seed(0)
    policy = Policy.from_pretrained(config.model, lora=LoraSettings(4, 8.0))
    data = tokenize_demonstrations(datasets.Dataset.from_dict(ROWS), policy.tokenizer, 128)
    return SFTTrainer(config, policy, rl_with_kl("reward", 0.1), toy_scorer, PROMPTS, demonstrations=data)


def test_the_sft_loss_is_transformers_causal_lm_loss_on_completion_tokens(tiny_model_dir) -> None:
    policy = Policy.from_pretrained(str(tiny_model_dir))
    data = tokenize_demonstrations(datasets.Dataset.from_dict(ROWS), policy.tokenizer, 128)
    index = [0, 1, 2, 3]
    batch = data.as_batch(index, policy.tokenizer.pad_token_id)
    with torch.no_grad():
        ours = completion_nll(completion_token_log_probs(policy.model, batch).double(), batch.completion_mask)
        theirs = hf_causal_lm_loss(policy.model, data, index, policy.tokenizer.pad_token_id)
    assert abs(float(ours) - float(theirs)) < 1e-6, (float(ours), float(theirs))
    assert data.completion_ids[2][-1] == policy.tokenizer.eos_token_id  # the completion ends with EOS
    assert data.prompt_ids[2] == [policy.tokenizer.bos_token_id]  # an empty prompt is the BOS token


def test_the_applied_gradient_is_the_gradient_of_the_batch_token_mean(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """One step's accumulated gradient (micro-batches of 3 of a batch of 4) equals autograd of transformers' loss on
    the whole batch: each micro-batch's share is normalised by the batch's tokens, not its own."""
    trainer = sft_trainer(tiny_model_dir, tmp_path, eval_every=0)
    captured = {}

    def capture():
        captured.update({k: p.grad.detach().clone() for k, p in trainer._trainable().items()})
        trainer.optimizer.zero_grad(set_to_none=True)

    monkeypatch.setattr(trainer, "optimizer_step", capture)
    index = trainer.batches.step(0)
    metrics = trainer.train_step(0)
    params = trainer._trainable()
    loss = hf_causal_lm_loss(trainer.model, trainer.data, index, trainer.pad_id)
    expected = torch.autograd.grad(loss, list(params.values()))
    assert metrics["loss"] == pytest.approx(float(loss), abs=1e-6)
    assert metrics["perplexity"] == pytest.approx(float(loss.exp()), rel=1e-6)
    for (name, got), want in zip(captured.items(), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
    assert max(float(g.abs().max()) for g in expected) > 1e-6


@pytest.mark.parametrize("rows, message", [
    ({"prompt": ["a"], "answer": ["b"]}, r"missing column\(s\) \['completion'\]"),
    ({"prompt": ["a", "b"], "completion": ["x", "  "]}, "row 1, column 'completion' is empty"),
    ({"messages": [[{"role": "user", "content": "hi"}]]}, "last turn is 'user'"),
])
def test_bad_demonstrations_are_refused_with_the_reason(tmp_path, rows, message) -> None:
    path = tmp_path / "demos.jsonl"
    n = len(next(iter(rows.values())))
    path.write_text("".join(json.dumps({k: v[i] for k, v in rows.items()}) + "\n" for i in range(n)))
    with pytest.raises(DemonstrationDataError, match=message):
        load_demonstrations(str(path))


def test_a_row_longer_than_the_context_is_refused_naming_it(tiny_tokenizer) -> None:
    data = datasets.Dataset.from_dict({"prompt": ["a", "b"], "completion": ["short", "x" * 200]})
    with pytest.raises(DemonstrationDataError, match=r"row 1: prompt \(1 tokens\) \+ completion \(201 tokens\)"):
        tokenize_demonstrations(data, tiny_tokenizer, 128)


def test_sft_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="--algo sft learns from demonstrations"):
        TrainConfig(algo="sft")
    with pytest.raises(ValueError, match="--data is SFT's demonstrations"):
        TrainConfig(algo="raft", data="x.jsonl")


@pytest.mark.slow
def test_cli_sft_run_logs_heldout_perplexity_and_serves_as_a_model(tiny_model_dir, tmp_path, capsys) -> None:
    path = tmp_path / "demos.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in zip(*ROWS.values())))
    run = tmp_path / "sft"
    common = ["--model", str(tiny_model_dir), "--task", "sentiment", "--max_new_tokens", "4", "--batch_size", "4",
              "--generation_batch_size", "4", "--micro_batch_size", "4", "--eval_samples", "4", "--progress", "false"]
    code, out, err = run_cli(["train", "--algo", "sft", "--data", str(path), "--lora_r", "4", "--epochs", "2",
                              "--eval_every", "1", "--heldout_fraction", "0.2", "--output_dir", str(run), *common],
                             capsys)
    assert code == 0, err
    rows = read_jsonl(run / "metrics.jsonl")
    assert len(rows) == 3  # ceil(2 epochs x 5 training rows / batches of 4)
    assert all("loss" in r and "heldout/perplexity" in r and "score/reward" in r for r in rows)
    assert "final evaluation" in out.lower() or (run / "eval.json").is_file()
    # the finished SFT run is a model: a later stage starts from it (its adapter merged), the reference too
    code, out, err = run_cli(["train", *common, "--algo", "raft", "--model", str(run), "--steps", "1", "--lora_r", "4",
                              "--samples_per_prompt", "2", "--output_dir", str(tmp_path / "raft")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "raft" / "config.json").read_text())["config"]["model"] == str(run)
    # --model RUN is the run's trained model: the base with the adapter merged, the same function as the adapter on
    from peft import PeftModel

    from fdpg.models import load_causal_lm

    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        merged = load_causal_lm(str(run))(ids).logits
        base = load_causal_lm(str(tiny_model_dir))
        unmerged = PeftModel.from_pretrained(base, str(run / "final"))(ids).logits
        plain = load_causal_lm(str(tiny_model_dir))(ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-6)
    assert (merged - plain).abs().max() > 1e-6
