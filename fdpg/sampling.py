r"""Sampling completions and recording their per-token log-probabilities (the scoring pass: ``fdpg.log_probs``).

By default sampling is *pure ancestral sampling* (temperature 1, no top-k, no top-p, no repetition
penalty), so the samples really come from :math:`\pi_\theta` and :math:`q = \pi_\theta`. A temperature
or top-p is an explicit option; the proposal :math:`q` is then the processed distribution, its
log-probabilities are recorded, and the trainer corrects with importance weights :math:`\pi/q`.

Each call to ``generate`` is seeded (``seed``), so a run's samples depend on the seed, the step and
the position of the chunk in the global batch, not on the number of processes. The tokens are drawn, and
their log-probabilities recorded, by a logits processor (:class:`DrawAndRecord`: one uniform per row and
step, no per-step logits kept), not by ``generate``'s own sampler.

On the CPU in fp32 the linear layers run through oneDNN on prepacked weights while sampling
(:func:`fdpg.onednn_linears.onednn_linears`, LoRA merged): a decode step's products have one row per sequence,
where MKL is slow (a whole 16 x 48-token ``generate`` of SmolLM2-135M with LoRA on a 2-core AVX2 EPYC: 10.4 ->
8.8 s). The logits agree to fp32 rounding (~1e-6), so a rare token drawn near a boundary of the inverse CDF can
differ from MKL's.

A completion ends at its first end-of-sequence token, which it includes (the model chose to stop;
that choice has a probability too); later positions are masked out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from fdpg.onednn_linears import onednn_linears


@dataclass
class SampleBatch:
    r"""Completions and everything the trainer needs about them (one row per sample).

    Attributes:
        prompts: prompt text per sample (``""`` for unconditional generation).
        prompt_ids, prompt_mask: ``[B, P]`` left-padded prompt tokens.
        completion_ids, completion_mask: ``[B, T]`` right-padded completion tokens (mask 1 up to and
            including the first end-of-sequence token).
        texts: decoded completions (special tokens removed).
        token_log_q: ``[B, T]`` log-probability of each completion token under the proposal that
            sampled it (0 where masked).
        token_log_pi: ``[B, T]`` the same under the unprocessed model distribution :math:`\pi` of the
            sampling weights (equal to ``token_log_q`` for pure sampling).
        final_hidden: ``[B, T, D]`` the last layer's hidden state :math:`h_t` that predicted each completion
            token during sampling (0 where masked), when it was asked for (``record_hidden``); else ``None``.
    """

    prompts: list[str]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    token_log_q: torch.Tensor
    token_log_pi: torch.Tensor
    final_hidden: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def from_token_rows(cls, prompts: Sequence[str], prompt_rows: Sequence[Sequence[int]],
                        completion_rows: Sequence[Sequence[int]], texts: Sequence[str], pad_token_id: int
                        ) -> SampleBatch:
        """A batch of given token rows (preference pairs, demonstrations): prompts left-padded, completions
        right-padded, the log-prob columns 0 (nothing was sampled)."""
        p, t = max(map(len, prompt_rows)), max(map(len, completion_rows))
        prompt_ids = torch.tensor([[pad_token_id] * (p - len(r)) + list(r) for r in prompt_rows], dtype=torch.long)
        prompt_mask = torch.tensor([[0] * (p - len(r)) + [1] * len(r) for r in prompt_rows], dtype=torch.long)
        completion_ids = torch.tensor([list(r) + [pad_token_id] * (t - len(r)) for r in completion_rows],
                                      dtype=torch.long)
        completion_mask = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in completion_rows], dtype=torch.long)
        zeros = torch.zeros(completion_ids.shape, dtype=torch.float32)
        return cls(list(prompts), prompt_ids, prompt_mask, completion_ids, completion_mask, list(texts), zeros, zeros)

    @property
    def log_q(self) -> torch.Tensor:
        return self.token_log_q.sum(-1)

    @property
    def log_pi(self) -> torch.Tensor:
        return self.token_log_pi.sum(-1)

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def slice(self, start: int, stop: int) -> SampleBatch:
        """Rows ``start:stop``, trimmed of all-padding columns (less work in the forward pass)."""
        rows = {f.name: getattr(self, f.name) for f in fields(self)}
        return self._trimmed({k: None if v is None else v[start:stop] for k, v in rows.items()}, stop > start)

    def rows(self, index: torch.Tensor) -> SampleBatch:
        """The rows ``index`` (a 1-d tensor of row numbers, in that order), trimmed like :meth:`slice`."""
        def pick(value):
            if value is None:
                return None
            return value[index] if torch.is_tensor(value) else [value[int(i)] for i in index]
        picked = {f.name: pick(getattr(self, f.name)) for f in fields(self)}
        return self._trimmed(picked, len(index) > 0)

    @staticmethod
    def _trimmed(rows: dict, nonempty: bool) -> SampleBatch:
        prompt_keep = rows["prompt_mask"].any(0)
        first = int(prompt_keep.nonzero()[0]) if bool(prompt_keep.any()) else rows["prompt_mask"].shape[1] - 1
        for name in ("prompt_ids", "prompt_mask"):
            rows[name] = rows[name][:, first:]
        width = max(int(rows["completion_mask"].sum(-1).max()), 1) if nonempty else 1
        for name in ("completion_ids", "completion_mask", "token_log_q", "token_log_pi", "final_hidden"):
            if rows[name] is not None:
                rows[name] = rows[name][:, :width]
        return SampleBatch(**rows)

    @staticmethod
    def concat(batches: Sequence[SampleBatch], pad_token_id: int) -> SampleBatch:
        """Stack batches with different paddings (prompts re-padded left, completions right)."""
        if len(batches) == 1:
            return batches[0]
        p = max(b.prompt_ids.shape[1] for b in batches)
        t = max(b.completion_ids.shape[1] for b in batches)

        def left(x: torch.Tensor, value: float) -> torch.Tensor:
            return F.pad(x, (p - x.shape[1], 0), value=value)

        def right(x: torch.Tensor, value: float) -> torch.Tensor:
            return F.pad(x, (0, t - x.shape[1]), value=value)

        return SampleBatch(
            prompts=[s for b in batches for s in b.prompts],
            prompt_ids=torch.cat([left(b.prompt_ids, pad_token_id) for b in batches]),
            prompt_mask=torch.cat([left(b.prompt_mask, 0) for b in batches]),
            completion_ids=torch.cat([right(b.completion_ids, pad_token_id) for b in batches]),
            completion_mask=torch.cat([right(b.completion_mask, 0) for b in batches]),
            texts=[s for b in batches for s in b.texts],
            token_log_q=torch.cat([right(b.token_log_q, 0.0) for b in batches]),
            token_log_pi=torch.cat([right(b.token_log_pi, 0.0) for b in batches]),
            final_hidden=None if any(b.final_hidden is None for b in batches)
            else torch.cat([F.pad(b.final_hidden, (0, 0, 0, t - b.final_hidden.shape[1])) for b in batches]),
        )


def eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token id that ends a completion (the model's generation config may list several)."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


def prompt_token_rows(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt's token ids (special tokens added); an empty prompt becomes the BOS (or EOS) token alone."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
        rows.append(list(ids) if ids else [start])
    return rows


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask of :func:`prompt_token_rows`."""
    rows = prompt_token_rows(tokenizer, prompts)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return input_ids, mask


