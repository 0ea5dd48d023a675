"""``code``: stdlib prompts, the truncation rule, compilation, PEP 8 counts, and a 2-step run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tasks import get_task
from tasks.codegen import compiles, function_body, pep8_per_line, pep8_violations, split_source, stdlib_prompts

PROMPT = 'def add_one(x):\n    """Return x plus one."""\n'


def test_stdlib_prompts_are_deterministic_compilable_functions() -> None:
    prompts = stdlib_prompts(50, seed=0)
    assert len(prompts) == 50 and len(set(prompts)) == 50
    assert prompts == stdlib_prompts(50, seed=0)
    assert prompts != stdlib_prompts(50, seed=1)
    for p in prompts:
        assert p.startswith("def ") and p.endswith('"""\n')
        assert '"""' in p.split("\n")[1]
        compile(p, "<prompt>", "exec")


FAKE_MODULE = '''
def first(a, b=2, *args, key: int = 0):
    """Add things together."""
    return a


def second(x):
    """Summary line that goes on
    over two lines.

    Details that are not part of the prompt.
    """


def _private(x):
    """Private helper, skipped."""


def undocumented(x):
    return x


def escaped(x):
    """Has a \\ backslash."""


class Thing:
    def method(self):
        """Methods are skipped."""
'''


def test_prompt_extraction_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.codegen as codegen

    root = tmp_path / "stdlib"
    (root / "test").mkdir(parents=True)
    (root / "mod.py").write_text(FAKE_MODULE)
    (root / "test" / "test_mod.py").write_text('def test_x():\n    """A test, skipped."""\n')
    (root / "broken.py").write_text("def (:\n")
    monkeypatch.setenv("FDPG_CACHE", str(tmp_path / "cache"))
    codegen._all_candidates.cache_clear()
    prompts = stdlib_prompts(10, root=str(root))
    assert sorted(prompts) == [
        'def first(a, b=2, *args, key: int=0):\n    """Add things together."""\n',
        'def second(x):\n    """Summary line that goes on\n    over two lines.\n    """\n',
    ]
    cached = list((tmp_path / "cache" / "code_prompts").glob("stdlib-*.json"))
    assert len(cached) == 1
    codegen._all_candidates.cache_clear()
    (root / "mod.py").unlink()  # served from the cache now
    assert sorted(stdlib_prompts(10, root=str(root))) == sorted(prompts)
    codegen._all_candidates.cache_clear()


def test_truncation_at_the_first_line_back_at_column_zero() -> None:
    completion = "    y = x + 1\n\n    return y\nprint(add_one(2))\n    junk("
    assert function_body(completion) == "    y = x + 1\n\n    return y"
    assert function_body("    return x\n# a comment at column 0\n") == "    return x"
    assert function_body("") == ""


@pytest.mark.parametrize(("completion", "expected"), [
    ("    return x + 1\n", True),
    ("    return x + 1\nthis is not python at all (((\n", True),  # cut before the dedented line
    ("    y = x + 1\n\n    return y", True),
    ("    return x +\n", False),
    ("    return (x\n", False),
    ("      return x\n  y = 1\n", False),  # inconsistent dedent
    ("", False),  # no statement: the prompt alone compiles, but an empty body does not count
    ("    # only a comment\n", False),
    ("    pass\n", True),
    ("    return x\x00\n", False),  # null byte: ValueError, not a crash
])
def test_compiles(completion: str, expected: bool) -> None:
    assert compiles(PROMPT, completion) is expected


def test_prompt_ending_with_the_body_indentation() -> None:
    indented = PROMPT + "    "
    assert split_source(indented, "return x\nprint(1)") == (PROMPT, "    return x")
    assert split_source(indented, "\n    return x") == (PROMPT, "\n    return x")  # blank first line: no W293
    assert compiles(indented, "return x + 1\n") and compiles(indented, "\n    return x\n")
    assert not compiles(indented, "\n") and not compiles(indented, "```python\n")
    assert not compiles(indented, "return x +")
    assert pep8_per_line(indented, "\n    y = x + 1\n    return y\n") == 0.0
    assert pep8_per_line(indented, "return  x\n") == 1.0


def test_allow_empty_body() -> None:
    assert compiles(PROMPT, "", allow_empty=True)
    assert not compiles(PROMPT, "    return x +", allow_empty=True)


def test_pep8_counts_on_known_snippets() -> None:
    bad = "def f( a,b ):\n    x=a+b\n    return  x\n"
    # E201 after '(', E231 after ',', E202 before ')', E225 around '=', E271 after 'return'
    assert pep8_violations(bad) == 5
    assert pep8_violations("def f(a, b):\n    return a + b\n") == 0
    # body only: the prompt's own violations do not count
    long_prompt = 'def f(x):\n    """' + "a" * 90 + '"""\n'
    assert pep8_violations(long_prompt) == 1  # E501
    assert pep8_per_line(long_prompt, "    return x\n") == 0.0
    assert pep8_per_line(PROMPT, "    y=x+1\n    return  y\n") == pytest.approx(1.0)  # E225, E271: 2 / 2 lines
    assert pep8_per_line(PROMPT, "    y = x + 1\n    return y\n") == 0.0
    assert pep8_per_line(PROMPT, "") == 0.0
    assert pep8_per_line(PROMPT, "    return (x,\n") == 1.0  # a tokenize error is one violation (E901)


def test_spec_target_and_metrics() -> None:
    spec = get_task("code").build(0.1, {"n_prompts": "20"})
    assert len(spec.prompts) == 20 and spec.target.conditional and spec.target.features == ("b",)
    assert all(p.endswith('"""\n    ') for p in spec.prompts)
    assert all(p.endswith('"""\n') for p in get_task("code").build(0.1, {"n_prompts": "20", "indent": "false"}).prompts)
    feats = spec.scorer(["    return x + 1\n", "    return x +\n"], [PROMPT, PROMPT])
    assert feats["b"].tolist() == [1.0, 0.0]
    assert spec.metrics(feats) == {"score/compile_rate": 0.5, "score/pep8_per_line": 0.0}
    styled = get_task("code").build(0.1, {"style": "2"}, [PROMPT])
    assert styled.target.features == ("b", "pep8")
    log_p = styled.target.log_P(torch.zeros(3), {"b": torch.tensor([1.0, 1.0, 0.0]),
                                                 "pep8": torch.tensor([0.0, 0.5, 0.0])})
    assert log_p.tolist()[:2] == pytest.approx([0.0, -1.0]) and log_p[2] == -math.inf
    with pytest.raises(ValueError, match="style must be"):
        get_task("code").build(0.1, {"style": "-1"})


@pytest.mark.slow
def test_two_steps_on_the_tiny_model(smoke_run) -> None:
    spec = get_task("code").build(0.1, {}, ['def f(x):\n    """one."""\n', 'def g():\n    """two."""\n'])
    metrics = smoke_run(spec, divergence="fkl")
    assert all(0 <= m["score/compile_rate"] <= 1 for m in metrics)
