r"""``fdpg pipeline CONFIG.yaml``: the stages of the RLHF pipeline chained, each a run directory, resumable as a whole.

::

    output_dir: pipelines/gender
    plugins: [./my_task.py]      # optional: your modules or files (relative to this file), in every stage
    defaults:                    # flags given to every `train` stage (a stage's own args win)
      model: smollm2-135m-instruct
      task: gender
      max_new_tokens: 24
    stages:
      - name: filtered           # demonstrations: base samples the task scores best
        command: filter-samples
        args: {task: gender, n: 256, quantile: 0.75, no_progress: null}   # null: a bare switch
      - name: sft
        command: train
        args: {algo: sft, data: "{filtered}/demonstrations.jsonl", lora_r: 8, epochs: 1}
      - name: ppo
        command: train
        args: {algo: ppo, model: "{sft}", lora_r: 8, steps: 40}

Each stage is one ``fdpg`` command (``train``, ``reward-model train``, ``filter-samples``, ``label-rankings``,
``bon``, ``eval``, ``report``, ...) run as a subprocess with ``--output_dir OUTPUT_DIR/NAME`` (``report``: ``--out``,
its runs as ``positional``; ``eval``: ``--out OUTPUT_DIR/NAME/eval.json``);
``{NAME}`` in an argument is an earlier stage's directory, so ``model: "{sft}"`` starts PPO from the SFT run (its
reference is that model: :func:`fdpg.models.finished_run`). Run the same command again: a finished stage (its
``summary.json`` says ``finished``, or its ``pipeline_done`` marker is there) is skipped, an interrupted ``train``
or ``reward-model train`` stage resumes from its checkpoint (``--resume``), and the pipeline goes on from there.
Each stage's output goes to ``OUTPUT_DIR/logs/NAME.log``; ``pipeline.json`` records each stage's command, status and
wall time.

**Iterated rounds** (InstructGPT, Llama 2): an entry ``{rounds: R, initial: {...}, stages: [...]}`` repeats its
stages ``R`` times, the stage ``NAME`` of round ``r`` being ``NAME.r`` (its directory ``OUTPUT_DIR/NAME.r``). Inside a
round, ``{NAME}`` is that round's stage, ``{NAME@previous}`` the previous round's (in round 1: ``initial[NAME]``,
itself a placeholder or a model), and ``{round}`` the round's number; later stages name a round's stage in full
(``{policy.2}``)::

      - rounds: 2
        initial: {policy: "{sft}"}           # round 1 ranks the SFT model's samples
        stages:
          - name: labels                     # rankings of the current policy's samples, labelled by the task
            command: label-rankings
            args: {model: "{policy@previous}", task: gender, reward_feature: female, prompts: 128, k: 4}
          - name: rm                         # the reward model retrained on them
            command: reward-model train
            args: {data: "{labels}/rankings.jsonl", steps: 200}
          - name: policy                     # PPO from the SFT model on the new reward model
            command: train
            args: {algo: ppo, model: "{sft}", task: reward_model, task_args: "path={rm}", critic: "reward_model:{rm}"}
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Commands whose stage directory is a run that ``--resume`` continues.
RESUMABLE = ("train", "reward-model train")
#: Commands whose output is not ``--output_dir DIRECTORY``: the flag and the file in the stage's directory it names
#: (``""``: the directory itself).
OUT_FLAG = {"report": ("--out", ""), "eval": ("--out", "eval.json")}
#: Marker written into a stage's directory once a command without a ``summary.json`` finished.
DONE_MARKER = "pipeline_done"
#: A placeholder in a stage's argument: ``{NAME}`` (and, inside a round, ``{NAME@previous}``, ``{round}``).
PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


class PipelineConfigError(ValueError):
    """A pipeline file that cannot be run: the message names the stage and the key."""


def round_placeholder(match: re.Match, r: int, local: list[str], initial: dict[str, Any], path: str | Path) -> str:
    """One placeholder of round ``r`` resolved: ``{round}``, ``{NAME@previous}``, and ``{NAME}`` of a stage of the
    round (``local``); any other placeholder unchanged (an earlier stage's)."""
    ref = match.group(1)
    name, _, when = ref.partition("@")
    if ref == "round":
        return str(r)
    if when == "previous":
        if name not in local:
            raise PipelineConfigError(f"{path}: {{{ref}}}: {name!r} is not a stage of the round (its stages: {local})")
        if r > 1:
            return f"{{{name}.{r - 1}}}"
        if name not in initial:
            raise PipelineConfigError(f"{path}: round 1 has no previous {name!r}: give it as initial: {{{name}: ...}}")
        return str(initial[name])
    return f"{{{ref}.{r}}}" if ref in local else match.group(0)


def expand_rounds(stages: list[Any], path: str | Path) -> list[Any]:
    """The stages with every ``{rounds: R, initial, stages}`` entry unrolled into ``NAME.1 .. NAME.R`` (see the
    module's docstring for the placeholders of a round)."""
    flat: list[Any] = []
    for i, entry in enumerate(stages):
        if not (isinstance(entry, dict) and "rounds" in entry):
            flat.append(entry)
            continue
        rounds, inner, initial = entry["rounds"], entry.get("stages"), entry.get("initial", {}) or {}
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1 or not isinstance(inner, list) \
                or not inner or not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in inner) \
                or not isinstance(initial, dict):
            raise PipelineConfigError(f"{path}: entry {i} needs rounds: a positive integer, stages: a list of named "
                                      "stages and, optionally, initial: a mapping NAME: placeholder or model")
        local = [s["name"] for s in inner]
        for r in range(1, rounds + 1):
            def resolved(text: str, r: int = r, local: list[str] = local, initial: dict = initial) -> str:
                return PLACEHOLDER.sub(lambda m: round_placeholder(m, r, local, initial, path), text)

            for stage in inner:
                args = {k: resolved(v) if isinstance(v, str) else v for k, v in (stage.get("args") or {}).items()}
                positional = [resolved(v) if isinstance(v, str) else v for v in stage.get("positional", []) or []]
                flat.append({**stage, "name": f"{stage['name']}.{r}", "args": args, "positional": positional})
    return flat


