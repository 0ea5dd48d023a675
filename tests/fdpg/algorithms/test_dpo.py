r"""DPO on the shared engine: its gradient, its run directory, resume, and bad input.

1. The gradient the real :class:`fdpg.algorithms.dpo.DPOTrainer` applies equals
   autograd of the mean f-DPO loss computed here
   independently (each pair's full sequence through the model alone, no padding, the reference at the initial
   weights), for DPO and f-DPO (JS), several micro-batches.
2. A short run on the tiny model learns its pairs (training accuracy and margins rise), logs f-DPG's shared metric
   names at its evaluation steps, held-out loss and accuracy, and runs no reference pass after the first one.
3. Interrupted and resumed, it reproduces the uninterrupted run; the reference log-probs are read back, not redone.
4. Pairs from a task: the best against the worst of k samples, ties dropped, saved as a reusable dataset.
5. Bad input fails before any training, naming the row and the column.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from fdpg_testing import PROMPTS, assert_same_metrics, read_jsonl, run_cli, toy_scorer

from fdpg.config import TrainConfig
from fdpg.preferences import (
    PreferenceDataError,
    check_preferences,
    load_preferences,
    pairs_from_task,
    tokenize_pairs,
)
from objectives import get_divergence, rl_with_kl
from objectives.preference import preference_loss

CHOSEN = ["aeiou aeiou", "a e i o u", "aaaa eeee", "oui oui", "ea ea ea", "iou aei"]
REJECTED = ["xyz xyz", "zzz kkk", "qrst", "bcd fgh", "pp qq rr", "nm nm nm"]


def toy_rows(n: int = 12) -> dict[str, list[str]]:
    return {"prompt": [PROMPTS[i % len(PROMPTS)] for i in range(n)],
            "chosen": [CHOSEN[i % len(CHOSEN)] + " " + str(i) for i in range(n)],
            "rejected": [REJECTED[i % len(REJECTED)] + " " + str(i) for i in range(n)]}


def dpo_config(model_dir, output_dir, **overrides) -> TrainConfig:
    settings = dict(algo="dpo", preferences="unused", model=str(model_dir), task="toy", beta=0.5, steps=4,
                    batch_size=4, samples_per_prompt=2, generation_batch_size=4, micro_batch_size=2,
                    max_new_tokens=6, learning_rate=1e-2, seed=0, output_dir=str(output_dir), save_every=10,
                    progress=False, eval_samples=0, eval_every=2, exact_kl_every=0, heldout_fraction=0.25)
    settings.update(overrides)
    return TrainConfig(**settings)


def dpo_trainer(model_dir, output_dir, rows=None, **overrides):
    import datasets

    from fdpg.algorithms.dpo import DPOTrainer
    from fdpg.policy import LoraSettings, Policy

    config = dpo_config(model_dir, output_dir, **overrides)
    torch.manual_seed(config.seed)
    lora = LoraSettings(config.lora_r, config.lora_alpha, 0.0, "all-linear") if config.lora_r else None
    policy = Policy.from_pretrained(config.model, lora=lora)
    data = datasets.Dataset.from_dict(rows or toy_rows())
    pairs = tokenize_pairs(data, policy.tokenizer, policy.max_positions)
    return DPOTrainer(config, policy, rl_with_kl("reward", config.beta), toy_scorer, PROMPTS, pairs=pairs)


def sequence_log_prob(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """log pi(response | prompt) from one unpadded forward pass (the independent route)."""
    ids = torch.tensor([prompt_ids + response_ids])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response_ids)[:, None]).sum()


def step_gradient(trainer, step: int = 0) -> torch.Tensor:
    """The flat gradient of the trainer's step ``step``, caught before the optimizer uses it (nothing moves)."""
    params = dict(trainer._trainable())
    caught = {}

    def catch() -> None:
        caught.update({k: p.grad.detach().clone() for k, p in params.items()})
        trainer.optimizer.zero_grad(set_to_none=True)

    trainer.optimizer_step = catch
    trainer.train_step(step)
    return torch.cat([caught[k].flatten() for k in params])


