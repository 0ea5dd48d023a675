"""Worker of test_distributed.py: a 2-step f-DPG run on a tiny model, in however many processes launched it.

Usage: ``python distributed_worker.py MODEL_DIR OUTPUT_DIR PARAMS_FILE [LORA_R]`` (plain, or under
``accelerate launch`` / ``torchrun``). The main process writes the final trainable parameters to
PARAMS_FILE (safetensors) and the run directory's path to ``PARAMS_FILE.run_dir``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from fdpg_testing import build_trainer, trainable_state  # this script's directory is on sys.path
from safetensors.torch import save_file


def main(argv: list[str]) -> int:
    model_dir, output_dir, params_file = argv[:3]
    lora_r = int(argv[3]) if len(argv) > 3 else 0
    torch.set_num_threads(1)
    # generation_batch_size 4 divides every process's share (8 / 2): the same seeded chunks in any layout.
    trainer = build_trainer(model_dir, output_dir, steps=2, batch_size=8, samples_per_prompt=4,
                            generation_batch_size=4, micro_batch_size=2, lora_r=lora_r, save_every=1)
    summary = trainer.train()
    if summary["status"] != "finished":
        print(f"worker: run {summary['status']}: {summary['error']}", file=sys.stderr)
        return 1
    if trainer.is_main:
        save_file({k: v.contiguous() for k, v in trainable_state(trainer).items()}, params_file)
        Path(params_file + ".run_dir").write_text(str(trainer.run_dir))
        print(f"worker: {trainer.accelerator.num_processes} process(es), {trainer.accelerator.distributed_type}")
    trainer.accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