def load_pipeline(path: str | Path) -> dict[str, Any]:
    """The pipeline file, checked: ``output_dir``, optional ``defaults``, and ``stages`` with unique names, known
    commands and placeholders that name earlier stages."""
    from fdpg.config import read_mapping_file

    spec = read_mapping_file(path, "fdpg pipeline")
    if spec.get("plugins"):  # before the stages are checked: they may name a plugin's task or divergence
        from fdpg.plugins import load_plugins, split_specs

        here = Path(path).resolve().parent
        load_plugins([str(here / s) if s.endswith(".py") and not Path(s).is_absolute() else s
                      for s in split_specs(spec["plugins"])])
    if not isinstance(spec.get("output_dir"), str):
        raise PipelineConfigError(f"{path}: needs output_dir: DIRECTORY")
    stages = spec.get("stages")
    if not isinstance(stages, list) or not stages:
        raise PipelineConfigError(f"{path}: needs stages: a list of {{name, command, args}}")
    stages = spec["stages"] = expand_rounds(stages, path)
    seen: list[str] = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str) or not stage.get("command"):
            raise PipelineConfigError(f"{path}: stage {i} needs a name and a command")
        name = stage["name"]
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in seen or name == "logs":
            raise PipelineConfigError(f"{path}: stage {i}'s name {name!r} must be unique, not 'logs', and made of "
                                      "letters, digits, '_', '-' and '.'")
        from fdpg.commands import COMMAND_NAMES

        if stage["command"].split()[0] not in COMMAND_NAMES:
            raise PipelineConfigError(f"{path}: stage {name!r}: unknown command {stage['command']!r}; one of "
                                      f"{', '.join(COMMAND_NAMES)}")
        args = stage.get("args", {}) or {}
        if not isinstance(args, dict):
            raise PipelineConfigError(f"{path}: stage {name!r}: args must be a mapping of flag: value")
        for value in [*args.values(), *(stage.get("positional", []) or [])]:
            for ref in PLACEHOLDER.findall(str(value)):
                if ref not in seen:
                    raise PipelineConfigError(f"{path}: stage {name!r} refers to {{{ref}}}, which is not an earlier "
                                              f"stage (earlier: {seen or 'none'})")
        seen.append(name)
    return spec


