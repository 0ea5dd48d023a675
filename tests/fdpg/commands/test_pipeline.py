"""``fdpg pipeline``: stages checked before anything runs, placeholders resolved to earlier stages' directories, a
finished stage skipped and an interrupted one resumed when the same command runs again."""

from __future__ import annotations

import json

import pytest

from fdpg.commands.pipeline import PipelineConfigError, load_pipeline, run_pipeline, stage_argv, stage_status


def write(path, spec) -> str:
    path.write_text(json.dumps(spec))
    return str(path)


def test_bad_pipelines_are_refused_naming_the_stage(tmp_path) -> None:
    with pytest.raises(PipelineConfigError, match="needs output_dir"):
        load_pipeline(write(tmp_path / "a.json", {"stages": []}))
    with pytest.raises(PipelineConfigError, match="unknown command 'trian'"):
        load_pipeline(write(tmp_path / "b.json", {"output_dir": "x", "stages": [{"name": "s", "command": "trian"}]}))
    with pytest.raises(PipelineConfigError, match=r"stage 'ppo' refers to \{sft\}, which is not an earlier stage"):
        load_pipeline(write(tmp_path / "c.json", {"output_dir": "x", "stages": [
            {"name": "ppo", "command": "train", "args": {"model": "{sft}"}},
            {"name": "sft", "command": "train", "args": {"algo": "sft"}}]}))
    with pytest.raises(PipelineConfigError, match="must be unique"):
        load_pipeline(write(tmp_path / "d.json", {"output_dir": "x", "stages": [
            {"name": "a", "command": "train"}, {"name": "a", "command": "train"}]}))


def test_stage_arguments_resolve_defaults_placeholders_and_switches(tmp_path) -> None:
    out = tmp_path / "out"
    argv = stage_argv({"name": "ppo", "command": "train", "args": {"algo": "ppo", "model": "{sft}", "lora_r": 8,
                                                                  "progress": False}},
                      {"task": "gender", "lora_r": 4}, out)
    assert argv == ["train", "--task", "gender", "--lora_r", "8", "--algo", "ppo", "--model", str(out / "sft"),
                    "--progress", "false", "--output_dir", str(out / "ppo")]
    argv = stage_argv({"name": "rep", "command": "report", "positional": ["{ppo}"], "args": {"no_html": None}},
                      {"task": "gender"}, out)
    assert argv == ["report", str(out / "ppo"), "--no_html", "--out", str(out / "rep")]  # defaults are train's
    argv = stage_argv({"name": "ev", "command": "eval", "args": {"task": "gender", "model": "{ppo}"}}, {}, out)
    assert argv == ["eval", "--task", "gender", "--model", str(out / "ppo"), "--out", str(out / "ev" / "eval.json")]
    assert stage_status(out / "missing") == "absent"


@pytest.mark.slow
def test_a_pipeline_runs_filter_sft_raft_and_resumes(tiny_word_model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    common = {"model": str(tiny_word_model_dir), "task": "sentiment", "max_new_tokens": 6, "batch_size": 4,
              "generation_batch_size": 4, "micro_batch_size": 4, "eval_samples": 4, "progress": False, "lora_r": 4}
    spec = {"output_dir": str(out), "defaults": common, "stages": [
        {"name": "filtered", "command": "filter-samples",
         "args": {"task": "sentiment", "model": str(tiny_word_model_dir), "n": 24, "quantile": 0.5,
                  "max_new_tokens": 6, "no_progress": None}},
        {"name": "sft", "command": "train",
         "args": {"algo": "sft", "data": "{filtered}/demonstrations.jsonl", "steps": 2, "heldout_fraction": 0.2}},
        {"name": "raft", "command": "train",
         "args": {"algo": "raft", "model": "{sft}", "steps": 1, "samples_per_prompt": 2}}]}
    path = write(tmp_path / "pipeline.json", spec)
    assert run_pipeline(path) == 0
    assert all(stage_status(out / s) == "finished" for s in ("filtered", "sft", "raft"))
    kept = [json.loads(line) for line in (out / "filtered" / "demonstrations.jsonl").read_text().splitlines()]
    assert 12 <= len(kept) <= 24 and all({"prompt", "completion", "score"} <= set(r) for r in kept)
    assert json.loads((out / "raft" / "config.json").read_text())["config"]["model"] == str(out / "sft")
    record = json.loads((out / "pipeline.json").read_text())
    assert set(record) == {"filtered", "sft", "raft"} and all(r["exit_code"] == 0 for r in record.values())
    capsys.readouterr()
    # again: every stage is skipped
    assert run_pipeline(path) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 3
    # an interrupted train stage (a checkpoint, no final summary) resumes with --resume
    summary = out / "sft" / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "status": "interrupted"}))
    assert stage_status(out / "sft") == "resumable"
    assert run_pipeline(path, dry_run=True) == 0
    assert f"--resume {out / 'sft'}" in capsys.readouterr().out


