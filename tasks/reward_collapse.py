r"""The reward-collapse experiment (Song, Cai, Lee, Su 2023) on a real corpus, offline: ``fdpg reward-collapse``.

**Data** (:func:`build_collapse_rankings`). The long docstrings (``min_words``, default 80 words or more) of the Python
standard library of the running interpreter (modules, classes, functions and methods; :func:`stdlib_docstrings`,
the files of :func:`tasks.codegen.stdlib_sources`), whitespace collapsed, capped at ``max_words`` words.
``n_prompts`` of them are drawn with ``random.Random(seed)``, half of them *open-ended* and half *closed-ended*
(a seeded shuffle of the two labels, balanced among the prompts that the reward-model runs hold out too). A
prompt names the docstring's object and its kind, ``"[open] Document json.dumps."``; its ``n`` (default 8)
responses are the docstring cut after :math:`L_1 < \dots < L_n` words, the longer ranked higher (best first), with

- open-ended: evenly spaced lengths, :math:`L_i = \mathrm{round}(W i / n)`;
- closed-ended: two clusters, half the lengths evenly in :math:`[0.1 W, 0.2 W]` and half in :math:`[0.8 W, W]`

(:math:`W` the capped word count; lengths forced strictly increasing). The rows (``prompt``, ``responses``,
``kind``, ``name``, ``lengths``) go to ``OUT/data/rankings.jsonl``.

**Training**. Two reward models on those rankings, both with bounded rewards (the sigmoid of the head, in
:math:`[0, 1]`), the same split, batches and seed: ``OUT/fixed`` with one utility for every prompt
(``--fixed_utility``, default ``log_sigmoid``) and ``OUT/prompt_aware`` with a prompt-aware utility on the ``kind``
column (``--open_utility neg_power:1``, i.e. :math:`-1/x`, and ``--closed_utility linear``). Each logs the rewards
of every held-out ranking at each evaluation (``samples.jsonl``,
:mod:`fdpg.algorithms.reward_model`). Running the command
again continues unfinished runs (``--resume``) and skips finished ones.

**Analysis** (:func:`analyse`), from the runs' ``samples.jsonl``: for each utility, evaluation step and prompt group,
the *sorted reward curve* (each held-out prompt's rewards sorted in decreasing order, averaged over the group's
prompts, against rank 1..n) into ``OUT/curves.jsonl``; per step the distance between the two groups' pooled reward
distributions (Kolmogorov-Smirnov statistic and Wasserstein-1, of the rewards and of each prompt's rewards mapped onto
[0, 1]: :func:`distances`) into ``OUT/distances.jsonl``. With one utility the
two groups collapse onto one distribution (small distance); the prompt-aware utility pulls them apart. Plots:
``OUT/collapse.png`` (sorted reward against rank, one panel per group and utility, the evaluation steps from light
to dark, the solver's optimum :func:`objectives.reward_collapse.optimal_rewards` dashed) and ``OUT/distance.png``;
the summary ``OUT/collapse.json``.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

GROUPS = ("open", "closed")
UTILITY_RUNS = ("fixed", "prompt_aware")
#: The two length clusters of a closed-ended prompt, as fractions of its capped word count.
CLOSED_SHORT, CLOSED_LONG = (0.10, 0.20), (0.80, 1.00)


# ---------------------------------------------------------------------------------------------- the corpus
def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or path.stem


def stdlib_docstrings(root: str | None = None, min_words: int = 80) -> list[tuple[str, str]]:
    """``(qualified name, docstring)`` of every module, class, function and method of the standard library at
    ``root`` (default: the interpreter's) whose docstring has at least ``min_words`` words, whitespace collapsed;
    sorted by name, the same text kept once."""
    import sysconfig

    from tasks.codegen import stdlib_sources

    base = Path(root or sysconfig.get_paths()["stdlib"])
    found: dict[str, str] = {}
    for file in stdlib_sources(str(base)):
        try:
            tree = ast.parse(file.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        module = _module_name(file, base)

        def visit(node: ast.AST, name: str) -> None:
            doc = ast.get_docstring(node, clean=True) if isinstance(
                node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) else None
            if doc:
                words = doc.split()
                if len(words) >= min_words:
                    found.setdefault(" ".join(words), name)
            for child in getattr(node, "body", []):
                if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    visit(child, f"{name}.{child.name}")

        visit(tree, module)
    return sorted(((name, text) for text, name in found.items()), key=lambda x: x[0])


def response_lengths(words: int, n: int, kind: str) -> list[int]:
    """The ``n`` strictly increasing word counts of a prompt's responses (see the module docstring)."""
    if kind == "open":
        lengths = [round(words * i / n) for i in range(1, n + 1)]
    elif kind == "closed":
        low, high = n // 2, n - n // 2
        lengths = [round(words * f) for f in np.linspace(*CLOSED_SHORT, low)]
        lengths += [round(words * f) for f in np.linspace(*CLOSED_LONG, high)]
    else:
        raise ValueError(f"kind must be 'open' or 'closed', got {kind!r}")
    out = list(lengths)
    for i in range(len(out)):  # rounding ties pushed apart: up from the bottom, then down from the top
        out[i] = max(out[i], out[i - 1] + 1 if i else 1)
    for i in reversed(range(len(out))):
        out[i] = min(out[i], out[i + 1] - 1 if i + 1 < len(out) else words)
    if out[0] < 1:
        raise ValueError(f"{words} words are too few for {n} distinct {kind}-ended lengths")
    return out


def _assign(train: list[int], held: list[int], n_prompts: int, rng: random.Random) -> list[str]:
    """Labels with ``n_prompts // 2`` open-ended prompts, half of ``held`` among them, shuffled within each part."""
    held_open = len(held) // 2 + (rng.random() < 0.5 if len(held) % 2 else 0)
    kinds = [""] * n_prompts
    for part, n_open in ((held, held_open), (train, n_prompts // 2 - held_open)):
        labels = [GROUPS[0]] * n_open + [GROUPS[1]] * (len(part) - n_open)
        rng.shuffle(labels)
        for i, label in zip(part, labels):
            kinds[i] = label
    return kinds


def build_collapse_rankings(docs: Sequence[tuple[str, str]], n_prompts: int, n: int = 8, max_words: int = 128,
                            seed: int = 0, heldout_fraction: float = 0.0) -> list[dict[str, Any]]:
    """The ranking rows of the experiment (see the module docstring) from ``(name, text)`` documents; the open- and
    closed-ended labels are balanced over the whole set and over the prompts that a reward-model run with
    ``--seed seed --heldout_fraction heldout_fraction`` holds out."""
    from fdpg.preferences import split_pairs

    if n < 2:
        raise ValueError(f"--responses must be at least 2, got {n}")
    if n_prompts < 2:
        raise ValueError(f"--n_prompts must be at least 2 (one open-ended, one closed-ended), got {n_prompts}")
    names = {}
    for name, text in docs:  # one prompt per name (a name defined twice keeps its first docstring)
        names.setdefault(name, text)
    docs = sorted(names.items())
    if len(docs) < n_prompts:
        raise ValueError(f"only {len(docs)} long docstrings were found, fewer than --n_prompts {n_prompts}; lower "
                         "--n_prompts or --min_words")
    rng = random.Random(seed)
    chosen = rng.sample(docs, n_prompts)
    kinds = _assign(*split_pairs(n_prompts, heldout_fraction, seed), n_prompts, rng)
    rows = []
    for (name, text), kind in zip(chosen, kinds):
        words = text.split()[:max_words]
        lengths = response_lengths(len(words), n, kind)
        rows.append({"prompt": f"[{kind}] Document {name}.", "kind": kind, "name": name, "lengths": lengths[::-1],
                     "responses": [" ".join(words[:length]) for length in reversed(lengths)]})
    return rows


# ---------------------------------------------------------------------------------------------- training
def run_settings(args: argparse.Namespace, data: Path, which: str) -> dict[str, Any]:
    """The :class:`fdpg.algorithms.reward_model.RewardModelConfig` settings of one of the two runs."""
    settings = dict(data=str(data), model=args.model, bounded=True, steps=args.steps, batch_size=args.batch_size,
                    micro_batch_size=args.micro_batch_size, learning_rate=args.learning_rate, seed=args.seed,
                    heldout_fraction=args.heldout_fraction, eval_every=args.eval_every, log_heldout_rewards=True,
                    lora_r=args.lora_r, max_length=args.max_length, utility_eps=args.utility_eps,
                    save_every=args.save_every, progress=args.progress, output_dir=str(Path(args.output_dir) / which))
    if which == "fixed":
        settings["utility"] = args.fixed_utility
    else:
        settings.update(utility_column="kind",
                        utilities=f"{GROUPS[0]}={args.open_utility},{GROUPS[1]}={args.closed_utility}")
    return settings


def train_run(settings: dict[str, Any]) -> Path:
    """Train (or resume, or skip when finished) one reward model; its run directory."""
    from fdpg.algorithms.reward_model import INFO_FILE, RewardModelConfig, RewardModelTrainer
    from fdpg.rankings import load_rankings

    run = Path(settings["output_dir"])
    if (run / "final" / INFO_FILE).is_file():
        print(f"[fdpg] {run} has finished already; kept", file=sys.stderr)
        return run
    if (run / "config.json").is_file():
        settings = {**settings, "resume": str(run)}
    config = RewardModelConfig(**settings)
    rankings = load_rankings(config.data, margin_column=None, context_column=config.utility_column)
    trainer = RewardModelTrainer(config, rankings)
    summary = trainer.train()
    if summary["status"] != "finished":
        raise RuntimeError(f"the run {trainer.run_dir} {summary['status']}: {summary['error']}")
    return trainer.run_dir


# ---------------------------------------------------------------------------------------------- analysis
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def group_curves(records: Sequence[dict[str, Any]], kinds: dict[str, str]) -> dict[int, dict[str, np.ndarray]]:
    """``{step: {group: [prompts, n] rewards sorted in decreasing order}}`` from ``samples.jsonl`` records."""
    out: dict[int, dict[str, list[list[float]]]] = {}
    for r in records:
        group = kinds.get(r["prompt"])
        if group is None:
            continue
        out.setdefault(int(r["step"]), {}).setdefault(group, []).append(sorted(r["rewards"], reverse=True))
    return {s: {g: np.asarray(v, dtype=np.float64) for g, v in groups.items()} for s, groups in sorted(out.items())}


def _per_prompt_unit(rewards: np.ndarray) -> np.ndarray:
    """Each prompt's rewards mapped affinely onto [0, 1] (min to 0, max to 1; a constant row to 0.5)."""
    low, high = rewards.min(1, keepdims=True), rewards.max(1, keepdims=True)
    span = high - low
    return np.where(span > 0, (rewards - low) / np.where(span > 0, span, 1.0), 0.5)


def distances(groups: dict[str, np.ndarray]) -> dict[str, float | None]:
    """The Kolmogorov-Smirnov statistic and the Wasserstein-1 distance between the open and closed groups' pooled
    rewards (``ks``, ``wasserstein``), and the same after mapping each prompt's rewards onto [0, 1]
    (``ks_normalized``, ``wasserstein_normalized``: the shape alone, as the optimum spans [0, 1]); ``None`` when a
    group is empty."""
    import scipy.stats

    keys = ("ks", "wasserstein", "ks_normalized", "wasserstein_normalized")
    a, b = (groups.get(g) for g in GROUPS)
    if a is None or b is None or not a.size or not b.size:
        return dict.fromkeys(keys)
    out: dict[str, float | None] = {}
    for suffix, (x, y) in (("", (a, b)), ("_normalized", (_per_prompt_unit(a), _per_prompt_unit(b)))):
        x, y = x.ravel(), y.ravel()
        out[f"ks{suffix}"] = float(scipy.stats.ks_2samp(x, y).statistic)
        out[f"wasserstein{suffix}"] = float(scipy.stats.wasserstein_distance(x, y))
    return out


def optima(args: argparse.Namespace, n: int) -> dict[str, dict[str, list[float]]]:
    """The solver's optimal rewards of each panel (the interpolating regime): ``{run: {group: rewards}}``."""
    from objectives.reward_collapse import optimal_rewards

    fixed = optimal_rewards(args.fixed_utility, n).tolist()
    return {"fixed": {g: fixed for g in GROUPS},
            "prompt_aware": {GROUPS[0]: optimal_rewards(args.open_utility, n).tolist(),
                             GROUPS[1]: optimal_rewards(args.closed_utility, n).tolist()}}


def analyse(out: Path, rows: Sequence[dict[str, Any]], runs: dict[str, Path], args: argparse.Namespace) -> dict:
    """Curves, distances, plots and the summary of the two runs (see the module docstring)."""
    kinds = {r["prompt"]: r["kind"] for r in rows}
    n = len(rows[0]["responses"])
    curves_lines, distance_lines, summary_runs = [], [], {}
    all_curves: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for which, run in runs.items():
        curves = group_curves(_read_jsonl(run / "samples.jsonl"), kinds)
        all_curves[which] = curves
        heldout = {int(m["step"]): m.get("heldout/accuracy") for m in _read_jsonl(run / "metrics.jsonl")
                   if "heldout/accuracy" in m}
        for step, groups in curves.items():
            for group, values in groups.items():
                curves_lines.append({"utility": which, "step": step, "group": group, "n_prompts": len(values),
                                     "curve": values.mean(0).tolist(), "std": values.std(0).tolist()})
            distance_lines.append({"utility": which, "step": step, **distances(groups),
                                   "heldout/accuracy": heldout.get(step)})
        last = max(curves) if curves else None
        result: dict[str, Any] = {"run": str(run), "last_step": last}
        if last is not None:
            result.update({k: v for k, v in distance_lines[-1].items() if k not in ("utility", "step")})
            result["curves"] = {g: v.mean(0).tolist() for g, v in curves[last].items()}
        summary_runs[which] = result
    (out / "curves.jsonl").write_text("".join(json.dumps(x) + "\n" for x in curves_lines))
    (out / "distances.jsonl").write_text("".join(json.dumps(x) + "\n" for x in distance_lines))
    best = optima(args, n)
    plot_curves(all_curves, best, out / "collapse.png", args)
    plot_distances(distance_lines, out / "distance.png")
    summary = {"data": str(out / "data" / "rankings.jsonl"), "prompts": len(rows), "responses": n,
               "utilities": {"fixed": args.fixed_utility, "prompt_aware": {GROUPS[0]: args.open_utility,
                                                                             GROUPS[1]: args.closed_utility}},
               "optimal_rewards": best, "runs": summary_runs,
               "files": [str(out / f) for f in ("curves.jsonl", "distances.jsonl", "collapse.png", "distance.png")]}
    (out / "collapse.json").write_text(json.dumps(summary, indent=2))
    return summary


def plot_curves(curves: dict[str, dict[int, dict[str, np.ndarray]]], best: dict[str, dict[str, list[float]]],
                path: Path, args: argparse.Namespace) -> None:
    """Sorted reward against rank: rows = utilities, columns = prompt groups; steps light to dark, optimum dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"fixed": f"fixed U = {args.fixed_utility}",
             "prompt_aware": f"prompt-aware U (open: {args.open_utility}, closed: {args.closed_utility})"}
    fig, axes = plt.subplots(len(UTILITY_RUNS), len(GROUPS), figsize=(10, 7.5), sharex=True, sharey=True,
                             squeeze=False)
    cmap = plt.get_cmap("Blues")
    for row, which in enumerate(UTILITY_RUNS):
        steps = sorted(curves.get(which, {}))
        for col, group in enumerate(GROUPS):
            ax = axes[row][col]
            n = len(best[which][group])
            ranks = np.arange(1, n + 1)
            for k, step in enumerate(steps):
                values = curves[which][step].get(group)
                if values is None:
                    continue
                last = k == len(steps) - 1
                shade = cmap(0.35 + 0.65 * k / max(1, len(steps) - 1))
                ax.plot(ranks, values.mean(0), color=shade, lw=2.2 if last else 1.0, alpha=1.0 if last else 0.6,
                        marker="o" if last else None, ms=4, label=f"step {step}" if last or k == 0 else None)
            ax.plot(ranks, best[which][group], "k--", lw=1.4, label="optimum (solver)")
            ax.set_title(f"{group}-ended prompts\n{names[which]}", fontsize=9)
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            if row == len(UTILITY_RUNS) - 1:
                ax.set_xlabel("rank (sorted, best first)")
            if col == 0:
                ax.set_ylabel("held-out reward (mean over prompts)")
            ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("Reward collapse: sorted rewards of held-out prompts over training", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_distances(lines: Sequence[dict[str, Any]], path: Path) -> None:
    """The distance between the open and closed groups' reward distributions against the step, per utility."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    for ax, key, label in zip(axes[0], ("ks", "wasserstein"), ("Kolmogorov-Smirnov statistic", "Wasserstein-1")):
        for which in UTILITY_RUNS:
            points = [(x["step"], x[key]) for x in lines if x["utility"] == which and x[key] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, label=which.replace("_", "-"))
        if ax.get_lines():
            ax.legend(fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(f"open vs closed prompts: {label}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- the command
def parser() -> argparse.ArgumentParser:
    from fdpg.algorithms.reward_model import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="fdpg reward-collapse", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", "--output-dir", default="runs/reward_collapse")
    p.add_argument("--n_prompts", "--n-prompts", type=int, default=240, help="prompts (half open-, half closed-ended)")
    p.add_argument("--responses", type=int, default=8, help="responses per prompt (n)")
    p.add_argument("--min_words", "--min-words", type=int, default=80, help="shortest docstring used, in words")
    p.add_argument("--max_words", "--max-words", type=int, default=128, help="docstrings are capped at this many words")
    p.add_argument("--stdlib", default=None, help="the standard library's directory (default: this interpreter's)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch_size", "--batch-size", type=int, default=8, help="rankings per step")
    p.add_argument("--micro_batch_size", "--micro-batch-size", type=int, default=4, help="rankings per forward pass")
    p.add_argument("--learning_rate", "--learning-rate", type=float, default=5e-5)
    p.add_argument("--lora_r", "--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--max_length", "--max-length", type=int, default=None, help="token limit of prompt + response")
    p.add_argument("--heldout_fraction", "--heldout-fraction", type=float, default=0.2)
    p.add_argument("--eval_every", "--eval-every", type=int, default=10)
    p.add_argument("--save_every", "--save-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fixed_utility", "--fixed-utility", default="log_sigmoid")
    p.add_argument("--open_utility", "--open-utility", default="neg_power:1")
    p.add_argument("--closed_utility", "--closed-utility", default="linear")
    p.add_argument("--utility_eps", "--utility-eps", type=float, default=0.01)
    p.add_argument("--only", choices=UTILITY_RUNS, default=None, help="train only one of the two runs")
    p.add_argument("--progress", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    out = Path(args.output_dir)
    data = out / "data" / "rankings.jsonl"
    if data.is_file():
        rows = _read_jsonl(data)
        print(f"[fdpg] using the rankings in {data} ({len(rows)} prompts)", file=sys.stderr)
    else:
        docs = stdlib_docstrings(args.stdlib, args.min_words)
        rows = build_collapse_rankings(docs, args.n_prompts, args.responses, args.max_words, args.seed,
                                       args.heldout_fraction)
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"[fdpg] {len(rows)} rankings of {args.responses} docstring truncations (of {len(docs)} docstrings with "
              f">= {args.min_words} words) -> {data}", file=sys.stderr)
    runs = {}
    for which in UTILITY_RUNS:
        settings = run_settings(args, data, which)
        if args.only in (None, which):
            print(f"[fdpg] training the {which.replace('_', '-')} reward model -> {settings['output_dir']}",
                  file=sys.stderr, flush=True)
            runs[which] = train_run(settings)
        elif Path(settings["output_dir"], "samples.jsonl").is_file():
            runs[which] = Path(settings["output_dir"])
    summary = analyse(out, rows, runs, args)
    for which, result in summary["runs"].items():
        print(f"{which:<13} step {result['last_step']}: held-out accuracy {result.get('heldout/accuracy')}, "
              f"KS(open, closed) {result.get('ks')}, W1 {result.get('wasserstein')}")
    print(f"wrote {', '.join(summary['files'])}, {out / 'collapse.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