def stage_argv(stage: dict[str, Any], defaults: dict[str, Any], out: Path) -> list[str]:
    """The ``fdpg`` arguments of ``stage``: the command, its args (after the defaults for ``train``), placeholders
    resolved, and its output directory."""
    command = stage["command"].split()
    args = {**(defaults if command[0] == "train" else {}), **(stage.get("args") or {})}

    def resolved(value: Any) -> str:
        text = str(value).lower() if isinstance(value, bool) else str(value)
        return PLACEHOLDER.sub(lambda m: str(out / m.group(1)), text)

    argv = [*command, *(resolved(v) for v in stage.get("positional", []) or [])]
    for key, value in args.items():
        argv += [f"--{key}"] if value is None else [f"--{key}", resolved(value)]  # null: a bare switch
    flag, file = OUT_FLAG.get(command[0], ("--output_dir", ""))
    argv += [flag, str(out / stage["name"] / file) if file else str(out / stage["name"])]
    return argv


def stage_status(directory: Path) -> str:
    """``finished``, ``resumable`` (a run with a checkpoint), ``absent`` or ``stale`` (there, nothing to resume)."""
    if (directory / DONE_MARKER).is_file():
        return "finished"
    try:
        if json.loads((directory / "summary.json").read_text()).get("status") == "finished":
            return "finished"
    except (OSError, ValueError):
        pass
    if not directory.exists():
        return "absent"
    checkpoints = directory / "checkpoints"
    return "resumable" if checkpoints.is_dir() and any(checkpoints.iterdir()) else "stale"


def run_pipeline(path: str | Path, dry_run: bool = False) -> int:
    """Run every stage not yet finished, in order; the exit code of the first that fails (0 when all finish)."""
    spec = load_pipeline(path)
    out = Path(spec["output_dir"])
    defaults = spec.get("defaults", {}) or {}
    (out / "logs").mkdir(parents=True, exist_ok=True)
    record_path = out / "pipeline.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    for stage in spec["stages"]:
        name, directory = stage["name"], out / stage["name"]
        argv = stage_argv(stage, defaults, out)
        status = stage_status(directory)
        if status == "finished":
            print(f"[pipeline] {name}: finished, skipped", flush=True)
            continue
        if status == "resumable" and stage["command"] in RESUMABLE:
            argv = [*stage["command"].split(), "--resume", str(directory)]
        elif status in ("stale", "resumable"):
            moved = directory.with_name(f"{name}.failed-{int(time.time())}")
            directory.rename(moved)
            print(f"[pipeline] {name}: an unfinished attempt with nothing to resume moved to {moved}", flush=True)
        print(f"[pipeline] {name}: fdpg {shlex.join(argv)}", flush=True)
        if dry_run:
            continue
        started = time.perf_counter()
        if OUT_FLAG.get(stage["command"], ("", ""))[1]:
            directory.mkdir(parents=True, exist_ok=True)  # the command writes a file into it
        with open(out / "logs" / f"{name}.log", "a", encoding="utf-8") as log:
            code = subprocess.call([sys.executable, "-m", "fdpg.cli", *argv], stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ})
        wall = time.perf_counter() - started
        if code == 0 and stage["command"] not in RESUMABLE:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / DONE_MARKER).write_text(json.dumps({"argv": argv}) + "\n")
        record[name] = {"argv": argv, "exit_code": code, "wall_time_s": wall}
        record_path.write_text(json.dumps(record, indent=1) + "\n")
        if code != 0:
            print(f"[pipeline] {name}: failed (exit {code}); see {out / 'logs' / f'{name}.log'}. Run the same "
                  "command again to resume.", flush=True)
            return code
        print(f"[pipeline] {name}: finished in {wall:.0f} s", flush=True)
    return 0


def cmd_pipeline(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="fdpg pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the pipeline's YAML or JSON file")
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="print the stages' commands only")
    args = parser.parse_args(list(argv))
    return run_pipeline(args.config, dry_run=args.dry_run)
