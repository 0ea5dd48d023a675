"""The ``fdpg`` command line: training runs, config files and flags, and clear errors (exit code 2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fdpg_testing import read_jsonl, run_cli

from fdpg.cli import parse_train_args
from objectives import available_divergences

SMALL = ["--steps", "1", "--batch_size", "4", "--samples_per_prompt", "2", "--max_new_tokens", "8",
         "--progress", "false", "--eval_samples", "0"]


@pytest.mark.slow
def test_train_sentiment_on_the_tiny_model(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(["train", "--model", str(tiny_model_dir), "--task", "sentiment",
                              "--output_dir", str(tmp_path / "run"), *SMALL, "--eval_samples", "32"], capsys)
    assert code == 0, err
    assert "finished after 1/1 steps" in out and str(tmp_path / "run") in out
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(metrics) == 1
    assert {"score/reward", "score/positive_fraction"} <= set(metrics[0])
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert config["task"] == "sentiment" and config["model"] == str(tiny_model_dir)
    assert config["conditional"] is True  # the sentiment task's target is conditional
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished"
    # the final evaluation: the policy and the base model, each metric with its standard error and n
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert evaluation["n"] == 32 and summary["eval"]["score/reward"] == evaluation["policy"]["score/reward"]
    for side in ("policy", "base"):
        for name in ("score/reward", "score/positive_fraction", "kl_pi_a", "kl_pi_a_exact", "d_f", "distinct_2"):
            assert evaluation[side][name] is not None and evaluation[side][f"{name}_se"] is not None, (side, name)
    assert evaluation["base"]["kl_pi_a"] == 0 and evaluation["base"]["kl_pi_a_exact"] == pytest.approx(0, abs=1e-6)


def test_config_file_values_are_used_and_flags_override_them(tiny_model_dir: Path, tmp_path: Path,
                                                             capsys) -> None:
    config_file = tmp_path / "settings.yaml"
    config_file.write_text(
        f"model: {tiny_model_dir}\ntask: sentiment\ndivergence: js\nbeta: 0.5\nsteps: 3\nbatch_size: 4\n"
        f"samples_per_prompt: 2\nmax_new_tokens: 8\nprogress: false\nlearning_rate: 0.01\neval_samples: 0\n"
        f"output_dir: {tmp_path / 'from-file'}\n"
    )
    parsed = parse_train_args(["--config", str(config_file), "--divergence", "fkl", "--steps", "1"])
    assert (parsed.divergence, parsed.steps, parsed.beta, parsed.learning_rate) == ("fkl", 1, 0.5, 0.01)

    code, _, err = run_cli(["train", "--config", str(config_file), "--divergence", "fkl", "--steps", "1",
                            "--output_dir", str(tmp_path / "run")], capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert saved["divergence"] == "fkl" and saved["steps"] == 1  # flags win
    assert saved["beta"] == 0.5 and saved["learning_rate"] == 0.01 and saved["max_new_tokens"] == 8  # file
    assert not (tmp_path / "from-file").exists()


def test_json_config_file(tmp_path: Path) -> None:
    config_file = tmp_path / "settings.json"
    config_file.write_text(json.dumps({"divergence": "tv", "lora_r": 4}))
    parsed = parse_train_args(["--config", str(config_file)])
    assert parsed.divergence == "tv" and parsed.lora_r == 4


def test_dashes_work_like_underscores() -> None:
    parsed = parse_train_args(["--batch-size", "4", "--samples-per-prompt", "2", "--max-new-tokens", "9",
                               "--lora-target-modules", "all-linear"])
    assert (parsed.batch_size, parsed.samples_per_prompt, parsed.max_new_tokens) == (4, 2, 9)
    assert parsed.lora_target_modules == "all-linear"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--divergence", "jss"], r"unknown divergence 'jss'.*'js'"),
        (["--divergence", "revers_kl"], r"unknown divergence 'revers_kl'.*'reverse_kl'"),
        (["--task", "sentimnt"], r"unknown task 'sentimnt'.*'sentiment'"),
        (["--batch_size", "6", "--samples_per_prompt", "4"], r"--batch_size \(6\) must be a multiple of "
                                                             r"--samples_per_prompt \(4\)"),
        (["--steps", "0"], r"--steps must be a positive integer"),
        (["--beta", "-1"], r"--beta must be a positive number"),
        (["--baseline", "median"], r"--baseline must be one of"),
        (["--task_args", "oops"], r"--task_args items must be key=value"),
        (["--prompts_file", "/nonexistent/prompts.txt"], r"--prompts_file '/nonexistent/prompts.txt' does not exist"),
    ],
)
def test_bad_settings_exit_2_with_a_clear_message(extra: list[str], needle: str, tiny_model_dir: Path,
                                                  tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["train", "--model", str(tiny_model_dir), "--output_dir", str(tmp_path / "run"),
                            *SMALL, *extra], capsys)
    assert code == 2
    assert err.startswith("fdpg train: error: ")
    assert "Traceback" not in err
    assert re.search(needle, err), err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_missing_model_path(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["train", "--model", str(tmp_path / "no-such-model"), "--output_dir",
                            str(tmp_path / "run"), *SMALL], capsys)
    assert code == 2 and "does not exist" in err and "no-such-model" in err


def test_empty_prompts_file(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n  \n")
    code, _, err = run_cli(["train", "--model", str(tiny_model_dir), "--prompts_file", str(prompts),
                            "--output_dir", str(tmp_path / "run"), *SMALL], capsys)
    assert code == 2 and "holds no prompt" in err


def test_prompt_longer_than_the_context(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("short prompt\n" + "x" * 200 + "\n")
    code, _, err = run_cli(["train", "--model", str(tiny_model_dir), "--prompts_file", str(prompts),
                            "--output_dir", str(tmp_path / "run"), *SMALL], capsys)
    assert code == 2
    assert "200 tokens" in err and "context of 128 tokens" in err and "--max_new_tokens 8" in err
    assert not (tmp_path / "run").exists()


def test_prompts_file_replaces_the_task_prompts(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("my prompt one\nanother one\n")
    code, _, err = run_cli(["train", "--model", str(tiny_model_dir), "--prompts_file", str(prompts),
                            "--output_dir", str(tmp_path / "run"), *SMALL], capsys)
    assert code == 0, err
    used = {s["prompt"] for s in read_jsonl(tmp_path / "run" / "samples.jsonl")}
    assert used <= {"my prompt one", "another one"} and used


def test_unparseable_flag_value_exits_2(capsys) -> None:
    code, _, err = run_cli(["train", "--steps", "many"], capsys)
    assert code == 2 and "--steps" in err


def test_unknown_command_exits_2(capsys) -> None:
    code, out, err = run_cli(["trian"], capsys)
    assert code == 2 and "unknown command 'trian'" in err and "fdpg train" in out


def test_divergences_and_tasks_are_listed(capsys) -> None:
    code, out, _ = run_cli(["divergences"], capsys)
    assert code == 0
    listed = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert listed == available_divergences()
    assert {"rkl", "fkl", "tv", "js", "alpha"} <= set(listed)
    code, out, _ = run_cli(["tasks"], capsys)
    from tasks import available_tasks

    assert code == 0
    assert [line.split()[0] for line in out.splitlines() if line.strip()] == list(available_tasks())
    assert "sentiment" in available_tasks() and "VADER" in out


def test_train_help_lists_the_settings(capsys) -> None:
    code, out, _ = run_cli(["train", "--help"], capsys)
    assert code == 0
    for flag in ("--divergence", "--beta", "--lora_r", "--resume", "--config", "--batch_size"):
        assert flag in out


def test_task_defaults_apply_where_the_user_set_nothing(tmp_path) -> None:
    from fdpg.cli import parse_train_args

    config = parse_train_args(["--task", "lexical"])
    assert config.divergence == "fkl"  # the task's suggestion for a binary constraint
    config = parse_train_args(["--task", "lexical", "--divergence", "js"])
    assert config.divergence == "js"  # an explicit flag wins
    config = parse_train_args(["--task", "lexical", "--divergence=tv"])
    assert config.divergence == "tv"
    file = tmp_path / "c.yaml"
    file.write_text("divergence: hellinger\n")
    assert parse_train_args(["--task", "lexical", "--config", str(file)]).divergence == "hellinger"


def test_a_zero_target_with_reverse_kl_is_refused_before_any_model_is_loaded(tmp_path: Path, capsys) -> None:
    """lexical (P = a b) with rkl: refused at once with the reason, not after loading a model and sampling."""
    code, _, err = run_cli(["train", "--model", str(tmp_path / "no-such-model"), "--task", "lexical",
                            "--divergence", "rkl", "--output_dir", str(tmp_path / "run"), *SMALL], capsys)
    assert code == 2 and "0 wherever the constraint fails" in err and "'rkl'" in err and "fkl" in err
    assert "no-such-model" not in err and not (tmp_path / "run").exists()


def test_an_uncached_hub_model_with_the_hub_offline_says_so(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["train", "--model", "HuggingFaceTB/SmolLM2-360M-not-cached", "--output_dir",
                            str(tmp_path / "run"), *SMALL], capsys)
    assert code == 2
    assert "not in the local Hugging Face cache" in err and "HF_HUB_OFFLINE" in err
    assert "smollm2-135m-instruct" in err


@pytest.mark.slow
def test_resume_takes_the_runs_own_settings(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    """`fdpg train --resume RUN --steps N` continues RUN with its saved settings; an explicit flag that changes a
    setting that cannot change is refused, one that can (--steps) is taken."""
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--model", str(tiny_model_dir), "--task", "sentiment", "--output_dir", str(run),
                            *SMALL, "--divergence", "js", "--lora_r", "2", "--beta", "0.3"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["train", "--resume", str(run), "--steps", "2", "--progress", "false"], capsys)
    assert code == 0, err
    assert "finished after 2/2 steps" in out
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    config = json.loads((run / "config.json").read_text())["config"]
    assert (config["divergence"], config["lora_r"], config["beta"]) == ("js", 2, 0.3)
    code, _, err = run_cli(["train", "--resume", str(run), "--steps", "3", "--divergence", "rkl"], capsys)
    assert code == 2 and "settings differ (divergence: checkpoint 'js' vs now 'rkl')" in err


def test_a_prompts_file_that_is_a_directory_says_so(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["train", "--prompts_file", str(tmp_path), "--output_dir", str(tmp_path / "run"), *SMALL],
                           capsys)
    assert code == 2 and "exists but is not a regular file" in err


def test_a_finished_run_prints_its_evaluation_above_the_batch_means(tmp_path: Path) -> None:
    """The run's result is its final evaluation (base and policy, ± s.e., exact KL); the training batches'
    means come below it, labelled as such."""
    from fdpg.cli import final_evaluation_report, progress_report

    evaluation = {"n": 1024, "policy": {"score/reward": 0.41, "score/reward_se": 0.013, "kl_pi_a_exact": 1.2,
                                        "kl_pi_a_exact_se": 0.02, "entropy_exact": 50.0, "entropy_exact_se": 0.3},
                  "base": {"score/reward": 0.16, "score/reward_se": 0.009, "kl_pi_a_exact": 0.0,
                           "kl_pi_a_exact_se": 0.0, "entropy_exact": 56.5, "entropy_exact_se": 0.35}}
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    text = final_evaluation_report(tmp_path / "eval.json")
    assert "final evaluation" in text and "1024 completions" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("score/reward"))
    assert row.split()[1:] == ["0.1600", "±", "0.0090", "0.4100", "±", "0.0130"]  # base, then the policy
    assert any(line.strip().startswith("kl_pi_a_exact") and "1.2000 ± 0.0200" in line for line in text.splitlines())
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "score/reward": 0.2, "kl_pi_a": 0.0}) + "\n")
    assert progress_report(tmp_path / "metrics.jsonl").startswith("[fdpg] training batches (not the evaluation)")


def test_the_batch_means_of_an_sft_run_show_its_loss_not_a_missing_kl(tmp_path: Path) -> None:
    """SFT's steps sample nothing (scores only on evaluation steps, no kl_pi_a): the report shows its loss."""
    from fdpg.cli import progress_report

    rows = [{"step": 1, "loss": 3.0, "score/reward": 0.1}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = progress_report(tmp_path / "metrics.jsonl", window=2).splitlines()[1:]
    assert [line.split() for line in lines] == [["score/reward", "0.100", "->", "nan"],
                                                ["loss", "2.500", "->", "1.500"]]


def test_every_algorithm_declares_settings_that_exist():
    import dataclasses

    from fdpg.algorithms import ALGORITHM_SETTINGS
    from fdpg.config import ALGORITHMS, TrainConfig

    assert set(ALGORITHM_SETTINGS) == set(ALGORITHMS)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for algo, names in ALGORITHM_SETTINGS.items():
        assert set(names) <= fields, (algo, set(names) - fields)


@pytest.mark.parametrize(("algo", "shown", "hidden"), [
    ("grpo", ["--grpo_loss", "--kl_coef", "--clip_range", "--learning_rate"], ["--ppo_epochs", "--kto_loss",
                                                                                "--no_whiten_advantages"]),
    ("kto", ["--kto_loss", "--preferences", "--heldout_fraction"], ["--grpo_loss", "--critic"]),
    (None, ["--grpo_loss", "--kto_loss", "--ppo_epochs"], []),
])
def test_train_help_of_one_algorithm_shows_its_settings_and_the_shared_ones(capsys, algo, shown, hidden):
    code, out, _ = run_cli(["train", "--help", *(["--algo", algo] if algo else [])], capsys)
    assert code == 0
    for flag in shown:
        assert f"{flag} " in out, flag
    for flag in hidden:
        assert f"{flag} " not in out, flag


def test_the_pipelines_command_names_are_the_cli_commands():
    from fdpg.cli import COMMANDS
    from fdpg.commands import COMMAND_NAMES

    assert tuple(COMMANDS) == COMMAND_NAMES
