r"""Reports of runs: PNG figures, one self-contained HTML file (figures embedded, opens offline) and its Markdown
twin, from run directories only.

>>> from analysis.report import build_report
>>> report = build_report(["sweep/", "runs/bon"], out="report")   # report.html, report.md, *.png, *.csv
>>> report.skipped                                                # (path, reason) of what could not be read

What a report holds, per task: the Pareto frontier (:func:`analysis.plot_pareto`, one colour per method: each
f-DPG divergence, PPO, DPO, Best-of-n, the base model), the training curves with bands over seeds (score, KL,
D_f, entropy, Distinct-n); then the final metrics of every cell (a setting, pooled over its seeds: mean ± std
over seeds), the settings shared by all runs, the pseudo-reward :math:`-f'(t)` of every divergence used
(:func:`analysis.plots.plot_pseudo_rewards`) and a few samples of each cell at its first and last logged step.

Bad input never stops it: what :func:`analysis.runs.scan_runs` leaves out (a directory that is not a run, a
run with no step, a damaged file) and what it drops (a half-written last line of a crashed run) is listed in the
report and on stderr, and a section that cannot be drawn says why in its place.

The points of the frontier are assembled by :func:`frontier_points` (what ``fdpg analyze`` does too): each run's
mean of its last steps (:func:`analysis.final_points`), replaced by its final evaluation where it has one
(``eval.json``, :func:`analysis.evaluated_points`), and the base model's own point (:func:`analysis.base_points`).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from analysis.evaluations import base_points, evaluated_points, load_evaluations
from analysis.pareto import final_points, seed_points
from analysis.plots import hue_palette, metric_label, plot_pareto, plot_pseudo_rewards, plot_training_curves
from analysis.runs import NOT_A_SETTING, UNTRAINED_ALGOS, load_run, load_samples, run_config, scan_runs

#: Metrics of the final-metrics table after the task scores (those present).
TABLE_METRICS = ("kl_pi_a_exact", "kl_pi_a", "d_f", "kl_p_pi", "entropy", "distinct_1", "distinct_2", "distinct_3",
                 "completion_length")
#: Panels of the training curves (besides the task score and the frontier's x axis): divergences, then diversity.
CURVE_DIVERGENCES = ("kl_pi_a", "d_f")
CURVE_DIVERSITY = ("entropy", "distinct_1", "distinct_2", "distinct_3")
#: Columns of the final table placed after the metrics (what the numbers rest on), and hidden ones.
TRAILING_COLUMNS = ("source", "kl_pi_a_source", "run")
#: Settings never shown as distinguishing cells (bookkeeping, records of fits, the environment).
HIDDEN_SETTINGS = frozenset(NOT_A_SETTING | {"target_fit", "prompts_file"})


# ------------------------------------------------------------------------------------------ the frontier's points
def _eval_readable(run_dir: Path, notes: list[str] | None) -> bool:
    """Whether ``run_dir`` has no ``eval.json`` or one that :func:`analysis.load_evaluations` can read."""
    path = run_dir / "eval.json"
    if not path.is_file():
        return True
    try:
        evaluation = json.loads(path.read_text(encoding="utf-8"))
        if not (isinstance(evaluation, dict) and isinstance(evaluation.get("policy"), dict)
                and isinstance(evaluation.get("base"), dict)):
            raise ValueError("it has no 'policy' and 'base' evaluations")
    except ValueError as exc:
        if notes is not None:
            notes.append(f"{run_dir}: eval.json ignored ({exc}); its point is from its training steps")
        return False
    return True


def frontier_points(dirs: Iterable[str | Path], source: str = "auto", last: int = 5,
                    metrics: pd.DataFrame | None = None, notes: list[str] | None = None) -> pd.DataFrame:
    """One row per run (and per base-model evaluation): the points of the Pareto frontier, as ``fdpg analyze``
    draws them.

    ``source``: ``auto`` takes a run's final evaluation (``eval.json``) when it has one and the mean of its last
    ``last`` steps otherwise, and adds the base model's point (KL 0, the origin of every frontier); ``eval`` keeps
    only evaluated runs (``ValueError`` when there is none); ``train`` uses the training steps only. The ``source``
    column says where each row's numbers come from. ``metrics``: the runs' metrics when already loaded (else read
    from ``dirs``); ``notes``: a list to which an ignored, unreadable ``eval.json`` is reported.
    """
    if source not in ("auto", "eval", "train"):
        raise ValueError(f"source must be auto, eval or train, got {source!r}")
    dirs = list(dict.fromkeys(Path(d) for d in dirs))
    if not dirs:
        raise ValueError("no run directory to draw a frontier from")
    if metrics is None:
        metrics = pd.concat([load_run(d) for d in dirs], ignore_index=True)
    if "step" not in metrics or metrics["step"].notna().sum() == 0:
        raise ValueError("none of these runs logged a step")
    metrics = metrics.dropna(subset=["step"]).drop_duplicates(["run", "step"])
    points = final_points(metrics, last=last)
    if source == "train":
        points["source"] = f"train (last {last} steps)"
        return points
    readable = [d for d in dirs if _eval_readable(d, notes)]
    evaluations = load_evaluations(readable) if readable else pd.DataFrame()
    points = evaluated_points(points, evaluations, last=last)
    if source == "eval":
        points = points[points["source"].str.startswith("eval")].reset_index(drop=True)
        if points.empty:
            raise ValueError("source eval: none of these runs has an eval.json (train with --eval_samples N)")
    evaluated = [d for d in readable if (d / "eval.json").is_file()]
    base = base_points(evaluated) if evaluated else pd.DataFrame()
    if not base.empty:  # the base model's own point: every frontier starts at its origin (KL 0)
        points = pd.concat([points, base], ignore_index=True)
    return points


def frontier_axes(points: pd.DataFrame, x: str | None = None, y: str = "score/reward",
                  last: int = 5) -> tuple[str, str, str | None]:
    """``(x, y, note)``: the frontier's axes. ``x`` default: ``kl_pi_a_exact`` (the exact per-token KL(pi||a))
    when every point has it, else ``kl_pi_a`` (``note`` says which runs lack it); ``y``: the one asked for when
    some point has it, else the first ``score/...`` metric that has values."""
    note = None
    if x is None:
        exact = "kl_pi_a_exact"
        x = exact if exact in points and points[exact].notna().all() else "kl_pi_a"
        if exact in points and x != exact:
            lacking = ", ".join(str(r) for r in points.loc[points[exact].isna(), "run"])
            note = (f"x axis: kl_pi_a ({exact} not logged in the last {last} steps of {lacking}; raise --last or "
                    "train with a smaller --exact_kl_every)")
    if not (y in points and points[y].notna().any()):
        scores = [c for c in points if c.startswith("score/") and not c.endswith("_se") and points[c].notna().any()]
        y = scores[0] if scores else y
    return x, y, note


def training_metrics(metrics: pd.DataFrame) -> pd.DataFrame:
    """The rows of trained runs: without those of algorithms that train nothing (Best-of-n: one row at step 0)."""
    if "algo" not in metrics:
        return metrics
    return metrics[~metrics["algo"].isin(UNTRAINED_ALGOS)]


# --------------------------------------------------------------------------------------------- the final table
def _number(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or pd.isna(value):
        return "—"
    return f"{float(value):.4g}"


def final_table(points: pd.DataFrame, metrics: Sequence[str] | None = None,
                settings: Sequence[str] = ()) -> pd.DataFrame:
    """One row per cell (a setting; runs that differ only in the seed are pooled by :func:`analysis.seed_points`):
    ``method``, ``task``, the columns ``settings`` (taken from the points), ``n_seeds``, and for each metric ``m``
    (default: the ``score/...`` metrics, then :data:`TABLE_METRICS`, those present) its mean ``m``, ``m_std``
    (standard deviation over seeds, ddof=1; NaN for one seed) and ``m_se`` (over seeds, or a lone run's own)."""
    pooled = seed_points(points)
    if metrics is None:
        scores = [c for c in pooled if c.startswith("score/") and not c.endswith("_se")]
        metrics = [*scores, *(m for m in TABLE_METRICS if m in pooled)]
    metrics = [m for m in metrics if m in pooled and pooled[m].notna().any()]
    n_runs = pooled["n_runs"].fillna(1).astype(int) if "n_runs" in pooled else pd.Series(1, index=pooled.index)
    table = pd.DataFrame({"method": pooled.get("method"), "task": pooled.get("task")})
    for column in settings:
        table[column] = pooled[column] if column in pooled else None
    table["n_seeds"] = n_runs.to_numpy()
    for m in metrics:
        se = pooled[f"{m}_se"] if f"{m}_se" in pooled else pd.Series(float("nan"), index=pooled.index)
        table[m] = pooled[m]
        table[f"{m}_std"] = (se * n_runs.pow(0.5)).where(n_runs > 1)
        table[f"{m}_se"] = se
    for column in ("source", "kl_pi_a_source", "run"):
        if column in pooled:
            table[column] = pooled[column]
    return table.reset_index(drop=True)


def formatted_table(table: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """:func:`final_table` for a person: ``mean ± std`` over seeds, or ``mean (s.e. x)`` for a lone run."""
    trailing = [c for c in TRAILING_COLUMNS if c in table]
    shown = [c for c in table if c not in metrics and not c.endswith(("_std", "_se")) and c not in trailing]
    out = table[shown].copy().astype(object).where(table[shown].notna(), "—")
    for m in metrics:
        cells = []
        for _, row in table.iterrows():
            mean, std, se = row.get(m), row.get(f"{m}_std"), row.get(f"{m}_se")
            if pd.isna(mean):
                cells.append("—")
            elif not pd.isna(std):
                cells.append(f"{_number(mean)} ± {_number(std)}")
            elif not pd.isna(se) and se:
                cells.append(f"{_number(mean)} (s.e. {_number(se)})")
            else:
                cells.append(_number(mean))
        out[metric_label(m)] = cells
    for column in trailing:
        out[column] = table[column].astype(object).where(table[column].notna(), "—")
    return out


def _setting_values(configs: dict[str, dict]) -> tuple[dict[str, object], list[str]]:
    """(the settings every run that sets them shares, the settings that differ between runs), from the configs."""
    values: dict[str, set[str]] = {}
    first: dict[str, object] = {}
    for config in configs.values():
        for key, value in config.items():
            if key in HIDDEN_SETTINGS or isinstance(value, (dict, list)):
                continue
            values.setdefault(key, set()).add(json.dumps(value, sort_keys=True, default=str))
            first.setdefault(key, value)
    shared = {k: first[k] for k, v in sorted(values.items()) if len(v) == 1}
    differing = [k for k, v in values.items() if len(v) > 1]
    return shared, differing


# ---------------------------------------------------------------------------------------------------- samples
def sample_excerpts(run_dir: str | Path, per_step: int = 3, notes: list[str] | None = None) -> pd.DataFrame:
    """The first ``per_step`` logged samples of a run's first and last logged step (``samples.jsonl``): ``step``,
    ``prompt``, ``completion`` and the ``score/...`` columns. Empty when the run logged none."""
    samples = load_samples(run_dir, notes)
    if samples.empty or "step" not in samples:
        return pd.DataFrame()
    steps = sorted({int(samples["step"].min()), int(samples["step"].max())})
    picked = pd.concat([samples[samples["step"] == s].head(per_step) for s in steps], ignore_index=True)
    columns = ["step", "prompt", "completion", *(c for c in picked if c.startswith("score/"))]
    return picked[[c for c in columns if c in picked]]


# ----------------------------------------------------------------------------------------------------- the report
@dataclass
class Section:
    """A part of the report: a heading, paragraphs, figures (PNG paths) and tables (formatted frames)."""

    title: str
    level: int = 2
    text: list[str] = field(default_factory=list)
    figures: list[tuple[Path, str]] = field(default_factory=list)
    tables: list[tuple[pd.DataFrame, str]] = field(default_factory=list)


@dataclass
class Report:
    """What :func:`build_report` wrote and what it left out."""

    out: Path
    html: Path
    markdown: Path
    figures: list[Path]
    tables: list[Path]
    runs: list[Path]
    skipped: list[tuple[str, str]]
    notes: list[str]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "runs"


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _task_labels(frame: pd.DataFrame) -> pd.Series:
    """Each row's task as text (``n/a`` where a run's config names none)."""
    if "task" not in frame:
        return pd.Series("n/a", index=frame.index, dtype=object)
    return frame["task"].astype(object).where(frame["task"].notna(), "n/a").astype(str)


def _divergences_used(configs: dict[str, dict]) -> list[str]:
    """The divergences of the runs' objectives: f-DPG's and f-DPO's own, reverse KL for PPO and DPO by default."""
    used = set()
    for config in configs.values():
        algo = config.get("algo") or "fdpg"
        if algo in ("fdpg", "dpo") and config.get("divergence"):
            used.add(str(config["divergence"]))
        elif algo == "ppo":
            used.add("rkl")
    return sorted(used)


def build_report(paths: str | Path | Iterable[str | Path], out: str | Path = "report", last: int = 5,
                 source: str = "auto", smoothing: float = 0.8, samples_per_step: int = 3,
                 title: str | None = None, quiet: bool = False) -> Report:
    """Write the report of the runs in ``paths`` (run directories, directories holding runs, glob patterns) to
    ``out``: ``report.html`` (self-contained), ``report.md``, the PNG figures, ``points.csv`` (one row per run)
    and ``final_metrics.csv`` (one row per cell). What was skipped and why is in the report and, unless
    ``quiet``, on stderr. ``last``, ``source``: as in :func:`frontier_points`; ``smoothing``: of the training
    curves (:func:`analysis.smooth`); ``samples_per_step``: samples shown per cell at its first and last step."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scan = scan_runs(paths)
    notes = [f"{path}: {remark}" for path, remark in scan.notes]
    skipped = list(scan.skipped)
    figures: list[Path] = []
    tables: list[Path] = []
    sections: list[Section] = []

    def problem(section: Section, what: str, exc: Exception) -> None:
        message = f"{what}: {type(exc).__name__}: {exc}"
        section.text.append(f"Not drawn — {message}")
        notes.append(message)

    dirs = scan.dirs
    configs: dict[str, dict] = {}
    frames = []
    for d in list(dirs):
        try:
            frames.append(load_run(d))
            configs[d.name] = run_config(d)
        except Exception as exc:  # noqa: BLE001 - a run that cannot be read is skipped, never fatal
            skipped.append((str(d), f"could not be read: {type(exc).__name__}: {exc}"))
            dirs = [x for x in dirs if x != d]
    metrics = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    points = pd.DataFrame()
    if dirs:
        try:
            points = frontier_points(dirs, source=source, last=last, metrics=metrics, notes=notes)
        except Exception as exc:  # noqa: BLE001
            notes.append(f"no frontier points: {type(exc).__name__}: {exc}")
    methods = pd.concat([points.get("method", pd.Series(dtype=object)),
                         metrics.get("method", pd.Series(dtype=object))], ignore_index=True)
    palette = hue_palette(methods) if len(methods) else None

    # ---- per task: frontier and curves
    task_of_point = _task_labels(points)
    task_of_row = _task_labels(metrics)
    for task in sorted(set(task_of_point) | set(task_of_row)):
        section = Section(f"Task: {task}")
        sections.append(section)
        task_points = points[task_of_point == task]
        trained = training_metrics(metrics[task_of_row == task])
        x, y, axis_note = frontier_axes(task_points if len(task_points) else trained, last=last)
        if axis_note:
            section.text.append(axis_note)
        try:
            if task_points.empty:
                raise ValueError("no frontier point of this task (see the notes)")
            fig = plot_pareto(task_points, x=x, y=y, hue="method", palette=palette,
                              title=f"{task}: {metric_label(y)} against {metric_label(x)}")
            figures.append(_save(fig, out / f"pareto-{_slug(task)}.png"))
            caption = (f"Pareto frontier of {task}: one point per setting (runs that differ only in the seed pooled; "
                       "bars ±1 s.e.), each method's frontier through its points. ")
            if "kl_pi_a_source" in task_points and (task_points["kl_pi_a_source"] == "analytic").any():
                caption += "Best-of-n's KL is the analytic log n − (n−1)/n (n = 1 is the base model). "
            if (task_points.get("method") == "base a").any():
                caption += "'base a' is the base model's own evaluation (KL 0)."
            section.figures.append((figures[-1], caption))
        except Exception as exc:  # noqa: BLE001
            problem(section, f"Pareto frontier of {task}", exc)
        if trained.empty:
            section.text.append("No training curves: no trained run of this task (Best-of-n trains nothing).")
            continue
        panels = (("curves", list(dict.fromkeys((y, x, *CURVE_DIVERGENCES))), "score and divergences"),
                  ("diversity", list(CURVE_DIVERSITY), "entropy and Distinct-n"))
        for name, columns, what in panels:
            try:
                fig = plot_training_curves(trained, columns=columns, hue="method", palette=palette,
                                           smoothing=smoothing)
                figures.append(_save(fig, out / f"{name}-{_slug(task)}.png"))
                section.figures.append((figures[-1], f"Training curves of {task}, {what}: each run faintly, its "
                                        f"moving average (smoothing {smoothing:g}) on top; where runs differ only "
                                        "in the seed, the mean over seeds with a ±1 s.e. band."))
            except Exception as exc:  # noqa: BLE001
                problem(section, f"training curves ({what}) of {task}", exc)

    # ---- final metrics per cell, and the settings
    section = Section("Final metrics")
    sections.append(section)
    shared, differing = _setting_values(configs)
    shown_settings = [k for k in differing if k not in ("task", "algo", "method", "divergence", "seed", "target")]
    if not points.empty:
        try:
            cell_points = points.copy()
            by_run = {name: config for name, config in configs.items()}
            for key in shown_settings:
                cell_points[key] = [by_run.get(str(r), {}).get(key) for r in cell_points["run"]]
            table = final_table(cell_points, settings=shown_settings)
            table.to_csv(out / "final_metrics.csv", index=False)
            points.to_csv(out / "points.csv", index=False)
            tables += [out / "final_metrics.csv", out / "points.csv"]
            metric_names = [c for c in table if f"{c}_std" in table]
            section.tables.append((formatted_table(table, metric_names),
                                   "One row per cell (a setting): mean ± standard deviation over its seeds "
                                   "(n_seeds); for a single run, its mean with its own standard error (over its "
                                   "last steps, or of its evaluation). `source`: where the numbers come from."))
        except Exception as exc:  # noqa: BLE001
            problem(section, "final-metrics table", exc)
    else:
        section.text.append("No frontier point (no run could be loaded, or see the notes): nothing to tabulate.")
    if shared:
        section.text.append("Settings shared by every run that sets them: "
                            + ", ".join(f"`{k}={v}`" for k, v in shared.items()) + ".")

    # ---- pseudo-rewards
    section = Section("Pseudo-rewards of the divergences")
    sections.append(section)
    used = _divergences_used(configs)
    if used:
        try:
            colours = {d: palette[f"f-DPG {d}"] for d in used if palette and f"f-DPG {d}" in palette}
            fig = plot_pseudo_rewards(used, colours=colours)
            figures.append(_save(fig, out / "pseudo_rewards.png"))
            section.figures.append((figures[-1], "The pseudo-reward −f′(t) that f-DPG gives a sample against "
                                    "t = π(x)/p(x) (computed from objectives, not from the runs), for every "
                                    "divergence of these runs (PPO is reverse KL); clipped to ±5."))
        except Exception as exc:  # noqa: BLE001
            problem(section, "pseudo-reward figure", exc)
    else:
        section.text.append("No divergence among these runs (only Best-of-n or nothing loaded).")

    # ---- samples per cell
    section = Section("Samples")
    sections.append(section)
    seen_cells: set[str] = set()
    for d in dirs:
        config = configs.get(d.name, {})
        frame = metrics[metrics["run"] == d.name] if "run" in metrics else pd.DataFrame()
        cell = str(frame["setting_id"].iloc[0]) if len(frame) and "setting_id" in frame else d.name
        if cell in seen_cells:
            continue
        seen_cells.add(cell)
        method = str(frame["method"].iloc[0]) if len(frame) else d.name
        label = ", ".join(f"{k}={config[k]}" for k in shown_settings if config.get(k) not in (None, ""))
        sub = Section(f"{method} — {d.name}" + (f" ({label})" if label else ""), level=3)
        try:
            excerpt = sample_excerpts(d, samples_per_step, notes=None)
            if excerpt.empty:
                sub.text.append("No samples logged.")
            else:
                sub.tables.append((excerpt, "First and last logged step."))
        except Exception as exc:  # noqa: BLE001
            problem(sub, f"samples of {d}", exc)
        sections.append(sub)

    # ---- the files
    if not quiet:
        for path, reason in skipped:
            print(f"[fdpg report] skipped {path}: {reason}", file=sys.stderr)
        for note in notes:
            print(f"[fdpg report] note: {note}", file=sys.stderr)
    title = title or "fdpg report"
    header = _header(paths, dirs, skipped, notes)
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(_html(title, header, sections), encoding="utf-8")
    md_path.write_text(_markdown(title, header, sections, out), encoding="utf-8")
    return Report(out, html_path, md_path, figures, tables, list(dirs), skipped, notes)


def _header(paths, dirs: list[Path], skipped: list[tuple[str, str]], notes: list[str]) -> Section:
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    section = Section("Inputs")
    section.text.append(f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from "
                        + ", ".join(f"`{p}`" for p in items) + f": {len(dirs)} runs loaded, {len(skipped)} skipped.")
    if skipped:
        section.tables.append((pd.DataFrame(skipped, columns=["skipped", "why"]), "Left out, and why."))
    if notes:
        section.tables.append((pd.DataFrame({"note": notes}), "Notes: what was dropped or could not be drawn."))
    return section


# -------------------------------------------------------------------------------------------------- rendering
CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 6px;
text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%;height:auto}figure{margin:1em 0}
figcaption,.caption{font-size:0.85em;color:#555}code{background:#f3f3f3;padding:0 3px}"""


def _inline(text: str) -> str:
    """Escaped text with `code` spans."""
    parts = str(text).split("`")
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


def _html_table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _cell(value) -> str:
    if isinstance(value, float):
        return _number(value)
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "—"
    return str(value)


def _html(title: str, header: Section, sections: list[Section]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in [header, *sections]:
        body.append(f"<h{section.level}>{html.escape(section.title)}</h{section.level}>")
        body += [f"<p>{_inline(t)}</p>" for t in section.text]
        for path, caption in section.figures:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{_inline(caption)}</figcaption></figure>")
        for frame, caption in section.tables:
            body.append(f'<p class="caption">{_inline(caption)}</p>{_html_table(frame)}')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pipes and newlines in cells escaped)."""
    def cell(value) -> str:
        return _cell(value).replace("|", "\\|").replace("\n", " ⏎ ")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |",
             "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _markdown(title: str, header: Section, sections: list[Section], out: Path) -> str:
    lines = [f"# {title}", ""]
    for section in [header, *sections]:
        lines += ["#" * section.level + " " + section.title, ""]
        for t in section.text:
            lines += [t, ""]
        for path, caption in section.figures:
            lines += [f"![{path.stem}]({path.relative_to(out).as_posix()})", "", f"*{caption}*", ""]
        for frame, caption in section.tables:
            lines += [f"*{caption}*", "", markdown_table(frame), ""]
    return "\n".join(lines)
