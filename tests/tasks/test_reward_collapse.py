"""The reward-collapse experiment (:mod:`tasks.reward_collapse`): its data from a (fake) standard library, and the
whole command on a tiny random encoder (two runs, curves, distances, plots)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from fdpg.commands.reward_model import cmd_reward_collapse
from fdpg.rankings import rankings_from_rows, split_by_prompt
from tasks.reward_collapse import (
    build_collapse_rankings,
    distances,
    group_curves,
    response_lengths,
    stdlib_docstrings,
)

WORDS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st", "uv", "wx"]


def words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture
def fake_stdlib(tmp_path: Path) -> Path:
    """Six modules, each with a long module docstring and a long method docstring, and short ones besides."""
    rng = random.Random(0)
    root = tmp_path / "stdlib"
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()  # skipped, as in tasks.codegen
    (root / "test" / "test_x.py").write_text(f'"""{words(30, rng)}"""\n')
    for i in range(6):
        path = root / ("pkg" if i % 2 else ".") / f"mod{i}.py"
        path.write_text(f'"""{words(20 + i, rng)}\n\n{words(5, rng)}"""\n\n'
                        f'def short():\n    """{words(3, rng)}"""\n\n'
                        f'class C{i}:\n    def method(self):\n        """{words(18, rng)}"""\n')
    return root


def test_the_corpus_and_the_rankings(fake_stdlib: Path) -> None:
    docs = stdlib_docstrings(str(fake_stdlib), min_words=15)
    names = [n for n, _ in docs]
    assert len(docs) == 12 and "mod0" in names and "pkg.mod1.C1.method" in names
    assert not any("short" in n or "test" in n for n in names)
    assert all(len(text.split()) >= 15 for _, text in docs)
    assert stdlib_docstrings(str(fake_stdlib), min_words=24) == [(n, t) for n, t in docs if len(t.split()) >= 24]

    assert response_lengths(80, 8, "open") == [10, 20, 30, 40, 50, 60, 70, 80]
    assert response_lengths(80, 8, "closed") == [8, 11, 13, 16, 64, 69, 75, 80]
    with pytest.raises(ValueError, match="7 words are too few for 8 distinct open-ended lengths"):
        response_lengths(7, 8, "open")
    closed_small = response_lengths(12, 8, "closed")  # rounding ties forced apart
    assert all(b > a for a, b in zip(closed_small, closed_small[1:])) and closed_small[-1] <= 12

    rows = build_collapse_rankings(docs, n_prompts=10, n=8, max_words=16, seed=1)
    assert len(rows) == 10 and sorted(r["kind"] for r in rows) == ["closed"] * 5 + ["open"] * 5
    for r in rows:
        assert r["prompt"].startswith(f"[{r['kind']}] Document ")
        assert len(r["responses"]) == 8 and len(set(r["responses"])) == 8
        lengths = [len(x.split()) for x in r["responses"]]
        assert lengths == r["lengths"] and all(a > b for a, b in zip(lengths, lengths[1:]))  # longer ranked higher
        assert all(r["responses"][0].startswith(x) for x in r["responses"])  # truncations of one text
        assert lengths == response_lengths(lengths[0], 8, r["kind"])[::-1]
    assert build_collapse_rankings(docs, 10, 8, 16, seed=1) == rows
    # the prompts a reward-model run holds out (same seed and fraction) are half open-ended, half closed-ended
    for fraction, seed in ((0.4, 1), (0.3, 4), (0.5, 2)):
        rows = build_collapse_rankings(docs, 11, 8, 16, seed=seed, heldout_fraction=fraction)
        _, held = split_by_prompt(rankings_from_rows(rows), fraction, seed)
        kinds = [rows[g]["kind"] for g in held]
        assert abs(kinds.count("open") - kinds.count("closed")) <= 1 and len(held) == round(11 * fraction)
        assert [r["kind"] for r in rows].count("open") == 5
    assert build_collapse_rankings(docs, 10, 8, 16, seed=2) != rows
    with pytest.raises(ValueError, match="only 12 long docstrings.*fewer than --n_prompts 20"):
        build_collapse_rankings(docs, 20)


def test_curves_and_distances() -> None:
    records = [{"step": 1, "prompt": "a", "rewards": [0.1, 0.9, 0.5]}, {"step": 1, "prompt": "b", "rewards": [1, 0, 0]},
               {"step": 2, "prompt": "a", "rewards": [0.2, 0.3, 0.4]}, {"step": 1, "prompt": "?", "rewards": [0, 0, 0]}]
    curves = group_curves(records, {"a": "open", "b": "closed"})
    np.testing.assert_allclose(curves[1]["open"], [[0.9, 0.5, 0.1]])
    np.testing.assert_allclose(curves[1]["closed"], [[1, 0, 0]])
    assert set(curves[2]) == {"open"} and set(distances(curves[2]).values()) == {None}
    same = {"open": np.array([[0.1, 0.5]]), "closed": np.array([[0.5, 0.1]])}
    assert set(distances(same).values()) == {0.0}
    apart = distances({"open": np.array([[0.0, 0.1]]), "closed": np.array([[0.9, 1.0]])})
    assert apart["ks"] == 1.0 and apart["wasserstein"] == pytest.approx(0.9)
    assert apart["ks_normalized"] == 0.0  # the same shape at other levels
    shapes = distances({"open": np.array([[1.0, 0.5, 0.0]]), "closed": np.array([[0.75, 0.5, 0.25]])})
    assert shapes["ks_normalized"] == 0.0 and shapes["ks"] == pytest.approx(1 / 3)


@pytest.mark.slow
def test_the_command_trains_both_reward_models_and_plots(fake_stdlib, tiny_bert_dir, tmp_path, capsys) -> None:
    bert = tiny_bert_dir
    out = tmp_path / "collapse"
    argv = ["--output_dir", str(out), "--stdlib", str(fake_stdlib), "--min_words", "15", "--max_words", "16",
            "--n_prompts", "12", "--model", str(bert), "--steps", "3", "--eval_every", "2", "--batch_size", "2",
            "--micro_batch_size", "2", "--learning_rate", "1e-2", "--heldout_fraction", "0.5", "--progress", "false"]
    assert cmd_reward_collapse(argv) == 0
    printed = capsys.readouterr().out
    assert "fixed" in printed and "prompt_aware" in printed and "KS(open, closed)" in printed

    rows = [json.loads(line) for line in (out / "data" / "rankings.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    for which in ("fixed", "prompt_aware"):
        config = json.loads((out / which / "config.json").read_text())["config"]
        assert config["bounded"] and config["log_heldout_rewards"]
        assert (out / which / "final" / "reward_model.json").is_file()
    assert json.loads((out / "prompt_aware" / "config.json").read_text())["config"]["utilities"] == \
        "open=neg_power:1,closed=linear"
    curves = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    assert {(c["utility"], c["step"]) for c in curves} == {(u, s) for u in ("fixed", "prompt_aware") for s in (1, 2, 3)}
    assert all(len(c["curve"]) == 8 and c["curve"] == sorted(c["curve"], reverse=True) for c in curves)
    assert all(0 <= v <= 1 for c in curves for v in c["curve"])
    lines = [json.loads(line) for line in (out / "distances.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(0 <= x["ks"] <= 1 and x["wasserstein"] >= 0 for x in lines)
    for name in ("collapse.png", "distance.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "collapse.json").read_text())
    assert summary["optimal_rewards"]["prompt_aware"]["closed"] == [1.0] * 4 + [0.0] * 4  # linear, even n
    open_optimum = summary["optimal_rewards"]["prompt_aware"]["open"]
    assert open_optimum[0] == 1.0 and open_optimum[-1] == 0.0 and len(set(np.round(open_optimum, 6))) == 8
    assert summary["runs"]["fixed"]["last_step"] == 3

    # run again: the finished runs are kept, nothing is retrained
    assert cmd_reward_collapse(argv) == 0
    assert "has finished already" in capsys.readouterr().err
    assert not (out / "fixed-2").exists() and not (out / "prompt_aware-2").exists()
