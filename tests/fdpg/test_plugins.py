"""Plugins (fdpg.plugins): a researcher's own divergence, task, utility and segmenter in every fdpg process.

Fast tests load plugins in this process (the module's state and ``FDPG_PLUGINS`` restored after each); the slow
ones run ``python -m fdpg.cli`` from a directory outside the repository, as a user would, through train, resume,
report, a two-cell sweep and a pipeline stage.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fdpg_testing import read_jsonl, run_cli

import fdpg
import fdpg.plugins as plugins
from fdpg.plugins import PluginError, load_plugins, pop_plugins_flag, recorded_in_runs

SMALL = ["--steps", "1", "--batch_size", "4", "--samples_per_prompt", "2", "--max_new_tokens", "6",
         "--progress", "false", "--eval_samples", "0", "--save_every", "1"]

NEYMAN = """\
from objectives import CustomDivergence, register_divergence

register_divergence("{name}", CustomDivergence(lambda t: (t - 1) ** 2 / t, name="{name}"))
"""

TASK = """\
from objectives import rl_with_kl
from tasks import Task, TaskSpec, register_task


class VowelTask(Task):
    name = "{name}"
    description = "reward = fraction of vowels (a user's own task, in a file of its own)"

    def build(self, beta, options, prompts=None):
        def scorer(completions, prompts):
            return {{"reward": [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]}}

        def metrics(features):
            values = features["reward"]
            return {{"score/reward": sum(values) / len(values)}}

        return TaskSpec(prompts=list(prompts or ["hello", "the cat", "a dog", "my day"]), scorer=scorer,
                        target=rl_with_kl("reward", beta).as_conditional(), metrics=metrics)


