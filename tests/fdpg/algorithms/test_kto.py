"""KTO on DPO's engine: the applied gradient is the gradient of the paper's loss, the data are read as TRL reads
them, bad data and settings are refused with the reason, and ``fdpg train --algo kto`` runs from a file and a task."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from fdpg_testing import PROMPTS, read_jsonl, run_cli, toy_scorer
from test_dpo import (  # noqa: F401  (vowels_task: a fixture)
    SMALL,
    assert_gradient_of,
    sequence_log_prob,
    step_gradient,
    toy_rows,
    vowels_task,
    write_jsonl,
)

from fdpg.config import TrainConfig
from fdpg.labelled_feedback import labelled_completions, with_mismatched_completions
from fdpg.preferences import PreferenceDataError, tokenize_pairs
from objectives import rl_with_kl

BETA = 0.5


def labelled_rows(n: int = 12) -> dict[str, list]:
    pairs = toy_rows(n // 2)
    return {"prompt": pairs["prompt"] * 2, "completion": pairs["chosen"] + pairs["rejected"],
            "label": [True] * (n // 2) + [False] * (n // 2)}


def kto_trainer(model_dir, output_dir, rows=None, **overrides):
    from fdpg.algorithms.kto import KTOTrainer
    from fdpg.policy import Policy

    settings = dict(algo="kto", preferences="unused", model=str(model_dir), task="toy", beta=BETA, steps=4,
                    batch_size=6, samples_per_prompt=2, generation_batch_size=4, micro_batch_size=4, max_new_tokens=6,
                    learning_rate=1e-2, seed=0, output_dir=str(output_dir), progress=False, eval_samples=0,
                    eval_every=0, exact_kl_every=0, heldout_fraction=0.0)
    config = TrainConfig(**{**settings, **overrides})
    torch.manual_seed(config.seed)
    policy = Policy.from_pretrained(config.model)
    data = with_mismatched_completions(labelled_completions(datasets.Dataset.from_dict(rows or labelled_rows()),
                                                            "rows"), config.seed)
    pairs = tokenize_pairs(data, policy.tokenizer, policy.max_positions)
    return KTOTrainer(config, policy, rl_with_kl("reward", config.beta), toy_scorer, PROMPTS, pairs=pairs,
                      labels=list(data["label"]))


@pytest.mark.parametrize(("loss_type", "weights"), [("kto", (1.0, 1.0)), ("kto", (1.4, 0.6)),
                                                    ("apo_zero_unpaired", (1.0, 1.0))])
def test_trainer_gradient_is_the_gradient_of_the_kto_loss(tiny_model_dir, tmp_path, loss_type, weights):
    trainer = kto_trainer(tiny_model_dir, tmp_path / "run", kto_loss=loss_type, desirable_weight=weights[0],
                          undesirable_weight=weights[1])
    trainer.reference_log_probs = trainer.reference_pass()
    model, pairs, index = trainer.model, trainer.pairs, trainer.step_pairs(0)
    with torch.no_grad():  # the reference is the model at its initial weights (a frozen copy)
        ref = torch.tensor([(sequence_log_prob(model, pairs.prompt_ids[i], pairs.chosen_ids[i]),
                             sequence_log_prob(model, pairs.prompt_ids[i], pairs.rejected_ids[i])) for i in index],
                           dtype=torch.float64)
    # one step at the initial weights would give log ratios of 0: move the policy off its reference first
    with torch.no_grad():
        for p in trainer._trainable().values():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    got = step_gradient(trainer)
    # written out: the mismatched completions' mean log-ratio, clamped at 0, is the reference point z0
    mismatched = torch.stack([sequence_log_prob(model, pairs.prompt_ids[i], pairs.rejected_ids[i]) for i in index])
    z0 = (mismatched.detach().double() - ref[:, 1]).mean().clamp(min=0) if loss_type == "kto" else 0.0
    r = torch.stack([sequence_log_prob(model, pairs.prompt_ids[i], pairs.chosen_ids[i]) for i in index]) - ref[:, 0]
    good = torch.tensor([trainer.labels[i] for i in index])
    assert good.any() and not good.all()
    desirable = weights[0] * (1 - torch.sigmoid(BETA * (r - z0)))
    undesirable = weights[1] * (1 - torch.sigmoid(BETA * (z0 - r))) if loss_type == "kto" \
        else weights[1] * torch.sigmoid(BETA * r)
    loss = torch.where(good, desirable, undesirable).mean()
    assert_gradient_of(loss, trainer, got)


def test_pairs_are_unpaired_as_trl_does_and_each_example_gets_anothers_completion():
    data = labelled_completions(datasets.Dataset.from_dict(toy_rows(4)), "pairs")
    assert data["label"] == [True] * 4 + [False] * 4 and data["completion"][:4] == toy_rows(4)["chosen"]
    mismatched = with_mismatched_completions(data, seed=3)
    assert sorted(mismatched["rejected"]) == sorted(data["completion"])  # a cycle: each completion used once
    assert all(a != b for a, b in zip(mismatched["chosen"], mismatched["rejected"]))
    assert mismatched["label"] == data["label"] and mismatched["chosen"] == data["completion"]


@pytest.mark.parametrize(("rows", "message"), [
    ({"prompt": ["a"], "completion": ["b"]}, r"missing column\(s\) \['label'\]"),
    ({"prompt": ["a", "b"], "completion": ["b", "c"], "label": ["yes", "no"]}, r"row 0, column 'label' is 'yes'"),
    ({"prompt": ["a", "b"], "completion": ["b", " "], "label": [True, False]}, r"row 1, column 'completion' is empty"),
    ({"prompt": ["a"], "text": ["b"]}, r"missing column\(s\) \['completion', 'label'\]"),
])
def test_bad_labelled_data_is_refused_naming_the_row_and_column(rows, message):
    with pytest.raises(PreferenceDataError, match=message):
        labelled_completions(datasets.Dataset.from_dict(rows), "f.jsonl")


def test_one_example_is_refused():
    data = labelled_completions(datasets.Dataset.from_dict({"prompt": ["a"], "completion": ["b"], "label": [1]}), "f")
    with pytest.raises(PreferenceDataError, match="at least 2 labelled examples"):
        with_mismatched_completions(data, 0)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(), r"--algo kto learns from labelled completions"),
    (dict(preferences="task", divergence="js"), r"reference point is the batch's KL.*--divergence js"),
    (dict(preferences="task", kto_loss="sigmoid"), r"--kto_loss must be one of kto, apo_zero_unpaired"),
    (dict(preferences="task", preference_loss="ipo"), r"--preference_loss and --label_smoothing are DPO's"),
    (dict(preferences="task", undesirable_weight=0.0), r"--undesirable_weight must be a positive number"),
])
def test_bad_kto_settings_are_refused_with_the_reason(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(algo="kto", output_dir=str(tmp_path), eval_samples=0, **settings)


@pytest.mark.slow
def test_cli_kto_from_a_labelled_file_and_from_task_pairs(tiny_model_dir, tmp_path, capsys):
    rows = labelled_rows()
    path = write_jsonl(tmp_path / "labelled.jsonl", [dict(zip(rows, r)) for r in zip(*rows.values())])
    common = ["train", "--algo", "kto", "--model", str(tiny_model_dir), "--task", "sentiment", "--eval_every", "2",
              "--save_every", "1", "--heldout_fraction", "0.25", *SMALL]
    code, _, err = run_cli([*common, "--preferences", str(path), "--steps", "3", "--output_dir",
                            str(tmp_path / "run")], capsys)
    assert code == 0, err
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for key in ("loss", "kto/reference_point", "rewards/chosen", "rewards/accuracy", "kl_pi_a", "heldout/loss"):
        assert key in metrics[0], key
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert config["labelled_examples"] == 12 and config["desirable"] == 6
    code, _, err = run_cli([*common, "--preferences", str(path), "--steps", "4", "--resume",
                            str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert [m["step"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]
    unlabelled = write_jsonl(tmp_path / "unlabelled.jsonl", [{"prompt": "a", "completion": "b"}] * 2)
    code, _, err = run_cli([*common, "--preferences", str(unlabelled), "--output_dir", str(tmp_path / "x")], capsys)
    assert code == 2 and "missing column(s) ['label']" in err


@pytest.mark.slow
def test_cli_kto_from_pairs_made_from_the_task(tiny_model_dir, tmp_path, capsys, vowels_task):  # noqa: F811
    code, _, err = run_cli(["train", "--algo", "kto", "--preferences", "task", "--model", str(tiny_model_dir),
                            "--task", vowels_task, "--pair_prompts", "6", "--pair_samples", "3", "--steps", "2",
                            "--eval_every", "0", "--heldout_fraction", "0", "--output_dir", str(tmp_path / "run"),
                            *SMALL], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    n_pairs = len(datasets.load_from_disk(str(tmp_path / "run" / "preferences")))
    assert config["labelled_examples"] == 2 * n_pairs and config["desirable"] == n_pairs
