r'''``code``: a conditional binary constraint, :math:`P(x\mid c) = a(x\mid c)\,b(x, c)` with one :math:`Z_c` per prompt.

The code experiment of CDPG (Korbak et al. 2022): complete Python functions so that they compile,
staying as close as possible to the base model, with a partition function per prompt.

Prompts
    Function signatures and docstrings from the Python standard library of the running interpreter
    (``sysconfig.get_paths()["stdlib"]``; ``test``/``idlelib``/``lib2to3``/``encodings``/... skipped):
    every public module-level ``def`` with a docstring whose first paragraph is 10-300 characters
    without backslashes or triple quotes becomes ::

        def name(args):
            """First paragraph of the docstring."""

    (the arguments as ``ast.unparse`` writes them, with annotations and defaults; a multi-line
    paragraph keeps its lines, closing quotes on their own line), followed by the body's indentation,
    four spaces (``indent=false`` ends the prompt at the newline). Without the indentation the
    embedded SmolLM2-135M mostly takes the docstring for the whole function and goes on with prose or
    a Markdown fence at column 0 (0 of 64 samples compiled with a body); with it, 9 of 64 did.
    ``n_prompts`` of them (default 300) are drawn with ``random.Random(seed)`` from the candidates
    sorted by file and line, so the pool is fixed for a given Python version (the stdlib differs
    between versions). The candidates are parsed once and cached in ``$FDPG_CACHE/code_prompts/``.

Feature :math:`b` (``b``)
    The body is the prompt's unfinished last line (its indentation) followed by the completion, cut
    before its first non-blank line that starts at column 0 (the function has ended). Then
    ``compile(prompt + body, ..., "exec")`` must succeed, and the body must hold a statement line
    (not blank, not a comment): the prompt alone compiles (its docstring is a body), so without this
    rule stopping at once would satisfy :math:`b` (``allow_empty=true`` drops the rule). A completion
    cut by ``--max_new_tokens`` in the middle of a statement does not compile: the constraint asks for
    functions that end within the budget.

Feature ``pep8`` (metric-only by default)
    PEP 8 violations per line of the cut body, counted by ``pycodestyle`` with its default settings
    (79-column lines, its default ignore list) on the whole function and keeping the violations on
    body lines (a body that does not tokenize, e.g. an unclosed bracket, gets pycodestyle's one E901);
    0 for an empty body. With ``style=W > 0`` it also enters the target as
    :math:`e^{-W\cdot\mathrm{pep8}}` (an exponential-family factor: fewer violations preferred).

Options: ``n_prompts=300``, ``seed=0``, ``style=0.0``, ``allow_empty=false``, ``indent=true``.
Metrics: ``score/compile_rate`` (:math:`E_\pi[b]`) and ``score/pep8_per_line`` (mean over samples).
'''

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import sys
import sysconfig
import warnings
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import torch

from objectives import ExponentialFamily, Target, binary_constraint
from tasks.base import Task, TaskSpec, fdpg_cache_root, parse_options, require

SKIPPED_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip",
                          "turtledemo", "__pycache__", "pydoc_data", "encodings", "__phello__"})
MIN_DOC, MAX_DOC = 10, 300
BODY_INDENT = "    "
PROMPTS_VERSION = 1  # bump when the prompt format changes (invalidates the cached candidates)


# ---------------------------------------------------------------------------------------------- prompts
def _prompt_for(node: ast.FunctionDef) -> str | None:
    doc = ast.get_docstring(node, clean=True)
    if not doc:
        return None
    paragraph = doc.strip().split("\n\n")[0].strip()
    if not MIN_DOC <= len(paragraph) <= MAX_DOC or "\\" in paragraph or '"""' in paragraph or paragraph.endswith('"'):
        return None
    lines = [line.rstrip() for line in paragraph.splitlines()]
    if len(lines) == 1:
        doc_block = f'    """{lines[0]}"""\n'
    else:
        rest = "".join(f"    {line}\n" if line else "\n" for line in lines[1:])
        doc_block = f'    """{lines[0]}\n{rest}    """\n'
    prompt = f"def {node.name}({ast.unparse(node.args)}):\n{doc_block}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile(prompt, "<prompt>", "exec")
    except (SyntaxError, ValueError):
        return None
    return prompt


def stdlib_sources(root: str | None = None) -> list[Path]:
    """The standard library's ``.py`` files (sorted; test suites and tool directories skipped)."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise FileNotFoundError(f"the Python standard library sources are not at {base}: the code task needs them")
    files: list[Path] = []
    for directory, dirs, names in os.walk(base):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith("config-"))
        files.extend(Path(directory) / n for n in sorted(names) if n.endswith(".py"))
    return files


@lru_cache(maxsize=4)
def _all_candidates(root: str | None) -> tuple[str, ...]:
    """Every candidate prompt of the stdlib at ``root``; parsed once, then cached as JSON in the fdpg cache
    (keyed by the interpreter version and the path: parsing ~450 files takes seconds)."""
    base = str(Path(root or sysconfig.get_paths()["stdlib"]).resolve())
    key = hashlib.sha256(json.dumps([PROMPTS_VERSION, sys.version, base, MIN_DOC, MAX_DOC]).encode()).hexdigest()[:12]
    cache = fdpg_cache_root() / "code_prompts" / f"stdlib-{key}.json"
    try:
        return tuple(json.loads(cache.read_text()))
    except (OSError, ValueError):
        pass
    out = _parse_candidates(base)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(out))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache only costs the parse next time
    return tuple(out)


def _parse_candidates(root: str) -> list[str]:
    out: list[str] = []
    for path in stdlib_sources(root):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                prompt = _prompt_for(node)
                if prompt is not None:
                    out.append(prompt)
    return out


def stdlib_prompts(n: int = 300, seed: int = 0, root: str | None = None) -> list[str]:
    """``n`` function prompts drawn deterministically (``random.Random(seed)``) from the stdlib's sources."""
    candidates = list(dict.fromkeys(_all_candidates(root)))  # drop exact duplicates, keep order
    if not candidates:
        raise FileNotFoundError("no function with a docstring found in the Python standard library sources")
    return random.Random(seed).sample(candidates, min(n, len(candidates)))