register_task(VowelTask)
"""


@pytest.fixture
def fresh_plugins(monkeypatch):
    """No plugin loaded, FDPG_PLUGINS unset; both, and the registries plugins add to, restored afterwards."""
    import objectives.registry
    import objectives.segments
    import objectives.utilities
    import tasks

    for module, name in ((objectives.registry, "_FACTORIES"), (objectives.registry, "_DESCRIPTIONS"),
                         (objectives.utilities, "_FAMILIES"), (objectives.segments, "SEGMENTERS"), (tasks, "_TASKS")):
        monkeypatch.setattr(module, name, dict(getattr(module, name)))
    monkeypatch.setattr(plugins, "_loaded", {})
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    monkeypatch.delenv(plugins.ENV_VAR, raising=False)
    return monkeypatch


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


# ------------------------------------------------------------------------------------------------ in process
def test_a_file_plugin_registers_its_divergence_and_is_recorded_by_absolute_path(fresh_plugins, tmp_path) -> None:
    from objectives import get_divergence

    file = write(tmp_path / "elsewhere" / "my_div.py", NEYMAN.format(name="neyman_a"))
    fresh_plugins.chdir(tmp_path)
    recorded = load_plugins("elsewhere/my_div.py")
    assert recorded == [str(file.resolve())]
    assert os.environ[plugins.ENV_VAR] == str(file.resolve())  # what child processes inherit
    log_t = torch.tensor([math.log(2.0)])  # f takes log t: (2 - 1)^2 / 2
    assert get_divergence("neyman_a").f(log_t).item() == pytest.approx(0.5)
    assert load_plugins(str(file)) == recorded  # once per process


def test_the_environment_variable_and_a_module_name(fresh_plugins, tmp_path) -> None:
    from objectives import get_divergence

    write(tmp_path / "pkg_mod_b.py", NEYMAN.format(name="neyman_b"))
    fresh_plugins.syspath_prepend(str(tmp_path))
    fresh_plugins.setenv(plugins.ENV_VAR, "pkg_mod_b")
    assert load_plugins() == ["pkg_mod_b"]
    assert get_divergence("neyman_b").name == "neyman_b"


def test_a_module_name_beside_the_working_directory_is_taken_as_its_file(fresh_plugins, tmp_path) -> None:
    """``fdpg train --plugins my_div`` in the folder of my_div.py (the console script's sys.path lacks '.')."""
    write(tmp_path / "cwd_plugin_c.py", NEYMAN.format(name="neyman_c"))
    fresh_plugins.chdir(tmp_path)
    assert load_plugins("cwd_plugin_c") == [str((tmp_path / "cwd_plugin_c.py").resolve())]


def test_an_installed_packages_entry_point_is_loaded(fresh_plugins, tmp_path) -> None:
    from objectives import get_divergence

    write(tmp_path / "ep_plugin_d.py", NEYMAN.format(name="neyman_d"))
    info = tmp_path / "ep_plugin_d-1.0.dist-info"
    write(info / "METADATA", "Metadata-Version: 2.1\nName: ep-plugin-d\nVersion: 1.0\n")
    write(info / "entry_points.txt", "[fdpg.plugins]\nneyman_d = ep_plugin_d\n")
    fresh_plugins.syspath_prepend(str(tmp_path))
    load_plugins()
    assert get_divergence("neyman_d").name == "neyman_d"


@pytest.mark.parametrize(("source", "needle"), [
    ("import numpy\nraise RuntimeError('my bug')\n",
     r"failed to import: RuntimeError: my bug \(.*broken\.py, line 2\)"),
    ("def f(:\n", r"failed to import: SyntaxError"),
    ("import no_such_module_xyz\n", r"failed to import: ModuleNotFoundError: No module named 'no_such_module_xyz'"),
])
def test_a_plugin_that_fails_to_import_names_its_file_and_the_error(fresh_plugins, tmp_path, source, needle) -> None:
    file = write(tmp_path / "broken.py", source)
    with pytest.raises(PluginError, match=needle) as info:
        load_plugins(str(file))
    assert str(file.resolve()) in str(info.value)
    assert plugins.loaded_plugins() == [] and not any(m.startswith("fdpg_plugin_broken") for m in sys.modules)


def test_missing_plugins_say_what_to_give(fresh_plugins, tmp_path) -> None:
    with pytest.raises(PluginError, match=r"plugin file .*nope\.py' does not exist"):
        load_plugins(str(tmp_path / "nope.py"))
    with pytest.raises(PluginError, match=r"plugin 'no_such_plugin_q' not found: no module 'no_such_plugin_q'"):
        load_plugins("no_such_plugin_q")


def test_the_command_line_fails_at_once_with_exit_2(fresh_plugins, tmp_path, capsys) -> None:
    file = write(tmp_path / "bad_plugin.py", "raise ValueError('wrong on purpose')\n")
    for command in (["train", "--plugins", str(file), "--model", str(tmp_path / "no-model")],
                    ["eval", "--plugins", str(file), "--model", "x"], ["tasks", f"--plugins={file}"]):
        code, _, err = run_cli(command, capsys)
        assert code == 2, command
        assert f"fdpg {command[0]}: error: plugin {str(file.resolve())!r} failed to import: ValueError: wrong on " \
               "purpose" in err


def test_pop_plugins_flag() -> None:
    assert pop_plugins_flag(["--a", "1", "--plugins", "x, ./y.py", "--plugins=z", "--b"]) == (
        ["x", "./y.py", "z"], ["--a", "1", "--b"])
    with pytest.raises(PluginError, match="--plugins needs a value"):
        pop_plugins_flag(["--plugins", "--steps", "2"])


def test_train_settings_record_the_plugins_and_take_the_plugins_divergence(fresh_plugins, tmp_path) -> None:
    from fdpg.cli import parse_train_args

    file = write(tmp_path / "my_div_e.py", NEYMAN.format(name="neyman_e"))
    config = parse_train_args(["--plugins", str(file), "--divergence", "neyman_e"])
    assert config.plugins == str(file.resolve()) and config.divergence == "neyman_e"


def test_a_users_utility_and_segmenter(fresh_plugins, tmp_path) -> None:
    """register_utility / register_segmenter from a plugin: the names then work wherever a name is taken."""
    from objectives.segments import get_segmenter
    from objectives.utilities import get_utility

    write(tmp_path / "my_bits_f.py", """\
        import torch
        from objectives.segments import register_segmenter
        from objectives.utilities import register_utility, utility_from_function

        register_utility("halved_f", lambda scale=0.5: utility_from_function(lambda x: scale * x, name="halved"),
                         param="scale")
        register_segmenter("words_f", lambda text: [(i, i + len(w)) for i, w in
                                                    ((text.index(w), w) for w in text.split())])
        """)
    load_plugins(str(tmp_path / "my_bits_f.py"))
    assert get_utility("halved_f:3")(torch.tensor([2.0])).item() == pytest.approx(6.0)
    assert get_segmenter("words_f")("ab cd") == [(0, 2), (3, 5)]
    from objectives.segments import SegmentationError
    from objectives.utilities import UtilityError

    with pytest.raises(UtilityError, match="already a utility"):
        __import__("objectives.utilities").utilities.register_utility("linear", lambda: None)
    with pytest.raises(SegmentationError, match="already a segmenter"):
        __import__("objectives.segments").segments.register_segmenter("sentence", lambda t: [])


def test_recorded_in_runs_reads_config_json_under_a_directory(tmp_path) -> None:
    for k, spec in enumerate(["a", "/x/b.py,a"]):
        write(tmp_path / "sweep" / f"cell{k}" / "config.json", json.dumps({"config": {"plugins": spec}}))
    assert recorded_in_runs([tmp_path / "sweep"]) == ["a", "/x/b.py"]
    assert recorded_in_runs([tmp_path / "sweep" / "cell0"]) == ["a"]


def test_fdpg_train_from_python_returns_the_run_directory(fresh_plugins, tiny_model_dir, tmp_path) -> None:
    """``fdpg.train(...)``: the command from a notebook, with a plugin's divergence and task."""
    div = write(tmp_path / "nb_div.py", NEYMAN.format(name="neyman_g"))
    task = write(tmp_path / "nb_task.py", TASK.format(name="vowels_g"))
    run = fdpg.train(model=str(tiny_model_dir), task="vowels_g", divergence="neyman_g", plugins=[str(div), str(task)],
                     steps=1, batch_size=4, samples_per_prompt=2, max_new_tokens=4, progress=False, eval_samples=0,
                     output_dir=str(tmp_path / "run"))
    assert run == tmp_path / "run" and (run / "summary.json").is_file()
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["plugins"] == f"{div.resolve()},{task.resolve()}"
    assert (config["divergence"], config["task"]) == ("neyman_g", "vowels_g")
    with pytest.raises(TypeError, match=r"unknown setting\(s\) 'stepz' \(did you mean 'steps'\?\)"):
        fdpg.train(stepz=3)


# -------------------------------------------------------------------------------------- separate processes
def fdpg_cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``python -m fdpg.cli ARGS`` in ``cwd`` with no FDPG_PLUGINS unless given (a user's fresh shell)."""
    environment = {k: v for k, v in os.environ.items() if k != plugins.ENV_VAR}
    environment.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-m", "fdpg.cli", *args], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_a_plugin_divergence_trains_resumes_and_reports_from_the_command_line(tiny_model_dir, tmp_path) -> None:
    """The README's example in a file outside the repository: train, resume without naming it again (config.json
    records it), report without naming it (the run's record); the same task file trains too."""
    user = tmp_path / "user"
    write(user / "my_div.py", NEYMAN.format(name="neyman"))
    write(user / "my_task.py", TASK.format(name="vowels"))
    run = tmp_path / "runs" / "neyman"
    done = fdpg_cli(["train", "--plugins", "my_div.py,./my_task.py", "--model", str(tiny_model_dir),
                     "--task", "vowels", "--divergence", "neyman", "--output_dir", str(run), *SMALL], cwd=user)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["plugins"] == f"{(user / 'my_div.py').resolve()},{(user / 'my_task.py').resolve()}"
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    resumed = fdpg_cli(["train", "--resume", str(run), "--steps", "2", "--progress", "false"], cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    report = fdpg_cli(["report", str(run), "--out", str(tmp_path / "report")], cwd=elsewhere)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "neyman" in (tmp_path / "report" / "report.md").read_text()
    # without the record (a run made before plugins were recorded) the same resume names the unknown task
    without = tmp_path / "runs" / "unrecorded"
    without.mkdir()
    for name in ("metrics.jsonl", "summary.json"):
        (without / name).write_text((run / name).read_text())
    data = json.loads((run / "config.json").read_text())
    data["config"]["plugins"] = ""
    (without / "config.json").write_text(json.dumps(data))
    bare = fdpg_cli(["train", "--resume", str(without), "--steps", "3"], cwd=elsewhere)
    assert bare.returncode == 2 and "unknown task 'vowels'" in bare.stderr


@pytest.mark.slow
def test_a_plugin_reaches_every_cell_of_a_sweep_and_a_pipeline_stage(tiny_model_dir, tmp_path) -> None:
    user = tmp_path / "user"
    write(user / "my_div.py", NEYMAN.format(name="neyman"))
    sweep = fdpg_cli(["sweep", "--plugins", "my_div.py", "--grid", "divergence=neyman,rkl", "--workers", "2",
                      "--output_dir", str(tmp_path / "sweep"), "--model", str(tiny_model_dir), "--task", "sentiment",
                      *SMALL, "--progress", "false"], cwd=user)
    assert sweep.returncode == 0, sweep.stdout[-2000:] + sweep.stderr[-2000:]
    for cell in ("divergence=neyman", "divergence=rkl"):
        config = json.loads((tmp_path / "sweep" / cell / "config.json").read_text())["config"]
        assert config["plugins"] == str((user / "my_div.py").resolve()), cell
    pipeline = write(user / "pipeline.yaml", f"""\
        output_dir: {tmp_path / "pipe"}
        plugins: [my_div.py]
        stages:
          - name: neyman
            command: train
            args:
              model: {tiny_model_dir}
              task: sentiment
              divergence: neyman
              steps: 1
              batch_size: 4
              samples_per_prompt: 2
              max_new_tokens: 6
              eval_samples: 0
              progress: false
        """)
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    ran = fdpg_cli(["pipeline", str(pipeline)], cwd=elsewhere)  # the file's plugins, relative to the file
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    config = json.loads((tmp_path / "pipe" / "neyman" / "config.json").read_text())["config"]
    assert config["divergence"] == "neyman" and config["plugins"] == str((user / "my_div.py").resolve())
