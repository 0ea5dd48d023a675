"""``fdpg pipeline``: stages checked before anything runs, placeholders resolved to earlier stages' directories, a
finished stage skipped and an interrupted one resumed when the same command runs again."""

from __future__ import annotations

import json

import pytest

from fdpg.pipeline import PipelineConfigError, load_pipeline, run_pipeline, stage_argv, stage_status


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
