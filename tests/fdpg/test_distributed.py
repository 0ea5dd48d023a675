"""Data parallelism: 2 CPU processes (gloo) train exactly like 1 process on the same global batch.

Both runs go through ``distributed_worker.py`` in fresh interpreters: once plainly (one process), once
under ``torch.distributed.run --nproc_per_node 2`` with ``ACCELERATE_USE_CPU=1`` (accelerate sets up
multi-CPU data parallelism only when told to use the CPU; ``accelerate launch --cpu`` starts several CPU
processes only through ``mpirun``). Sampling is seeded per chunk of ``generation_batch_size`` completions
at a fixed position of the global batch, so both layouts draw the same samples; micro-batches differ.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fdpg_testing import assert_same_metrics, assert_same_state, build_trainer, read_jsonl
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               ACCELERATE_USE_CPU="1", MASTER_ADDR="127.0.0.1", TOKENIZERS_PARALLELISM="false")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _run(cmd: list[str]) -> None:
    try:
        done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} did not finish in {TIMEOUT_S} s:\n{exc.stdout}\n{exc.stderr}")
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout


@pytest.mark.parametrize("lora_r", [0, 4], ids=["full", "lora"])
@pytest.mark.slow
def test_two_cpu_processes_match_one(lora_r: int, tiny_model_dir: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    out = _run([sys.executable, str(WORKER), str(tiny_model_dir), str(tmp_path / "one"), str(one), str(lora_r)])
    assert "1 process(es)" in out
    port = _free_port()
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                "--master_addr", "127.0.0.1", "--master_port", str(port),
                str(WORKER), str(tiny_model_dir), str(tmp_path / "two"), str(two), str(lora_r)])
    assert "2 process(es), DistributedType.MULTI_CPU" in out

    params_one, params_two = load_file(str(one)), load_file(str(two))
    initial = build_trainer(tiny_model_dir, tmp_path / "unused", lora_r=lora_r)._trainable()
    assert any(not torch.equal(params_one[k], initial[k].detach()) for k in params_one)  # it did train
    assert_same_state(params_two, params_one, atol=1e-5)

    run_one = Path(Path(str(one) + ".run_dir").read_text())
    run_two = Path(Path(str(two) + ".run_dir").read_text())
    metrics_one, metrics_two = read_jsonl(run_one / "metrics.jsonl"), read_jsonl(run_two / "metrics.jsonl")
    assert [m["step"] for m in metrics_two] == [1, 2]  # one line per step: only the main process writes
    for got, want in zip(metrics_two, metrics_one):
        assert got["log_z"] == pytest.approx(want["log_z"], abs=1e-6)
        assert got["score/reward"] == pytest.approx(want["score/reward"], abs=1e-12)
        assert_same_metrics(got, want, atol=1e-5)
    # the same samples, all of them (gathered from both processes) in the same order; log-probs come from
    # other micro-batch shapes in the two layouts, so they agree to float32 rounding, not bit for bit
    samples_one, samples_two = read_jsonl(run_one / "samples.jsonl"), read_jsonl(run_two / "samples.jsonl")
    assert len(samples_two) == len(samples_one) == 2 * 8
    exact = ("step", "prompt", "completion", "scores")
    for got, want in zip(samples_two, samples_one):
        assert {k: got[k] for k in exact} == {k: want[k] for k in exact}
        assert got.keys() == want.keys()
        for k in got.keys() - set(exact):
            assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-5), k
    assert sorted(p.name for p in (run_two / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert not (tmp_path / "two-2").exists()  # a single run directory


def test_multi_process_launch_that_accelerate_does_not_see_fails_clearly(monkeypatch, tiny_model_dir: Path,
                                                                        tmp_path: Path) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"launched as 2 processes .* ACCELERATE_USE_CPU=1"):
        build_trainer(tiny_model_dir, tmp_path / "run")