def assert_gradient_of(loss: torch.Tensor, trainer, got: torch.Tensor) -> None:
    """``got`` is the gradient of ``loss`` with respect to the trainer's trainable parameters (and not zero)."""
    params = dict(trainer._trainable())
    want = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    want = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(want, params.values())])
    assert want.norm() > 0
    torch.testing.assert_close(got.double(), want.double(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(("divergence", "checkpointing"), [
    pytest.param("rkl", 0, id="rkl"),  # the fast suite's check of the trainer's gradient
    pytest.param("js", 0, id="js", marks=pytest.mark.slow),
    pytest.param("rkl", 1, id="rkl-activation-checkpointing", marks=pytest.mark.slow)])
def test_trainer_gradient_is_the_gradient_of_the_f_dpo_loss(tiny_model_dir, tmp_path, divergence, checkpointing):
    trainer = dpo_trainer(tiny_model_dir, tmp_path / "run", divergence=divergence, micro_batch_size=3,
                          batch_size=6, heldout_fraction=0.0, eval_every=0, activation_checkpointing=checkpointing)
    trainer.reference_log_probs = trainer.reference_pass()
    model = trainer.model
    params = dict(trainer._trainable())
    initial = {k: p.detach().clone() for k, p in params.items()}
    # independent: the reference is the model at its initial weights (full fine-tuning: a frozen copy)
    pairs, index = trainer.pairs, trainer.step_pairs(0)
    with torch.no_grad():
        ref = [(sequence_log_prob(model, pairs.prompt_ids[i], pairs.chosen_ids[i]),
                sequence_log_prob(model, pairs.prompt_ids[i], pairs.rejected_ids[i])) for i in index]
    torch.testing.assert_close(trainer.reference_log_probs[index], torch.tensor(ref, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    got = step_gradient(trainer)
    for k, p in params.items():  # nothing moved
        assert torch.equal(p.detach(), initial[k])
    lw = torch.stack([sequence_log_prob(model, pairs.prompt_ids[i], pairs.chosen_ids[i]) for i in index])
    ll = torch.stack([sequence_log_prob(model, pairs.prompt_ids[i], pairs.rejected_ids[i]) for i in index])
    ref_t = torch.tensor(ref, dtype=torch.float64)
    loss = preference_loss(lw - ref_t[:, 0], ll - ref_t[:, 1], get_divergence(divergence), 0.5).mean()
    assert_gradient_of(loss, trainer, got)


@pytest.mark.slow
def test_a_short_run_learns_its_pairs_and_logs_shared_metrics(tiny_model_dir, tmp_path):
    trainer = dpo_trainer(tiny_model_dir, tmp_path / "run", steps=8)
    calls = []
    original = trainer.policy.reference

    def counted(*args, **kwargs):
        calls.append(trainer.step)
        return original(*args, **kwargs)

    trainer.policy.reference = counted
    summary = trainer.train()
    assert summary["status"] == "finished"
    run = trainer.run_dir
    assert (run / "reference_log_probs.safetensors").is_file()
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    first, last = rows[0], rows[-1]
    assert last["rewards/accuracy"] == 1.0 and first["rewards/margins"] < last["rewards/margins"]
    assert last["loss"] < first["loss"]
    evaluated = [r["step"] for r in rows if "kl_pi_a" in r]
    assert evaluated == [1, 3, 5, 7, 8]  # every eval_every=2 steps from the first, and the last
    for r in rows:
        if "kl_pi_a" in r:
            for key in ("score/reward", "kl_pi_a", "entropy", "distinct_2", "heldout/loss", "heldout/accuracy"):
                assert key in r, key
    # reference passes: the pairs' (before step 0) and those of the evaluations' samples only
    assert len([s for s in calls if s == 0]) >= 1
    training_refs = len(calls) - len([s for s in calls if s == 0])
    assert training_refs == len(evaluated) - 1  # one reference pass per evaluation after the first
    samples = read_jsonl(run / "samples.jsonl")
    assert sorted({s["step"] for s in samples}) == evaluated
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["algo"] == "dpo"


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path):
    full = dpo_trainer(tiny_model_dir, tmp_path / "full", steps=6, save_every=3)
    full.train()
    part = dpo_trainer(tiny_model_dir, tmp_path / "part", steps=3, save_every=3)
    part.train()
    reference_file = part.run_dir / "reference_log_probs.safetensors"
    stamp = reference_file.stat().st_mtime_ns
    resumed = dpo_trainer(tiny_model_dir, tmp_path / "ignored", steps=6, save_every=3, resume=str(part.run_dir))
    resumed.reference_pass = lambda: pytest.fail("the reference log-probs are recomputed on resume")
    resumed.train()
    assert reference_file.stat().st_mtime_ns == stamp
    want, got = read_jsonl(full.run_dir / "metrics.jsonl"), read_jsonl(part.run_dir / "metrics.jsonl")
    assert len(got) == 6
    for a, b in zip(got, want):
        assert_same_metrics({k: v for k, v in a.items() if not k.startswith(("time/", "tokens_per_s"))},
                            {k: v for k, v in b.items() if not k.startswith(("time/", "tokens_per_s"))})


def test_pairs_from_a_task_are_best_against_worst_without_ties(tiny_model_dir, tmp_path):
    from fdpg.policy import Policy
    from tasks import TaskSpec

    policy = Policy.from_pretrained(str(tiny_model_dir))
    spec = TaskSpec(prompts=PROMPTS, scorer=toy_scorer, target=rl_with_kl("reward", 0.5), metrics=None)
    data = pairs_from_task(policy, spec, "reward", n_prompts=4, k=4, max_new_tokens=6, seed=0, progress=False)
    assert 1 <= len(data) <= 4
    for row in data:
        assert row["chosen_score"] > row["rejected_score"]
        assert row["chosen"] != row["rejected"]
        assert toy_scorer([row["chosen"]], [""])["reward"][0] == pytest.approx(row["chosen_score"])
    check_preferences(data)
    data.save_to_disk(str(tmp_path / "pairs"))
    reloaded = load_preferences(str(tmp_path / "pairs"))
    assert reloaded["chosen_token_ids"] == data["chosen_token_ids"]
    pairs = tokenize_pairs(reloaded, policy.tokenizer, None)
    assert pairs.chosen_ids == [list(r) for r in data["chosen_token_ids"]]  # the sampled ids, not re-tokenised
    flat = TaskSpec(prompts=PROMPTS, scorer=lambda c, p: {"reward": [0.5] * len(c)},
                    target=rl_with_kl("reward", 0.5), metrics=None)
    with pytest.raises(ValueError, match="tied"):
        pairs_from_task(policy, flat, "reward", n_prompts=2, k=3, max_new_tokens=4, seed=0, progress=False)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_preference_data_is_refused_naming_the_row_and_column(tmp_path, tiny_tokenizer):
    good = {"prompt": "p", "chosen": "aa", "rejected": "bb"}
    with pytest.raises(PreferenceDataError, match=r"missing column\(s\) \['rejected'\].*found are \['prompt', 'ch"):
        load_preferences(str(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "chosen": "x"}])))
    with pytest.raises(PreferenceDataError, match=r"row 1, column 'chosen' is empty"):
        load_preferences(str(write_jsonl(tmp_path / "b.jsonl", [good, {**good, "chosen": "  "}])))
    with pytest.raises(PreferenceDataError, match=r"row 0: 'chosen' and 'rejected' are the same"):
        load_preferences(str(write_jsonl(tmp_path / "c.jsonl", [{**good, "rejected": "aa"}])))
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "chosen": \n')
    with pytest.raises(PreferenceDataError, match="could not be read"):
        load_preferences(str(tmp_path / "d.jsonl"))
    (tmp_path / "e.txt").write_text("x")
    with pytest.raises(PreferenceDataError, match="unknown file type"):
        load_preferences(str(tmp_path / "e.txt"))
    csv = tmp_path / "f.csv"
    csv.write_text("prompt,chosen,rejected\nhi,aa,bb\n")
    assert len(load_preferences(str(csv))) == 1
    data = load_preferences(str(write_jsonl(tmp_path / "g.jsonl", [good, {**good, "chosen": "a" * 200}])))
    with pytest.raises(PreferenceDataError, match=r"row 1, column 'chosen'.*exceed the 50-token limit.*--truncate"):
        tokenize_pairs(data, tiny_tokenizer, 50)
    cut = tokenize_pairs(data, tiny_tokenizer, 50, truncate=True)
    assert cut.truncated == 1 and len(cut.prompt_ids[1]) + len(cut.chosen_ids[1]) == 50
    assert cut.chosen_ids[0][-1] == tiny_tokenizer.eos_token_id  # a text response ends with EOS


