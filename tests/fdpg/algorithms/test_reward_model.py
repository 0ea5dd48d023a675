r"""Reward-model training (:mod:`fdpg.algorithms.reward_model`, :mod:`fdpg.rankings`)
on a tiny random BERT-like encoder.

1. A short run on synthetic rankings (the better response holds more ``z``) raises the held-out pairwise accuracy
   well above its untrained value and chance, logs the documented metrics, and leaves a loadable ``final/``.
2. A ranking of K responses is K rows through the model (counted), and the gradient of the step equals autograd of
   the loss written out pair by pair (every K(K-1)/2 pair, each response on its own, no padding).
3. Bounded rewards lie in [0, 1]; a prompt-aware utility applies each pair's own U (two pairs, two utilities, one
   batch, against the closed forms); margins and reward centring change the loss as the formula says.
4. Interrupted by a signal and resumed (LoRA), a run reproduces the uninterrupted one; the merged final model gives
   the adapter's rewards.
5. Bad input fails before any training (before the model is loaded), with the reason.
6. The CLI: train, resume with only --resume, eval (text and JSON, held-out subset).
"""

from __future__ import annotations

import json
import math
import random
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fdpg.algorithms.reward_model import RewardModel, RewardModelConfig, RewardModelTrainer
from fdpg.commands.reward_model import cmd_reward_model
from fdpg.rankings import RankingDataError, load_rankings, rankings_from_rows

LETTERS = "abcdefgh"


@pytest.fixture(scope="module")
def bert_dir(tiny_bert_dir: Path) -> Path:
    return tiny_bert_dir


