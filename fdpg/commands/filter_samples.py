r"""``fdpg filter-samples``: demonstrations made by filtering the base model's own samples (the lectures' "filter the
SFT data" arm; one offline round of rejection sampling).

``--n`` completions of the model, one per prompt drawn from the task's pool (seeded), scored by the task's reward;
those at or above the ``--quantile`` of the scores (or ``--min_score``) are written to
``OUTPUT_DIR/demonstrations.jsonl`` (columns ``prompt``, ``completion``, ``score``), ready for ``fdpg train --algo
sft --data``. SFT on them moves the model toward :math:`a` restricted to the top of its score distribution, :math:`P
= a\cdot 1[r\ge\tau]` (forward KL, as GDC's binary constraint: :mod:`objectives.likelihood`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def cmd_filter_samples(argv: Sequence[str]) -> int:
    from fdpg.commands.scored_samples import add_sampling_arguments, draw_scored_samples
    from objectives.likelihood import keep_above_quantile

    parser = argparse.ArgumentParser(prog="fdpg filter-samples", description=__doc__.split("\n\n")[0])
    add_sampling_arguments(parser)
    parser.add_argument("--n", type=int, default=256, help="completions drawn (one per drawn prompt)")
    parser.add_argument("--quantile", type=float, default=0.75, help="keep scores at or above this quantile, in [0, 1)")
    parser.add_argument("--min_score", "--min-score", type=float, default=None,
                        help="keep scores at or above this value instead (e.g. 1 for a 0/1 feature, whose quantiles "
                             "are 0 when few samples score 1)")
    args = parser.parse_args(list(argv))
    if args.n < 1 or not 0 <= args.quantile < 1:
        parser.error(f"--n must be positive and --quantile in [0, 1); got --n {args.n}, --quantile {args.quantile}")
    samples = draw_scored_samples(args, args.n)
    scores, feature = samples.scores, samples.feature
    keep = scores >= args.min_score if args.min_score is not None else keep_above_quantile(scores, args.quantile)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": p, "completion": t, "score": float(s)}
            for p, t, s, k in zip(samples.prompts, samples.texts, scores.tolist(), keep.tolist()) if k and t.strip()]
    with open(out / "demonstrations.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    if not rows:
        raise SystemExit(f"fdpg filter-samples: no sample of {args.n} kept (feature {feature!r}); draw more or lower "
                         "--min_score / --quantile")
    summary = {"n": args.n, "kept": len(rows), "quantile": args.quantile, "min_score": args.min_score,
               "feature": feature,
               "mean_score": float(scores.mean()),
               "kept_mean_score": float(np.mean([r["score"] for r in rows]))}
    (out / "filter.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"[fdpg] kept {len(rows)} of {args.n} samples ({feature} mean {summary['mean_score']:.3f} -> "
          f"{summary['kept_mean_score']:.3f}) in {out / 'demonstrations.jsonl'}")
    return 0