def test_chat_rows_go_through_the_chat_template(tiny_tokenizer):
    import copy

    import datasets

    tok = copy.deepcopy(tiny_tokenizer)
    rows = {"prompt": [[{"role": "user", "content": "hi"}]],
            "chosen": [[{"role": "assistant", "content": "aa"}]],
            "rejected": [[{"role": "assistant", "content": "bb"}]]}
    data = datasets.Dataset.from_dict(rows)
    with pytest.raises(PreferenceDataError, match="chat template"):
        tokenize_pairs(data, tok, None)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    pairs = tokenize_pairs(data, tok, None)
    assert pairs.prompts == ["<user>hi\n<assistant>"] and pairs.chosen == ["aa\n"] and pairs.rejected == ["bb\n"]


def test_bad_settings_fail_before_any_model_is_loaded(tmp_path):
    base = dict(algo="dpo", output_dir=str(tmp_path), eval_samples=0)
    with pytest.raises(ValueError, match="--preferences"):
        TrainConfig(**base)
    with pytest.raises(ValueError, match="f-DPO is not defined.*strictly increasing"):
        TrainConfig(**base, preferences="task", divergence="tv")
    with pytest.raises(ValueError, match="--preference_loss must be one of"):
        TrainConfig(**base, preferences="task", preference_loss="kto")
    with pytest.raises(ValueError, match="--pair_samples must be an integer >= 2"):
        TrainConfig(**base, preferences="task", pair_samples=1)
    with pytest.raises(ValueError, match="--algo must be one of fdpg, ppo, grpo, dpo, kto"):
        TrainConfig(algo="orpo")


