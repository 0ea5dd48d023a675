"""``--prompts_file``: one prompt per line, read and checked for ``fdpg train`` and ``fdpg report``."""

from __future__ import annotations

from pathlib import Path


def read_prompts_file(path: str) -> list[str]:
    file = Path(path)
    if file.exists() and not file.is_file():
        raise ValueError(f"--prompts_file {path!r} exists but is not a regular file (a directory?): give a text file "
                         "with one prompt per line")
    if not file.is_file():
        raise FileNotFoundError(f"--prompts_file {path!r} does not exist")
    prompts = [line.rstrip("\n") for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts_file {path!r} holds no prompt (one per line)")
    return prompts
