r"""``fdpg label-rankings``: K-wise rankings of a model's own samples, labelled by a task's scorer standing in for the
human labeller (InstructGPT's and Llama 2's iterated rounds: the reward model is retrained on rankings of the
current policy's samples).

For each of ``--prompts`` prompts drawn from the task's pool, ``--k`` completions :math:`y_1..y_k \sim \pi(\cdot\mid
c)` of ``--model`` (a finished fdpg run, e.g. the last round's policy, or any model) are scored by the task's
feature :math:`s` (its reward, or ``--reward_feature``) and ranked, best first. A ranking must be strict (each of
its :math:`K(K-1)/2` pairs says :math:`y_i \succ y_j`), so of completions with equal scores (or equal texts) only
the first drawn is kept; a prompt left with fewer than two is dropped (with a 0/1 feature: a prompt whose ``k``
samples all score the same). ``OUTPUT_DIR/rankings.jsonl`` has the columns ``prompt``, ``responses`` (best first)
and ``scores`` (not increasing: usable as ``--margin_column scores``), ready for ``fdpg reward-model train --data``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def rankings_from_scores(prompts: Sequence[str], texts: Sequence[str], scores: Sequence[float], k: int
                         ) -> list[dict[str, Any]]:
    """The strict rankings of ``k`` adjacent samples a prompt: distinct scores, distinct non-empty texts, best first;
    rankings of fewer than two responses dropped."""
    if len(prompts) != len(texts) or len(texts) != len(scores) or len(texts) % k:
        raise ValueError(f"rankings need k = {k} samples for each prompt: got {len(prompts)} prompts, {len(texts)} "
                         f"texts and {len(scores)} scores")
    rows = []
    for lo in range(0, len(texts), k):
        kept: dict[float, str] = {}
        for text, score in zip(texts[lo:lo + k], scores[lo:lo + k]):
            if text.strip() and score not in kept and text not in kept.values():
                kept[float(score)] = text
        if len(kept) >= 2:
            order = sorted(kept, reverse=True)
            rows.append({"prompt": prompts[lo], "responses": [kept[s] for s in order], "scores": order})
    return rows


def cmd_label_rankings(argv: Sequence[str]) -> int:
    from fdpg.commands.scored_samples import add_sampling_arguments, draw_scored_samples

    parser = argparse.ArgumentParser(prog="fdpg label-rankings", description=__doc__.split("\n\n")[0])
    add_sampling_arguments(parser)
    parser.add_argument("--prompts", type=int, default=128, help="prompts drawn from the task's pool")
    parser.add_argument("--k", type=int, default=4, help="completions sampled and ranked per prompt (K >= 2)")
    args = parser.parse_args(list(argv))
    if args.prompts < 1 or args.k < 2:
        parser.error(f"--prompts must be positive and --k at least 2; got --prompts {args.prompts}, --k {args.k}")
    samples = draw_scored_samples(args, args.prompts, per_prompt=args.k)
    rows = rankings_from_scores(samples.prompts, samples.texts, samples.scores.tolist(), args.k)
    if not rows:
        raise SystemExit(f"fdpg label-rankings: no prompt of {args.prompts} got two completions with different "
                         f"{samples.feature!r} scores; draw more prompts or a larger --k")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "rankings.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    summary = {"model": args.model, "prompts": args.prompts, "k": args.k, "feature": samples.feature,
               "rankings": len(rows), "pairs": sum(len(r["responses"]) * (len(r["responses"]) - 1) // 2 for r in rows),
               "mean_score": float(samples.scores.mean())}
    (out / "labels.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"[fdpg] {len(rows)} rankings ({summary['pairs']} pairs) of {args.prompts} prompts x {args.k} samples "
          f"({samples.feature} mean {summary['mean_score']:.3f}) in {out / 'rankings.jsonl'}")
    return 0