SMALL = ["--batch_size", "4", "--samples_per_prompt", "2", "--max_new_tokens", "6", "--micro_batch_size", "4",
         "--progress", "false", "--eval_samples", "0", "--exact_kl_every", "0"]


@pytest.fixture
def vowels_task():
    """A task whose reward (the vowel fraction) varies over the tiny model's random text, registered for the test."""
    import tasks
    from tasks import Task, TaskSpec, register_task

    class VowelsTask(Task):
        name = "vowels-test"
        description = "P = a exp(r / beta), r = fraction of vowels (tests only)"

        def build(self, beta, options, prompts=None):
            return TaskSpec(prompts=list(prompts or PROMPTS), scorer=toy_scorer, target=rl_with_kl("reward", beta),
                            metrics=lambda features: {"score/reward": float(features["reward"].mean())})

    register_task(VowelsTask)
    yield VowelsTask.name
    tasks._TASKS.pop(VowelsTask.name)


@pytest.mark.slow
def test_cli_dpo_from_task_pairs_with_lora_and_epochs(tiny_model_dir, tmp_path, capsys, vowels_task):
    code, out, err = run_cli(["train", "--algo", "dpo", "--preferences", "task", "--model", str(tiny_model_dir),
                              "--task", vowels_task, "--divergence", "js", "--lora_r", "4", "--pair_prompts", "10",
                              "--pair_samples", "3", "--epochs", "1", "--heldout_fraction", "0.2",
                              "--eval_every", "1", "--output_dir", str(tmp_path / "run"), *SMALL], capsys)
    assert code == 0, err
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())["config"]
    n_pairs = config["preference_pairs"]
    assert "pairs" in err and 1 <= n_pairs <= 10
    n_train = n_pairs - max(1, round(0.2 * n_pairs)) if n_pairs > 1 else n_pairs
    assert config["steps"] == -(-n_train // 4)  # --epochs 1 -> ceil(n_train / batch) steps
    assert (run / "preferences").is_dir() and len(load_preferences(str(run / "preferences"))) == n_pairs
    rows = read_jsonl(run / "metrics.jsonl")
    assert all("score/reward" in r and "kl_pi_a" in r and "rewards/accuracy" in r for r in rows)


@pytest.mark.slow
def test_cli_dpo_from_a_file_resumes_with_the_same_pairs(tiny_model_dir, tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [dict(zip(toy_rows(), r)) for r in zip(*toy_rows().values())])
    common = ["train", "--algo", "dpo", "--preferences", str(pairs), "--model", str(tiny_model_dir), "--task",
              "sentiment", "--eval_every", "0", "--save_every", "1", *SMALL]
    code, _, err = run_cli([*common, "--steps", "2", "--output_dir", str(tmp_path / "run")], capsys)
    assert code == 0, err
    code, _, err = run_cli([*common, "--steps", "3", "--resume", str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    code, _, err = run_cli([*common, "--steps", "1", "--preferences", str(tmp_path / "missing.jsonl"),
                            "--output_dir", str(tmp_path / "other")], capsys)
    assert code == 2 and "missing.jsonl" in err


@pytest.mark.slow
@pytest.mark.slow
def test_bf16_training_follows_the_fp32_run(tiny_model_dir, tmp_path):
    """--mixed_precision bf16 with LoRA (reference pass with weights cast once, training under autocast, fp32
    adapter and optimizer): the first steps' losses within 5e-3 of the fp32 run's, all within 5e-2, and the run
    learns the pairs as the fp32 one does."""
    losses = {}
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state()  # a second Accelerator, with other settings, in this process
        trainer = dpo_trainer(tiny_model_dir, tmp_path / precision, steps=8, eval_every=0, heldout_fraction=0.0,
                              mixed_precision=precision, lora_r=4, learning_rate=3e-2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bf16 on a CPU without native bf16
            assert trainer.train()["status"] == "finished"
        losses[precision] = [r["loss"] for r in read_jsonl(trainer.run_dir / "metrics.jsonl")]
        assert all(p.dtype == torch.float32 for p in trainer._trainable().values())
    gaps = [abs(b - f) for b, f in zip(losses["bf16"], losses["no"])]
    # measured: 0, 1e-5, 1.5e-3, 1.2e-3, then up to 2.7e-2 as eight updates at lr 3e-2 compound the rounding
    assert max(gaps[:4]) < 5e-3 and max(gaps) < 5e-2, (losses, gaps)
    assert losses["bf16"][-1] < losses["bf16"][0] - 0.1


@pytest.mark.parametrize("loss", ["simpo", "cpo", "orpo"])
def test_reference_free_losses_make_no_reference_pass_and_their_gradient_is_the_formula(tiny_model_dir, tmp_path,
                                                                                        monkeypatch, loss):
    """SimPO / CPO / ORPO through the DPO trainer: ``prepare_run`` runs no reference pass, and the step's gradient
    (three micro-batches of unequal token counts) is the gradient of the papers' batch loss written out here from
    unpadded forwards: the pair term's mean plus, for CPO and ORPO, the NLL per chosen token of the whole batch."""
    import torch.nn.functional as F

    trainer = dpo_trainer(tiny_model_dir, tmp_path / "run", preference_loss=loss, micro_batch_size=2, batch_size=6,
                          heldout_fraction=0.0, eval_every=0, nll_coef=0.7)
    monkeypatch.setattr(trainer, "reference_pass", lambda: pytest.fail("a reference-free loss ran a reference pass"))
    trainer.prepare_run()
    assert trainer.reference_log_probs is None
    got = step_gradient(trainer)
    pairs, index, beta, model = trainer.pairs, trainer.step_pairs(0), 0.5, trainer.model
    lw = torch.stack([sequence_log_prob(model, pairs.prompt_ids[i], pairs.chosen_ids[i]) for i in index])
    ll = torch.stack([sequence_log_prob(model, pairs.prompt_ids[i], pairs.rejected_ids[i]) for i in index])
    nw = torch.tensor([len(pairs.chosen_ids[i]) for i in index], dtype=torch.float64)
    nl = torch.tensor([len(pairs.rejected_ids[i]) for i in index], dtype=torch.float64)
    assert len(set(nw.tolist())) > 1  # unequal lengths: a per-micro-batch token mean would differ
    nll = -lw.sum() / nw.sum()
    if loss == "simpo":  # Meng et al. 2024, Eq. 6, gamma 0.5
        batch_loss = -F.logsigmoid(beta * (lw / nw - ll / nl) - 0.5).mean()
    elif loss == "cpo":  # Xu et al. 2024: the DPO form without a reference, + alpha NLL
        batch_loss = -F.logsigmoid(beta * (lw - ll)).mean() + 0.7 * nll
    else:  # Hong et al. 2024: NLL + lambda * -log sigmoid(log odds ratio), odds from the mean token log-prob
        pw, pl = torch.exp(lw / nw), torch.exp(ll / nl)
        log_odds = torch.log(pw / (1 - pw)) - torch.log(pl / (1 - pl))
        batch_loss = nll - beta * F.logsigmoid(log_odds).mean()
    assert_gradient_of(batch_loss, trainer, got)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(preference_loss="simpo", divergence="js"), r"simpo is reference-free.*no --divergence js form"),
    (dict(preference_loss="orpo", label_smoothing=0.1), r"--label_smoothing is not part of ORPO"),
    (dict(preference_loss="nca_pair", divergence="fkl"), r"nca_pair reads the log-ratios.*no --divergence fkl form"),
    (dict(preference_loss="exo_pair"), r"exo_pair is the KL to the label"),
    (dict(preference_loss="discopop", discopop_tau=0.0), r"--discopop_tau must be positive"),
    (dict(preference_loss="rdpo", length_alpha=-1.0), r"--length_alpha must be a finite number >= 0"),
])
def test_bad_settings_of_the_new_losses_are_refused(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        dpo_config("unused-model", tmp_path, **settings)


def test_hh_and_ultrafeedback_shaped_files_take_the_shared_prefix_as_the_prompt(tmp_path, tiny_tokenizer):
    """Issue 35's two public shapes, 8-row files: HH (full dialogues ``chosen``/``rejected`` sharing the prompt, no
    ``prompt`` column) and UltraFeedback binarized (a text ``prompt``, message lists that repeat the user turn). The
    prompt is the responses' shared prefix, as TRL's extract_prompt takes it."""
    import copy

    from fdpg.preferences import load_preferences

    hh = tmp_path / "hh.jsonl"
    hh.write_text("".join(json.dumps({
        "chosen": f"\n\nHuman: question {i}?\n\nAssistant: a good answer {i}",
        "rejected": f"\n\nHuman: question {i}?\n\nAssistant: bad {i}"}) + "\n" for i in range(8)))
    data = load_preferences(str(hh))
    assert data[3] == {"prompt": "\n\nHuman: question 3?\n\nAssistant:", "chosen": " a good answer 3",
                       "rejected": " bad 3"}
    uf = tmp_path / "uf.jsonl"
    uf.write_text("".join(json.dumps({
        "prompt": f"say {i}",
        "chosen": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i} it is"}],
        "rejected": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": "no"}],
        "score_chosen": 8.0, "score_rejected": 2.0}) + "\n" for i in range(8)))
    data = load_preferences(str(uf))
    assert data[5]["prompt"] == [{"role": "user", "content": "say 5"}]
    assert data[5]["chosen"] == [{"role": "assistant", "content": "5 it is"}]
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    pairs = tokenize_pairs(data, tok, None)
    assert pairs.prompts[5] == "<user>say 5\n<assistant>" and pairs.chosen[5] == "5 it is\n"
    assert pairs.rejected[5] == "no\n"


def test_a_weighted_combination_with_sft_is_the_weighted_sum_of_its_terms(tiny_model_dir, tmp_path):
    """``--preference_loss sigmoid,sft --preference_loss_weights 0.8,0.2`` (MPO's form): the step's gradient, through
    micro-batches of unequal token counts, is that of 0.8 x DPO's mean + 0.2 x the NLL per chosen token of the batch."""
    import torch.nn.functional as F

    trainer = dpo_trainer(tiny_model_dir, tmp_path / "run", preference_loss="sigmoid,sft",
                          preference_loss_weights="0.8,0.2", micro_batch_size=2, batch_size=6, heldout_fraction=0.0,
                          eval_every=0)
    trainer.reference_log_probs = trainer.reference_pass()
    got = step_gradient(trainer)
    pairs, index, model = trainer.pairs, trainer.step_pairs(0), trainer.model
    lw = torch.stack([sequence_log_prob(model, pairs.prompt_ids[i], pairs.chosen_ids[i]) for i in index])
    ll = torch.stack([sequence_log_prob(model, pairs.prompt_ids[i], pairs.rejected_ids[i]) for i in index])
    ref = trainer.reference_log_probs[index]
    n_w = sum(len(pairs.chosen_ids[i]) for i in index)
    loss = 0.8 * -F.logsigmoid(0.5 * ((lw - ref[:, 0]) - (ll - ref[:, 1]))).mean() + 0.2 * (-lw.sum() / n_w)
    assert_gradient_of(loss, trainer, got)
    with pytest.raises(ValueError, match="one finite weight >= 0 per loss"):
        dpo_config("m", tmp_path, preference_loss="sigmoid,sft", preference_loss_weights="1")
    with pytest.raises(ValueError, match="sft alone is supervised fine-tuning"):
        dpo_config("m", tmp_path, preference_loss="sft")
    with pytest.raises(ValueError, match="reference-free loss .* is not combined"):
        dpo_config("m", tmp_path, preference_loss="simpo,sft")


@pytest.mark.parametrize("loss", ["aot", "aot_unpaired"])
def test_a_loss_sorted_over_the_batch_gets_its_exact_gradient_through_micro_batches(tiny_model_dir, tmp_path, loss):
    """AOT sorts over the whole batch: the trainer's two passes (no-grad log-ratios, dL/drho, then each
    micro-batch's rho weighted by it) give the gradient of the batch loss computed in one piece here."""
    from objectives.preference import batch_preference_loss

    trainer = dpo_trainer(tiny_model_dir, tmp_path / "run", preference_loss=loss, micro_batch_size=2, batch_size=6,
                          heldout_fraction=0.0, eval_every=0, label_smoothing=0.1)
    trainer.reference_log_probs = trainer.reference_pass()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the policy away from the reference: log-ratios of both signs, a sort that matters
        for p in trainer._trainable().values():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    got = step_gradient(trainer)
    pairs, index, model = trainer.pairs, trainer.step_pairs(0), trainer.model
    lw = torch.stack([sequence_log_prob(model, pairs.prompt_ids[i], pairs.chosen_ids[i]) for i in index])
    ll = torch.stack([sequence_log_prob(model, pairs.prompt_ids[i], pairs.rejected_ids[i]) for i in index])
    ref = trainer.reference_log_probs[index]
    batch_loss = batch_preference_loss(loss, lw - ref[:, 0], ll - ref[:, 1], 0.5, 0.1, ref[:, 0], ref[:, 1]).mean()
    assert_gradient_of(batch_loss, trainer, got)