def completion_mask_from_eos(completion_ids: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """1 for every token up to and including the first end-of-sequence token, 0 after it."""
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= completion_ids == e
    ended_before = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return (~ended_before).long()


def pure_sampling_config(max_new_tokens: int, pad_token_id: int, eos_ids: Sequence[int]) -> GenerationConfig:
    """The ``generate`` config of :func:`sample_completions`: no processing of the model's distribution.

    Decoding is "greedy" over the point mass that :class:`DrawAndRecord` (the only logits processor) returns,
    so the token taken is the one it drew from the model's distribution (or the proposal's).
    """
    return GenerationConfig(
        do_sample=False,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        max_new_tokens=max_new_tokens,
        num_beams=1,
        pad_token_id=pad_token_id,
        eos_token_id=list(eos_ids),
        return_dict_in_generate=False,
    )


def draw_by_inverse_cdf(probs: torch.Tensor, block: int = 256) -> torch.Tensor:
    r"""One index per row of ``probs`` (``[B, V]``, non-negative rows), drawn exactly by inverse CDF.

    One uniform :math:`u \sim U[0, S)` per row from the current torch RNG, with :math:`S = \sum_i p_i`, and
    the index :math:`i` with :math:`\sum_{j<i} p_j \le u < \sum_{j \le i} p_j` (float64 sums). In two levels,
    which finds the same index as one cumulative sum over the vocabulary (up to float64 rounding) at a tenth
    of its cost on a CPU (a sequential ``cumsum`` over 16 x 49k values takes ~4.5 ms): the cumulative sum of
    the ``block``-sized block sums picks the block, then the cumulative sum inside that block picks the index.
    An index of zero probability is never returned.
    """
    rows, vocab = probs.shape
    padded = F.pad(probs, (0, -vocab % block)) if vocab % block else probs
    blocks = padded.reshape(rows, -1, block)
    mass = blocks.sum(-1, dtype=torch.float64)  # [B, blocks]
    cdf = mass.cumsum(-1)
    u = torch.rand(rows, 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    k = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)  # the block: mass[k] > 0
    inside = blocks[torch.arange(rows, device=probs.device), k.squeeze(-1)]  # [B, block]
    offset = cdf.gather(-1, k) - mass.gather(-1, k)
    j = torch.searchsorted(inside.cumsum(-1, dtype=torch.float64), u - offset, right=True)
    # u can exceed the in-block sum by float64 rounding: then take the block's last index of positive mass.
    last = torch.where(inside > 0, torch.arange(block, device=probs.device), -1).amax(-1, keepdim=True)
    return (k * block + torch.minimum(j, last)).squeeze(-1)


class DrawAndRecord(LogitsProcessor):
    r"""Draws each next token itself and records its log-probabilities; hands ``generate`` a point mass.

    ``generate(do_sample=True)`` draws with ``torch.multinomial``, which on a CPU makes one exponential variate
    per vocabulary entry (a sequential generator loop over B·V values, ~15 ms a step for 16 x 49k), and keeping
    the per-step logits to score the tokens afterwards (``output_logits``) holds B·T·V floats. Instead this
    processor (the last one, with ``do_sample=False``) turns the raw logits into :math:`\log\pi` and, when a
    temperature or top-p is set, the proposal's :math:`\log q` (the same warpers ``generate`` would apply),
    draws the token from :math:`q` by inverse CDF (one uniform per row), records both log-probabilities of
    it, and returns 0 for that token and -inf elsewhere, so that greedy decoding takes exactly that token.
    """

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, min_new_tokens: int = 0,
                 eos_ids: Sequence[int] = ()):
        if min_new_tokens and not eos_ids:
            raise ValueError("min_new_tokens needs the end-of-sequence token ids to bar")
        self.min_new_tokens, self.eos_ids = min_new_tokens, list(eos_ids)
        warpers = []
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p, min_tokens_to_keep=1))
        self.warpers = LogitsProcessorList(warpers)
        self.log_pi: list[torch.Tensor] = []
        self.log_q: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float()
        barred = len(self.log_pi) < self.min_new_tokens  # end-of-sequence is not drawn before min_new_tokens
        processed = bool(self.warpers) or barred
        warped = self.warpers(input_ids, logits.clone()) if self.warpers else logits.clone() if barred else logits
        if barred:
            warped[:, self.eos_ids] = -math.inf
        tokens = draw_by_inverse_cdf(torch.softmax(warped, -1))[:, None]
        self.log_pi.append(_chosen_log_prob(logits, tokens))
        self.log_q.append(_chosen_log_prob(warped, tokens) if processed else self.log_pi[-1])
        return torch.full_like(scores, -math.inf).scatter_(-1, tokens, 0.0)

    def recorded(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, steps]`` log pi and log q of the drawn tokens (steps beyond the recorded ones: 0)."""
        def stack(xs: list[torch.Tensor]) -> torch.Tensor:
            out = torch.stack(xs[:steps], dim=1)
            return F.pad(out, (0, steps - out.shape[1]))
        return stack(self.log_pi), stack(self.log_q)


def _chosen_log_prob(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[tokens]`` per row; masked-out (-inf) entries give 0, not NaN."""
    log_probs = logits.gather(-1, tokens).squeeze(-1) - torch.logsumexp(logits, -1)
    return torch.nan_to_num(log_probs, nan=0.0, neginf=0.0)