def test_rounds_unroll_into_numbered_stages_with_the_previous_rounds_placeholders(tmp_path) -> None:
    spec = load_pipeline(write(tmp_path / "r.json", {"output_dir": "x", "stages": [
        {"name": "sft", "command": "train", "args": {"algo": "sft"}},
        {"rounds": 2, "initial": {"policy": "{sft}"}, "stages": [
            {"name": "labels", "command": "label-rankings", "args": {"model": "{policy@previous}", "seed": "{round}"}},
            {"name": "rm", "command": "reward-model train", "args": {"data": "{labels}/rankings.jsonl"}},
            {"name": "policy", "command": "train", "args": {"model": "{sft}", "task_args": "path={rm}", "steps": 3}}]},
        {"name": "report", "command": "report", "positional": ["{policy.1}", "{policy.2}"]}]}))
    stages = {s["name"]: s for s in spec["stages"]}
    assert list(stages) == ["sft", "labels.1", "rm.1", "policy.1", "labels.2", "rm.2", "policy.2", "report"]
    assert stages["labels.1"]["args"] == {"model": "{sft}", "seed": "1"}
    assert stages["labels.2"]["args"] == {"model": "{policy.1}", "seed": "2"}
    assert stages["rm.2"]["args"] == {"data": "{labels.2}/rankings.jsonl"}
    assert stages["policy.2"]["args"] == {"model": "{sft}", "task_args": "path={rm.2}", "steps": 3}
    out = tmp_path / "out"
    assert stage_argv(stages["labels.2"], {}, out)[:3] == ["label-rankings", "--model", str(out / "policy.1")]


def test_bad_rounds_are_refused_with_the_reason(tmp_path) -> None:
    inner = [{"name": "labels", "command": "label-rankings", "args": {"model": "{policy@previous}"}},
             {"name": "policy", "command": "train"}]
    with pytest.raises(PipelineConfigError, match="round 1 has no previous 'policy'"):
        load_pipeline(write(tmp_path / "a.json", {"output_dir": "x", "stages": [{"rounds": 2, "stages": inner}]}))
    with pytest.raises(PipelineConfigError, match="rounds: a positive integer"):
        load_pipeline(write(tmp_path / "b.json", {"output_dir": "x", "stages": [{"rounds": 0, "stages": inner}]}))
    with pytest.raises(PipelineConfigError, match="'critic' is not a stage of the round"):
        load_pipeline(write(tmp_path / "c.json", {"output_dir": "x", "stages": [
            {"rounds": 1, "stages": [{"name": "p", "command": "train", "args": {"model": "{critic@previous}"}}]}]}))


@pytest.mark.slow
def test_two_rounds_rank_the_policys_samples_retrain_the_reward_model_and_train_on_it(tiny_word_model_dir,
                                                                                    tmp_path) -> None:
    out = tmp_path / "out"
    model = str(tiny_word_model_dir)
    common = {"model": model, "task": "sentiment", "max_new_tokens": 6, "batch_size": 4, "generation_batch_size": 4,
              "micro_batch_size": 4, "eval_samples": 4, "progress": False, "lora_r": 4}
    spec = {"output_dir": str(out), "defaults": common, "stages": [
        {"rounds": 2, "initial": {"policy": model}, "stages": [
            {"name": "labels", "command": "label-rankings",
             "args": {"task": "sentiment", "model": "{policy@previous}", "prompts": 16, "k": 4, "max_new_tokens": 6,
                      "seed": "{round}", "no_progress": None}},
            {"name": "rm", "command": "reward-model train",
             "args": {"data": "{labels}/rankings.jsonl", "model": model, "steps": 2, "batch_size": 2,
                      "heldout_fraction": 0.25, "margin_column": "scores", "progress": "false"}},
            {"name": "policy", "command": "train",
             "args": {"algo": "ppo", "task": "reward_model", "task_args": "path={rm}", "steps": 1,
                      "critic": "reward_model:{rm}"}}]}]}
    assert run_pipeline(write(tmp_path / "rounds.json", spec)) == 0, (out / "logs").iterdir()
    labels = json.loads((out / "labels.2" / "labels.json").read_text())
    assert labels["model"] == str(out / "policy.1") and labels["rankings"] >= 1
    rows = [json.loads(line) for line in (out / "labels.2" / "rankings.jsonl").read_text().splitlines()]
    assert all(r["scores"] == sorted(r["scores"], reverse=True) and len(set(r["scores"])) == len(r["scores"])
               for r in rows)
    policy = json.loads((out / "policy.2" / "config.json").read_text())["config"]
    assert policy["task_args"] == f"path={out / 'rm.2'}" and policy["critic"] == f"reward_model:{out / 'rm.2'}"
    assert json.loads((out / "rm.2" / "config.json").read_text())["config"]["data"] == str(
        out / "labels.2" / "rankings.jsonl")
