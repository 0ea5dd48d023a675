r"""The lean floor of workload W: the f-DPG step's necessary phases as bare torch/transformers calls.

One step, in a straight loop, with nothing but what the algorithm needs:

1. ``generate`` (pure sampling: do_sample, temperature 1, top_k 0, top_p 1; the model's EOS), under
   ``inference_mode``;
2. decode + VADER compound (the reward);
3. one no-grad (``inference_mode``) reference forward over prompt + completion with the adapter disabled
   (W-full: a frozen copy), LM head only on the completion positions (``logits_to_keep``);
4. one policy forward + backward on prompt + completion: its log-probabilities, detached, are also
   :math:`\log\pi(x)` for the pseudo-reward (on-policy, eval mode: the very distribution that was sampled),
   so no log-probabilities are collected during generation;
5. :math:`\log P = \log a + r/\beta`, per-prompt running :math:`\log Z`, reverse-KL pseudo-reward
   :math:`R = -(\log\pi - \log p) - 1`, leave-one-out baseline, REINFORCE loss, Adam step.

    python bench/floor.py [--full] [--steps 10] [--warmup 2] [--variant lean+tlin]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from contextlib import contextmanager, nullcontext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import BATCH, BETA, LORA_ALPHA, LORA_R, LORA_TARGETS, LR, MAX_NEW_TOKENS, MODEL, PROMPTS  # noqa: E402


def inverse_cdf_sample(logits, generator=None):
    """One token per row from softmax(logits), by inverse CDF: one uniform per row (exact sampling).

    ``torch.multinomial`` (what ``generate`` uses) draws an exponential variate for *every* vocabulary entry:
    on CPU that is a sequential Mersenne-twister loop of B*V draws (~14 ms a step for 16 x 49152).
    """
    import torch

    probs = torch.softmax(logits.float(), -1)
    cdf = torch.cumsum(probs, -1, dtype=torch.float64)
    u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


def lean_generate(model, p_ids, p_mask, max_new_tokens, eos, pad, trim=False):
    """Pure sampling with a KV cache in a plain loop; returns ``[B, T]`` completion ids (pad after EOS).

    ``trim``: drop the rows that have ended from the batch (and the cache), so that the remaining decoding
    steps work on the live rows only.
    """
    import torch
    from transformers import DynamicCache

    b = p_ids.shape[0]
    cache = DynamicCache(config=model.config)
    mask = p_mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=p_ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    next_pos = pos[:, -1:] + 1
    result = torch.full((b, max_new_tokens), pad, dtype=torch.long)
    rows = torch.arange(b)  # original row of each live row
    done = torch.zeros(b, dtype=torch.bool)
    for t in range(max_new_tokens):
        tok = inverse_cdf_sample(out.logits[:, -1])
        tok = torch.where(done, pad, tok)  # untrimmed: rows that ended keep decoding padding, as generate does
        result[rows, t] = tok
        done = done | (tok == eos)
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        if trim and bool(done.any()):
            keep = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            rows, tok, mask, next_pos, done = rows[keep], tok[keep], mask[keep], next_pos[keep], done[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, past_key_values=cache,
                    use_cache=True)
        next_pos = next_pos + 1
    return result


@contextmanager
def transposed_small_linears(model, max_rows: int = 64):
    """While decoding, compute every ``nn.Linear`` on at most ``max_rows`` rows as ``(W @ x^T)^T``.

    MKL's sgemm runs ``x @ W^T`` with few rows (16 while decoding) at ~90 GFLOP/s on this CPU and ~40 for the
    49k-row LM head, but the same product as ``W @ x^T`` at ~135 and ~80 (bench/README.md): same arithmetic,
    another operand layout. Inference only (the context restores the modules' own forward).
    """
    import torch
    import torch.nn.functional as F

    def make(mod):
        def forward(x):
            rows = x.numel() // x.shape[-1]
            if rows > max_rows:
                return F.linear(x, mod.weight, mod.bias)
            y = torch.mm(mod.weight, x.reshape(rows, x.shape[-1]).t()).t()
            if mod.bias is not None:
                y = y + mod.bias
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return forward

    mods = [m for m in model.modules() if type(m) is torch.nn.Linear]
    for m in mods:
        m.forward = make(m)
    try:
        yield
    finally:
        for m in mods:
            del m.forward


def _token_log_prob_class():
    import torch

    class TokenLogProb(torch.autograd.Function):
        """log_softmax(logits)[tokens]; backward builds g * (onehot - softmax) in one logits-sized buffer."""

        @staticmethod
        def forward(ctx, logits, tokens):
            lse = torch.logsumexp(logits, -1)
            ctx.save_for_backward(logits, lse, tokens)
            return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse

        @staticmethod
        def backward(ctx, grad):
            logits, lse, tokens = ctx.saved_tensors
            g = (logits - lse.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))
            return g.scatter_add_(-1, tokens.unsqueeze(-1), grad.unsqueeze(-1)), None

    return TokenLogProb


_TokenLogProb = _token_log_prob_class()


class Floor:
    """``step(i) -> {'time', 'tokens', phases...}``: one lean f-DPG step on W (or W-full)."""

    VARIANTS = ("generate", "lean", "trim", "tlin", "bf16", "bf16gen")

    def __init__(self, full: bool = False, variant: str = "generate", seed: int = 0):
        """``variant``: '+'-joined options. ``generate``: HF generate (torch.multinomial); ``lean``: the plain
        KV-cache loop with inverse-CDF draws; ``trim``: the lean loop drops ended rows; ``tlin``: decode with
        transposed small linears; ``bf16``: bf16 autocast in the reference and training passes (what fdpg's
        ``--mixed_precision bf16`` does); ``bf16gen``: bf16 autocast in generation too."""
        import copy

        import torch
        from peft import LoraConfig, get_peft_model

        from fdpg.models import load_causal_lm, load_tokenizer

        torch.manual_seed(seed)
        self.torch = torch
        self.tok = load_tokenizer(MODEL)
        self.tok.padding_side = "left"
        model = load_causal_lm(MODEL, dtype=torch.float32)
        self.full = full
        if full:
            self.ref = copy.deepcopy(model).requires_grad_(False).eval()
            self.model = model.eval()
        else:
            cfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                             target_modules=LORA_TARGETS.split(","), task_type="CAUSAL_LM", bias="none")
            self.model = get_peft_model(model, cfg).eval()
            self.ref = None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=LR)
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id
        opts = set(variant.split("+"))
        unknown = opts - set(self.VARIANTS)
        if unknown:
            raise ValueError(f"unknown floor variant options {sorted(unknown)}; choose from {self.VARIANTS}")
        self.variant = variant
        self.sampler = "lean" if opts & {"lean", "trim"} else "generate"
        self.trim, self.tlin = "trim" in opts, "tlin" in opts
        self.bf16, self.bf16_gen = "bf16" in opts, "bf16gen" in opts
        self.log_z: dict[str, float] = {}  # running log-mean-exp of log P - log q per prompt
        self.n_z: dict[str, int] = {}
        from tasks.sentiment import vader_compound

        self.reward_fn = vader_compound
        self.rng = __import__("random").Random(seed)

    def _autocast(self, on: bool | None = None):
        on = self.bf16 if on is None else on
        return self.torch.autocast("cpu", dtype=self.torch.bfloat16) if on else nullcontext()

    def _token_log_probs(self, model, ids, mask, pos, comp, comp_mask):
        t = comp.shape[1]
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=t + 1,
                       use_cache=False).logits[:, :-1].float()
        return _TokenLogProb.apply(logits, comp) * comp_mask

    def __call__(self, i: int) -> dict:
        torch = self.torch
        rec: dict = {}
        t0 = t = common.now()
        prompts = self.rng.sample(PROMPTS, BATCH) if len(PROMPTS) >= BATCH else self.rng.choices(PROMPTS, k=BATCH)
        enc = self.tok(prompts, return_tensors="pt", padding=True)
        p_ids, p_mask = enc["input_ids"], enc["attention_mask"]
        tlin = transposed_small_linears(self.model) if self.tlin else nullcontext()
        with torch.inference_mode(), self._autocast(self.bf16_gen), tlin:
            if self.sampler == "lean":
                comp = lean_generate(self.model, p_ids, p_mask, MAX_NEW_TOKENS, self.eos, self.pad, self.trim)
            else:
                out = self.model.generate(input_ids=p_ids, attention_mask=p_mask, do_sample=True, temperature=1.0,
                                          top_k=0, top_p=1.0, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=self.pad,
                                          eos_token_id=self.eos)
                comp = out[:, p_ids.shape[1]:]
        comp = comp.clone()
        is_eos = comp == self.eos
        comp_mask = ((is_eos.cumsum(-1) - is_eos.long()) == 0).long()
        width = max(int(comp_mask.sum(-1).max()), 1)
        comp, comp_mask = comp[:, :width], comp_mask[:, :width]
        rec["generate"] = common.now() - t

        t = common.now()
        texts = self.tok.batch_decode(comp * comp_mask + self.pad * (1 - comp_mask), skip_special_tokens=True)
        reward = self.reward_fn(texts)
        rec["score"] = common.now() - t

        t = common.now()
        ids = torch.cat([p_ids, comp], 1)
        mask = torch.cat([p_mask, comp_mask], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ref_ctx = self.model.disable_adapter() if self.ref is None else nullcontext()
        with torch.inference_mode(), ref_ctx, self._autocast():
            log_a = self._token_log_probs(self.ref or self.model, ids, mask, pos, comp, comp_mask).sum(-1).double()
        rec["reference"] = common.now() - t

        t = common.now()
        with self._autocast():
            tok_lp = self._token_log_probs(self.model, ids, mask, pos, comp, comp_mask)
        log_pi = tok_lp.sum(-1)
        lp = log_pi.detach().double()
        log_P = log_a + reward / BETA
        log_w = log_P - lp  # on-policy: q = pi
        log_z = torch.empty_like(log_P)
        for j, key in enumerate(prompts):  # running log-mean-exp per prompt
            n = self.n_z.get(key, 0)
            old = self.log_z.get(key, -math.inf)
            new = log_w[j] if n == 0 else torch.logaddexp(torch.tensor(old + math.log(n)), log_w[j]) - math.log(n + 1)
            self.log_z[key], self.n_z[key] = float(new), n + 1
        for j, key in enumerate(prompts):
            log_z[j] = self.log_z[key]
        pseudo = -(lp - (log_P - log_z)) - 1.0  # reverse KL: R = -f'(pi/p), f'(t) = log t + 1
        base = (pseudo.sum() - pseudo) / (len(pseudo) - 1)
        loss = -((pseudo - base).float() * log_pi).sum() / len(prompts)
        loss.backward()
        rec["backward"] = common.now() - t

        t = common.now()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        rec["optimizer"] = common.now() - t
        rec["time"] = common.now() - t0
        rec["tokens"] = int(comp_mask.sum())
        rec["reward"] = float(reward.mean())
        return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variant", default="generate",
                    help="'+'-joined: generate | lean | trim | tlin | bf16 | bf16gen (see Floor.__init__)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--interop_threads", type=int, default=None)
    ap.add_argument("--no_wait", action="store_true", help="start even if other processes keep the CPU busy")
    args = ap.parse_args()
    common.set_threads(args.threads, args.interop_threads)
    if not args.no_wait and not getattr(args, "worker", None):
        common.wait_quiet()
    load0 = common.loadavg()
    contention = common.Contention()
    floor = Floor(args.full, args.variant)
    recs = common.timed_loop(floor, args.warmup, args.steps)
    calm = common.quiet(recs) or recs
    common.emit({
        "bench": "floor", "framework": "floor", "workload": "W-full" if args.full else "W",
        "variant": args.variant,
        "steps_quiet": f"{len(common.quiet(recs))}/{len(recs)}",  # medians over the quiet steps (all if none)
        **common.summarise([r["time"] for r in calm], [r["tokens"] for r in calm]),
        "peak_rss_mb": round(common.peak_rss_mb(), 1), "phases_s": common.phase_medians(calm),
        **common.footer(contention, load0),
    })


if __name__ == "__main__":
    main()
