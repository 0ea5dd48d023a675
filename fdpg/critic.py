r"""PPO's critic :math:`V(s_t)`: a value head on the policy's own backbone, or a separate value model.

:math:`s_t = (c, y_{<t})` is the state in which completion token :math:`y_t` is chosen; its value is read from
the final hidden state :math:`h_t` that predicts :math:`y_t` (the same position whose logits give
:math:`\log\pi(y_t\mid s_t)`, see :func:`fdpg.log_probs.completion_token_log_probs`).

- :class:`ValueHead`: :math:`V_t = w^\top h_t + b` on the policy's hidden states (no second model in memory; with
  LoRA it reads the adapter-on backbone and trains with the adapter). Initialised to zero, so that :math:`V = 0`
  at the start.
- :class:`ValueModel`: any causal LM's backbone with its own :class:`ValueHead`, trained in full; it must share
  the policy's tokenizer (it reads the same token ids). :meth:`ValueModel.from_reward_model` initialises it from a
  reward model of ``fdpg reward-model train`` (InstructGPT's value function): its backbone, and its scalar head's
  weights as the value head's, so that at the start :math:`V(s_t)` is the reward model's logit of the prefix
  :math:`(c, y_{<t})`.
"""

from __future__ import annotations

import torch
from torch import nn

from fdpg.sampling import SampleBatch


class ValueHead(nn.Module):
    """A scalar linear head :math:`V_t = w^\\top h_t + b` (fp32, zero-initialised)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` hidden states -> ``[...]`` values."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


def hidden_size_of(model: nn.Module) -> int:
    config = model.config
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__} (no hidden_size/n_embd/d_model)")


class ValueModel(nn.Module):
    """A separate critic: a causal LM backbone (fully trained) and a :class:`ValueHead` on its last hidden state."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone.train(False)
        self.head = ValueHead(hidden_size_of(backbone))

    @classmethod
    def from_pretrained(cls, name_or_path: str, policy_tokenizer, trust_remote_code: bool = False) -> ValueModel:
        """Load ``name_or_path``; refuse one whose tokenizer differs from the policy's."""
        from fdpg.models import load_causal_lm, load_tokenizer

        tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
        if tokenizer.get_vocab() != policy_tokenizer.get_vocab():
            raise ValueError(
                f"--value_model {name_or_path!r} has another tokenizer than the policy ({len(tokenizer)} vs "
                f"{len(policy_tokenizer)} tokens, or other ids): the critic reads the policy's token ids. Use a "
                "model of the policy's family, or --critic policy_head")
        return cls(load_causal_lm(name_or_path, trust_remote_code=trust_remote_code))

    @classmethod
    def from_reward_model(cls, path: str, policy_tokenizer) -> ValueModel:
        """The reward model of the run ``path`` (its backbone and its head's weights); refused when its tokenizer is
        not the policy's or its head is not one linear output."""
        from fdpg.algorithms.reward_model import RewardModel

        reward_model = RewardModel.load(path)
        if reward_model.tokenizer.get_vocab() != policy_tokenizer.get_vocab():
            raise ValueError(
                f"--critic reward_model:{path}: the reward model's tokenizer ({len(reward_model.tokenizer)} tokens) "
                f"is not the policy's ({len(policy_tokenizer)}): the critic reads the policy's token ids. Train the "
                "reward model on the policy's family (fdpg reward-model train --model ...), or use --critic "
                "policy_head")
        model = reward_model.model
        head = next((m for name in ("score", "classifier") if isinstance(m := getattr(model, name, None), nn.Linear)
                     and m.out_features == 1), None)
        if head is None:
            raise ValueError(f"--critic reward_model:{path}: its head is not a single linear output (score or "
                             "classifier); use --critic policy_head")
        value = cls(getattr(model, model.base_model_prefix).requires_grad_(True))
        with torch.no_grad():
            value.head.linear.weight.copy_(head.weight.to(value.head.linear.weight.dtype))
            value.head.linear.bias.copy_(head.bias if head.bias is not None else torch.zeros(1))
        return value

    def forward(self, batch: SampleBatch) -> torch.Tensor:
        """``[B, T]`` values of the states before each completion token (0 where masked)."""
        input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
        attention_mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        length, t = input_ids.shape[1], batch.completion_ids.shape[1]
        if self.backbone.get_output_embeddings() is not None:  # a causal LM: its last hidden states, 1 logit row
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False, output_hidden_states=True, logits_to_keep=1)
            states = out.hidden_states[-1]
        else:  # a bare decoder (a reward model's backbone)
            states = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False).last_hidden_state
        hidden = states[:, length - t - 1:length - 1]
        return self.head(hidden) * batch.completion_mask