def sample_completions(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    seed: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    record_hidden: bool = False,
    min_new_tokens: int = 0,
) -> SampleBatch:
    """Sample one completion per prompt with a seeded ``generate`` call; see the module docstring.

    With ``record_hidden`` the batch also keeps ``final_hidden``, the last layer's hidden state at each decode step
    (what a value head on the policy reads: PPO's :math:`V_{old}(s_t)` then needs no second forward pass). It
    equals the training forward's :math:`h_t` up to the rounding of the cached, (oneDNN-)merged decode.
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    eos = eos_token_ids(model, tokenizer)
    config = pure_sampling_config(max_new_tokens, tokenizer.pad_token_id, eos)
    if record_hidden:
        config.output_hidden_states = config.return_dict_in_generate = True
    draw = DrawAndRecord(temperature, top_p, min_new_tokens, eos)
    devices = [device] if device.type == "cuda" else []
    fast_linears = onednn_linears(model, prepack_rows=len(prompts))
    with torch.random.fork_rng(devices=devices), torch.inference_mode(), fast_linears:
        torch.manual_seed(seed)
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                             logits_processor=LogitsProcessorList([draw]))
    sequences = out.sequences if record_hidden else out
    # Clone out of inference mode: these tensors later index the training forward pass.
    completion_ids = sequences[:, prompt_ids.shape[1]:].clone()
    mask = completion_mask_from_eos(completion_ids, eos)
    token_log_pi, token_log_q = (x.clone() * mask for x in draw.recorded(completion_ids.shape[1]))
    if temperature == 1.0 and top_p == 1.0 and not min_new_tokens:
        token_log_q = token_log_pi
    texts = tokenizer.batch_decode(completion_ids * mask + tokenizer.pad_token_id * (1 - mask),
                                   skip_special_tokens=True)
    hidden = None
    if record_hidden:  # per decode step, the last layer's states; the last position is the one that predicted
        hidden = torch.stack([layers[-1][:, -1] for layers in out.hidden_states], dim=1).float().clone()
        hidden = F.pad(hidden, (0, 0, 0, completion_ids.shape[1] - hidden.shape[1])) * mask[..., None]
    return SampleBatch(list(prompts), prompt_ids, prompt_mask, completion_ids, mask, texts,
                       token_log_q.float(), token_log_pi.float(), hidden)