def z_rankings(n: int, seed: int = 0, sizes=(2, 3, 4)) -> list[dict]:
    """Rankings whose better responses hold more ``z`` (placed at random in a random 6-letter text)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.choice(sizes)
        responses = []
        for j in range(k):
            text = [rng.choice(LETTERS) for _ in range(6)]
            for _ in range(k - 1 - j):
                text.insert(rng.randrange(len(text) + 1), "z")
            responses.append("".join(text))
        rows.append({"prompt": "".join(rng.choice(LETTERS) for _ in range(3)) + str(i), "responses": responses})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def make_config(bert_dir: Path, output_dir: Path, **overrides) -> RewardModelConfig:
    settings = dict(data="unused", model=str(bert_dir), steps=4, batch_size=4, micro_batch_size=2,
                    learning_rate=3e-3, eval_every=2, heldout_fraction=0.25, output_dir=str(output_dir),
                    progress=False, save_every=10, max_grad_norm=None)
    settings.update(overrides)
    return RewardModelConfig(**settings)


def make_trainer(bert_dir: Path, output_dir: Path, rows: list[dict], margin_column=None, utility_column=None,
                 **overrides) -> RewardModelTrainer:
    config = make_config(bert_dir, output_dir, margin_column=margin_column, utility_column=utility_column,
                         **overrides)
    return RewardModelTrainer(config, rankings_from_rows(rows, margin_column=margin_column,
                                                         context_column=utility_column))


def without_timings(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time/") and k != "tokens_per_s"}


def step_with_gradient(trainer: RewardModelTrainer, step: int = 0):
    """``(metrics, gradient by name, initial weights by name)`` of ``trainer.train_step(step)``; the weights are put
    back to their initial values afterwards."""
    params = trainer._trainable()
    initial = {k: p.detach().clone() for k, p in params.items()}
    caught = {}
    original = trainer.optimizer_step

    def capture():
        caught.update({k: p.grad.detach().clone() for k, p in params.items() if p.grad is not None})
        return original()

    trainer.optimizer_step = capture
    metrics = trainer.train_step(step)
    trainer.optimizer_step = original
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(initial[k])
    return metrics, caught


def assert_gradient_of(trainer: RewardModelTrainer, caught: dict, loss: torch.Tensor) -> None:
    """The captured gradient equals autograd of ``loss`` (built on the initial weights)."""
    params = trainer._trainable()
    want = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    got = torch.cat([caught[k].flatten() for k in params])
    want = torch.cat([(w if w is not None else torch.zeros_like(p)).flatten() for w, p in zip(want, params.values())])
    assert want.norm() > 0
    torch.testing.assert_close(got.double(), want.double(), atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- 1. learning
@pytest.mark.slow
def test_training_raises_heldout_accuracy_and_leaves_a_loadable_model(bert_dir, tmp_path):
    trainer = make_trainer(bert_dir, tmp_path / "run", z_rankings(80), steps=40, batch_size=8, micro_batch_size=4,
                           eval_every=10, heldout_fraction=0.25)
    before = trainer.heldout_metrics()["heldout/accuracy"]
    summary = trainer.train()
    assert summary["status"] == "finished"
    rows = read_jsonl(trainer.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 41))
    for key in ("loss", "ranking_loss", "accuracy", "reward/mean", "reward/std", "reward/diff", "pairs", "lr",
                "grad_norm", "epoch", "time/backward"):
        assert key in rows[0], key
    assert [r["step"] for r in rows if "heldout/accuracy" in r] == [1, 10, 20, 30, 40]
    after = rows[-1]["heldout/accuracy"]
    print(f"held-out accuracy: untrained {before:.3f} -> trained {after:.3f}")
    assert after >= 0.85 and after > before + 0.2
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert summary["heldout/accuracy"] == after
    # final/: a standalone model that gives the trainer's rewards, and what it was trained with
    final = trainer.run_dir / "final"
    info = json.loads((final / "reward_model.json").read_text())
    assert info["bounded"] is False and info["utility"] == "log_sigmoid:1"
    loaded = RewardModel.load(trainer.run_dir)
    groups = trainer.heldout_index[:3]
    prompts = [trainer.rankings.prompts[g] for g in groups for _ in trainer.rankings.responses[g]]
    texts = [r for g in groups for r in trainer.rankings.responses[g]]
    with torch.no_grad():
        torch.testing.assert_close(loaded(prompts, texts), trainer.rewards(groups), atol=1e-5, rtol=1e-5)
    config = json.loads((trainer.run_dir / "config.json").read_text())["config"]
    assert config["kind"] == "reward_model" and config["data_kind"] == "rankings"


# ---------------------------------------------------------------------------------------------- 2. rankings
@pytest.mark.slow
def test_a_ranking_is_k_forward_rows_and_the_gradient_is_that_of_every_pair(bert_dir, tmp_path):
    rows = z_rankings(12, seed=3, sizes=(3, 4, 5))
    trainer = make_trainer(bert_dir, tmp_path / "run", rows, batch_size=4, micro_batch_size=2, heldout_fraction=0)
    model = trainer._unwrapped()
    forwarded: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: forwarded.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    index = trainer.step_rankings(0)
    metrics, caught = step_with_gradient(trainer)
    hook.remove()
    sizes = [len(trainer.rankings.responses[g]) for g in index]
    assert forwarded == [sum(sizes[:2]), sum(sizes[2:])]  # two micro-batches of 2 rankings, K rows per ranking
    assert metrics["pairs"] == sum(k * (k - 1) // 2 for k in sizes)

    # the same loss written out pair by pair, every response through the model alone, at the initial weights
    tokenizer = trainer.tokenizer

    def reward(prompt: str, response: str) -> torch.Tensor:
        enc = tokenizer(prompt, response, return_tensors="pt")
        return model(**enc).logits[0, 0].double()

    terms = []
    for g in index:
        prompt, ranked = trainer.rankings.prompts[g], trainer.rankings.responses[g]
        for i in range(len(ranked)):
            for j in range(i + 1, len(ranked)):
                terms.append(F.logsigmoid(reward(prompt, ranked[i]) - reward(prompt, ranked[j])))
    assert len(terms) == metrics["pairs"]
    loss = -torch.stack(terms).mean()
    assert math.isclose(float(loss.detach()), metrics["loss"], rel_tol=1e-5)
    assert_gradient_of(trainer, caught, loss)


# ---------------------------------------------------------------------------------------------- 3. the loss
def test_bounded_rewards_lie_in_the_unit_interval(bert_dir, tmp_path):
    trainer = make_trainer(bert_dir, tmp_path / "run", z_rankings(24), bounded=True, utility="neg_power:1",
                           steps=3, learning_rate=1e-2)
    trainer.train()
    rows = read_jsonl(trainer.run_dir / "metrics.jsonl")
    assert all(0 <= r["reward/mean"] <= 1 for r in rows)
    loaded = RewardModel.load(trainer.run_dir / "final")
    assert loaded.bounded
    texts = [r for ranked in trainer.rankings.responses for r in ranked]
    prompts = [p for p, ranked in zip(trainer.rankings.prompts, trainer.rankings.responses) for _ in ranked]
    rewards = loaded(prompts, texts)
    assert rewards.min() >= 0 and rewards.max() <= 1 and rewards.std() > 0
    logits = loaded.model(**loaded.tokenizer(prompts[:1], texts[:1], return_tensors="pt")).logits[0, 0]
    assert math.isclose(float(torch.sigmoid(logits)), float(rewards[0]), rel_tol=1e-5)


def test_a_prompt_aware_utility_applies_each_pairs_own_utility(bert_dir, tmp_path):
    rows = [{"prompt": "ab", "chosen": "cde", "rejected": "fgh", "kind": "open"},
            {"prompt": "ba", "chosen": "hgf", "rejected": "edc", "kind": "closed"}]
    eps = 0.01
    trainer = make_trainer(bert_dir, tmp_path / "run", rows, utility_column="kind",
                           utilities="open=neg_power:1,closed=linear", bounded=True, utility_eps=eps,
                           batch_size=2, heldout_fraction=0)
    with torch.no_grad():
        rewards, diff, sum_u = trainer.micro_batch([0, 1])
    d_open, d_closed = float(diff[0]), float(diff[1])

    def neg_inverse(d: float) -> float:  # -1/x above eps, its tangent line below
        return -1 / d if d > eps else -1 / eps + (d - eps) / eps**2

    assert math.isclose(float(sum_u), neg_inverse(d_open) + d_closed, rel_tol=1e-9)
    # swapping the kinds swaps the utilities
    swapped = make_trainer(bert_dir, tmp_path / "swapped", [{**rows[0], "kind": "closed"}, {**rows[1], "kind": "open"}],
                           utility_column="kind", utilities="open=neg_power:1,closed=linear", bounded=True,
                           utility_eps=eps, batch_size=2, heldout_fraction=0)
    with torch.no_grad():
        _, diff2, sum_u2 = swapped.micro_batch([0, 1])
    torch.testing.assert_close(diff2, diff)
    assert math.isclose(float(sum_u2), d_open + neg_inverse(d_closed), rel_tol=1e-9)


def test_margin_and_centring_change_the_loss_as_the_formula_says(bert_dir, tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "z" + "abc"[i % 3] * 3, "rejected": "def"[i % 3] * 4, "m": 0.5 * i}
            for i in range(4)]
    coefficient = 0.3
    trainer = make_trainer(bert_dir, tmp_path / "run", rows, margin_column="m",
                           center_rewards_coefficient=coefficient, heldout_fraction=0)
    index = trainer.step_rankings(0)
    metrics, caught = step_with_gradient(trainer)
    rewards = trainer.rewards(index)  # at the initial weights, with a graph
    r_w, r_l = rewards[0::2], rewards[1::2]
    m = torch.tensor([rows[g]["m"] for g in index], dtype=torch.float64)
    ranking = -F.logsigmoid(r_w - r_l - m).mean()
    centring = coefficient * rewards.pow(2).mean()
    assert math.isclose(metrics["ranking_loss"], float(ranking), rel_tol=1e-6)
    assert math.isclose(metrics["loss"], float(ranking + centring), rel_tol=1e-6)
    assert not math.isclose(float(ranking), float(-F.logsigmoid(r_w - r_l).mean()), rel_tol=1e-3)  # margins matter
    assert_gradient_of(trainer, caught, ranking + centring)  # both terms are in the gradient

    # a ranking's margin scores: pair (i, j) gets s_i - s_j
    ranked = rankings_from_rows([{"prompt": "p", "responses": ["a", "b", "c"], "s": [3.0, 1.0, 0.5]}],
                                margin_column="s")
    torch.testing.assert_close(ranked.pair_margins(0), torch.tensor([2.0, 2.5, 0.5], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- 4. resume
@pytest.mark.slow
def test_an_interrupted_and_resumed_lora_run_reproduces_the_uninterrupted_one(bert_dir, tmp_path):
    rows = z_rankings(24, seed=5)
    settings = dict(steps=6, save_every=2, lora_r=4, lora_alpha=8.0, learning_rate=1e-2, eval_every=2,
                    log_heldout_rewards=True)
    full = make_trainer(bert_dir, tmp_path / "full", rows, **settings)
    assert full.head == ["classifier"]
    assert any("lora_" in k for k in full._trainable()) and any("classifier" in k for k in full._trainable())
    full.train()

    part = make_trainer(bert_dir, tmp_path / "part", rows, **settings)
    original = part.train_step

    def stop_after_three(step):
        metrics = original(step)
        if step == 2:
            part._stop_signal = signal.SIGINT
        return metrics

    part.train_step = stop_after_three
    assert part.train()["status"] == "interrupted"
    assert [r["step"] for r in read_jsonl(part.run_dir / "metrics.jsonl")] == [1, 2, 3]
    resumed = make_trainer(bert_dir, tmp_path / "ignored", rows, resume=str(part.run_dir), **settings)
    assert resumed.train()["status"] == "finished"
    want, got = read_jsonl(full.run_dir / "metrics.jsonl"), read_jsonl(part.run_dir / "metrics.jsonl")
    assert [without_timings(r) for r in got] == [without_timings(r) for r in want]
    assert read_jsonl(part.run_dir / "samples.jsonl") == read_jsonl(full.run_dir / "samples.jsonl")
    assert sorted({s["step"] for s in read_jsonl(full.run_dir / "samples.jsonl")}) == [1, 2, 4, 6]
    # the merged model gives the adapter's rewards
    groups = resumed.heldout_index
    prompts = [resumed.rankings.prompts[g] for g in groups for _ in resumed.rankings.responses[g]]
    texts = [r for g in groups for r in resumed.rankings.responses[g]]
    with torch.no_grad():
        torch.testing.assert_close(RewardModel.load(part.run_dir)(prompts, texts), resumed.rewards(groups),
                                   atol=1e-5, rtol=1e-5)
    # settings that cannot change are refused
    with pytest.raises(ValueError, match="settings differ.*learning_rate"):
        make_trainer(bert_dir, tmp_path / "x", rows, resume=str(part.run_dir), **{**settings, "learning_rate": 1e-3,
                                                                                    "steps": 8}).train()


# ---------------------------------------------------------------------------------------------- 5. bad input
def test_bad_data_is_refused_naming_the_row_and_the_columns(tmp_path):
    with pytest.raises(RankingDataError, match=r"missing column\(s\) \['rejected'\].*found are \['prompt', 'chosen'\]"):
        rankings_from_rows([{"prompt": "p", "chosen": "x"}])
    with pytest.raises(RankingDataError, match=r"missing column\(s\) \['kind'\]"):
        rankings_from_rows([{"prompt": "p", "responses": ["a", "b"]}], context_column="kind")
    with pytest.raises(RankingDataError, match=r"row 1, column 'responses' holds 1 response\(s\).*at least two"):
        rankings_from_rows([{"prompt": "p", "responses": ["a", "b"]}, {"prompt": "q", "responses": ["a"]}])
    with pytest.raises(RankingDataError, match=r"row 0: responses\[0\] and responses\[2\] are the same response"):
        rankings_from_rows([{"prompt": "p", "responses": ["a", "b", "a"]}])
    with pytest.raises(RankingDataError, match=r"row 0: chosen and rejected are the same response"):
        rankings_from_rows([{"prompt": "p", "chosen": "a", "rejected": "a"}])
    with pytest.raises(RankingDataError, match=r"row 0, column 'responses\[1\]' is empty"):
        rankings_from_rows([{"prompt": "p", "responses": ["a", " "]}])
    with pytest.raises(RankingDataError, match=r"one finite number per response \(3\)"):
        rankings_from_rows([{"prompt": "p", "responses": ["a", "b", "c"], "s": [1, 0]}], margin_column="s")
    with pytest.raises(RankingDataError, match="increase along the ranking"):
        rankings_from_rows([{"prompt": "p", "responses": ["a", "b"], "s": [0, 1]}], margin_column="s")
    with pytest.raises(RankingDataError, match="must be a finite number"):
        rankings_from_rows([{"prompt": "p", "chosen": "a", "rejected": "b", "s": "big"}], margin_column="s")
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["a", "b", "c"]}])
    assert load_rankings(str(path)).n_pairs == 3
    (tmp_path / "r.txt").write_text("x")
    with pytest.raises(RankingDataError, match="--data .*unknown file type"):
        load_rankings(str(tmp_path / "r.txt"))


def test_bad_settings_are_refused_before_training(bert_dir, tmp_path):
    with pytest.raises(ValueError, match="neg_power:1 is a bounded utility.*add --bounded"):
        RewardModelConfig(data="d", utility="neg_power:1")
    with pytest.raises(ValueError, match="power:0.5 is a bounded utility"):
        RewardModelConfig(data="d", utility="power:0.5")
    with pytest.raises(ValueError, match="--utilities open=log is a bounded utility"):
        RewardModelConfig(data="d", utility_column="k", utilities="open=log,closed=log_sigmoid")
    with pytest.raises(ValueError, match="linear with unbounded rewards has no minimum"):
        RewardModelConfig(data="d", utility="linear")
    with pytest.raises(ValueError, match=r"gamma=1.5 must lie in the open interval \(0, 1\)"):
        RewardModelConfig(data="d", utility="power:1.5", bounded=True)
    with pytest.raises(ValueError, match=r"gamma=2.0 must lie in the half-open interval \(0, 1\]"):
        RewardModelConfig(data="d", utility_column="k", utilities="open=neg_power:2", bounded=True)
    with pytest.raises(ValueError, match="needs both --utility_column"):
        RewardModelConfig(data="d", utilities="open=linear", bounded=True)
    with pytest.raises(ValueError, match="unknown utility"):
        RewardModelConfig(data="d", utility="log_sigmoidd")
    RewardModelConfig(data="d", utility="log_sigmoid", bounded=True)  # log-sigmoid works with both

    # data against the settings, checked before the model is loaded (the model path does not exist)
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "kind": "open"},
            {"prompt": "q", "chosen": "a", "rejected": "b", "kind": "other"}]
    config = make_config(tmp_path / "no-such-model", tmp_path / "run", utility_column="kind",
                         utilities="open=neg_power:1", bounded=True, batch_size=1)
    with pytest.raises(RankingDataError, match=r"holds the value\(s\) \['other'\].*gives no utility"):
        RewardModelTrainer(config, rankings_from_rows(rows, context_column="kind"))
    # responses that become the same tokens once cut
    rows = [{"prompt": "prompt", "responses": ["abcdefgh1", "abcdefgh2"]}] * 2
    with pytest.raises(RankingDataError, match="the same tokens once cut to --max_length 8"):
        make_trainer(bert_dir, tmp_path / "run", rows, max_length=8, batch_size=1, heldout_fraction=0)
    with pytest.raises(ValueError, match="fewer than --batch_size"):
        make_trainer(bert_dir, tmp_path / "run", z_rankings(4), batch_size=8)


# ---------------------------------------------------------------------------------------------- 6. the CLI
@pytest.mark.slow
def test_cli_trains_resumes_and_evaluates(bert_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "rankings.jsonl", z_rankings(40, seed=7))
    common = ["--data", str(data), "--model", str(bert_dir), "--batch_size", "8", "--micro_batch_size", "4",
              "--learning_rate", "3e-3", "--eval_every", "5", "--heldout_fraction", "0.25", "--progress", "false",
              "--save_every", "5"]
    run = tmp_path / "run"
    assert cmd_reward_model(["train", *common, "--steps", "5", "--output_dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "finished after 5/5 steps" in out and "heldout/accuracy" in out
    assert cmd_reward_model(["train", "--resume", str(run), "--steps", "20"]) == 0
    capsys.readouterr()
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, 21))

    assert cmd_reward_model(["eval", "--model", str(run), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "pairwise accuracy" in out and "q50" in out
    assert cmd_reward_model(["eval", "--model", str(run), "--subset", "heldout", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rankings"] == json.loads((run / "config.json").read_text())["config"]["heldout_rankings"]
    assert result["accuracy"] > 0.7 and set(result["reward"]) >= {"mean", "std", "q05", "q50", "q95"}
    with capsys.disabled():
        print(f"CLI run, 20 steps: held-out accuracy {result['accuracy']:.3f}")

    # errors: exit code 2 and the reason, before any model is loaded
    bad = ["train", "--data", str(data), "--utility", "log", "--output_dir", str(tmp_path / "e")]
    assert cmd_reward_model(bad) == 2
    assert "bounded utility" in capsys.readouterr().err
    assert cmd_reward_model(["train", "--output_dir", str(tmp_path / "e")]) == 2
    assert "--data is required" in capsys.readouterr().err
    assert cmd_reward_model(["eval", "--model", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cmd_reward_model(["fit"]) == 2