# ---------------------------------------------------------------------------------------------- features
def function_body(completion: str) -> str:
    """``completion`` cut before its first non-blank line that starts at column 0 (the function ended)."""
    kept = []
    for line in completion.split("\n"):
        if line.strip() and not line[0].isspace():
            break
        kept.append(line)
    return "\n".join(kept)


def _has_statement(body: str) -> bool:
    return any(line.strip() and not line.strip().startswith("#") for line in body.split("\n"))


def split_source(prompt: str, completion: str) -> tuple[str, str]:
    """(the prompt's complete lines, the cut body): a prompt's unfinished last line (e.g. the body's
    indentation) starts the body's first line; a first line left blank loses that indentation (which
    the model did not write: no PEP 8 W293 for it)."""
    head = prompt[:prompt.rfind("\n") + 1]
    body = function_body(prompt[len(head):] + completion)
    first, newline, rest = body.partition("\n")
    return head, (newline + rest if not first.strip() else body)


def compiles(prompt: str, completion: str, allow_empty: bool = False) -> bool:
    """:math:`b`: ``prompt`` + the cut body compiles (and the body has a statement unless ``allow_empty``)."""
    head, body = split_source(prompt, completion)
    if not allow_empty and not _has_statement(body):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning (invalid escapes, "is" with a literal): still compiles
            compile(head + body + "\n", "<completion>", "exec")
    except (SyntaxError, ValueError, MemoryError, RecursionError, OverflowError):
        return False
    return True


@lru_cache(maxsize=1)
def _style_guide():
    """pycodestyle's default style guide and a report class that records the line of each violation."""
    require("pycodestyle", "pip install pycodestyle")
    import pycodestyle

    class Collect(pycodestyle.BaseReport):
        def __init__(self, options) -> None:
            super().__init__(options)
            self.line_numbers: list[int] = []

        def error(self, line_number, offset, text, check):
            code = super().error(line_number, offset, text, check)
            if code:
                self.line_numbers.append(line_number)
            return code

    return pycodestyle.StyleGuide(quiet=True), Collect


def pep8_violations(source: str, first_line: int = 1) -> int:
    """``pycodestyle`` violations (default settings) of ``source`` on lines ``>= first_line`` (1-based)."""
    import pycodestyle

    style, collect = _style_guide()
    report = collect(style.options)
    lines = source.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    pycodestyle.Checker(filename="<completion>", lines=lines, options=style.options, report=report).check_all()
    return sum(n >= first_line for n in report.line_numbers)


def pep8_per_line(prompt: str, completion: str) -> float:
    """PEP 8 violations per line of the cut body (0.0 for an empty body)."""
    head, body = split_source(prompt, completion)
    body = body.rstrip()
    if not body.strip():
        return 0.0
    return pep8_violations(head + body + "\n", first_line=head.count("\n") + 1) / len(body.split("\n"))


def code_metrics(features: Mapping[str, torch.Tensor]) -> dict[str, float]:
    out = {"score/compile_rate": float(features["b"].double().mean())}
    if "pep8" in features:
        out["score/pep8_per_line"] = float(features["pep8"].double().mean())
    return out


class CodeTask(Task):
    name = "code"
    description = ("compilable Python from stdlib signatures+docstrings: P(x|c) = a * b(x,c), b = compiles "
                   "(one Z per prompt); PEP 8 violations per line reported")
    defaults = {"divergence": "fkl", "max_new_tokens": 64}
    options = {"n_prompts": 300, "seed": 0, "style": 0.0, "allow_empty": False, "indent": True}

    def build(self, beta: float, options: Mapping[str, str], prompts: Sequence[str] | None = None) -> TaskSpec:
        opts = parse_options(self.name, options, self.options)
        _style_guide()  # fail early, with the install command, if pycodestyle is missing
        if opts["n_prompts"] < 1:
            raise ValueError(f"task 'code': n_prompts must be positive, got {opts['n_prompts']}")
        if opts["style"] < 0:
            raise ValueError(f"task 'code': style must be >= 0 (0 = PEP 8 only reported), got {opts['style']}")
        pool = list(prompts) if prompts else stdlib_prompts(opts["n_prompts"], opts["seed"])
        if opts["indent"] and not prompts:
            pool = [p + BODY_INDENT for p in pool]
        allow_empty = opts["allow_empty"]

        def scorer(completions: list[str], prompts: list[str]) -> dict[str, torch.Tensor]:
            return {
                "b": torch.tensor([float(compiles(p, c, allow_empty)) for c, p in zip(completions, prompts)],
                                  dtype=torch.float64),
                "pep8": torch.tensor([pep8_per_line(p, c) for c, p in zip(completions, prompts)],
                                     dtype=torch.float64),
            }

        target = binary_constraint("b")
        if opts["style"] > 0:
            target = target * Target((ExponentialFamily({"pep8": -opts["style"]}),))
        return TaskSpec(
            prompts=pool,
            scorer=scorer,
            target=target.as_conditional(),
            metrics=code_metrics,
            defaults=dict(self.defaults),
            notes=[f"{len(pool)} prompts" + ("" if prompts else f" from {sysconfig.get_paths()['stdlib']}")],
        )
