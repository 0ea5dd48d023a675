"""``objectives.kto`` against TRL 1.16's own KTOTrainer on the same token ids.

As in ``test_preference_trl``: the tiny Llama perturbed with seeded noise as the policy and, with another seed, as the
reference; TRL's trainer builds and collates one batch of six labelled completions (with its mismatched ``KL_``
completions), and its ``compute_loss`` gives its loss. Ours reads the log-probabilities of the same completion and
mismatched tokens from float64 copies of both models and gives :func:`objectives.kto.reference_point` and
:func:`objectives.kto.kto_losses`, for both loss types and unequal weights, to 1e-5.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from test_preference_trl import BETA, NOISE, TOLERANCE, _perturbed_llama  # noqa: E402

from objectives.kto import kto_losses, reference_point  # noqa: E402

#: Seeds of the policy's and the reference's noise (a positive KL estimate, so that z0 is not clamped at 0).
SEEDS = (2, 1)
ROWS = {"prompt": ["the day was", "i think it is", "a story:", "what a", "my cat", "so"],
        "completion": [" good and happy", " awful", " love it", " sad sad day", " great", " bad"],
        "label": [True, False, True, False, True, False]}


def _logps(model, ids: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits.double()
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token * mask[:, 1:]).sum(-1)


@pytest.mark.parametrize("settings", [
    pytest.param({"loss_type": "kto"}, id="kto"),
    pytest.param({"loss_type": "kto", "desirable_weight": 1.3, "undesirable_weight": 0.7}, id="kto-weighted"),
    pytest.param({"loss_type": "apo_zero_unpaired"}, id="apo_zero_unpaired"),
])
def test_kto_loss_equals_trls(settings, tiny_model_dir, tiny_tokenizer, tmp_path):
    from trl import KTOConfig, KTOTrainer

    policy, reference = _perturbed_llama(tiny_model_dir, seed=SEEDS[0]), _perturbed_llama(tiny_model_dir, seed=SEEDS[1])
    policy64, reference64 = copy.deepcopy(policy).double(), copy.deepcopy(reference).double()
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        args = KTOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, beta=BETA,
                         per_device_train_batch_size=len(ROWS["prompt"]), **settings)
        trainer = KTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_dict(ROWS),
                             processing_class=copy.deepcopy(tiny_tokenizer))
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.eval()
        with torch.no_grad():
            theirs = float(trainer.compute_loss(trainer.model, batch))
    random.setstate(python_state)
    np.random.set_state(numpy_state)

    ratios = (_logps(policy64, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
              - _logps(reference64, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]))
    labels = torch.as_tensor(batch["label"], dtype=torch.bool)
    z0 = torch.zeros((), dtype=torch.float64)
    if settings["loss_type"] == "kto":
        kl_args = batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"]
        mismatched = _logps(policy64, *kl_args) - _logps(reference64, *kl_args)
        z0 = reference_point(mismatched)
        assert float(z0) > 0, "the reference point is clamped at 0: a weak comparison"
    ours = kto_losses(ratios, labels, z0, BETA, settings.get("desirable_weight", 1.0),
                      settings.get("undesirable_weight", 1.0), settings["loss_type"]).mean().item()
    assert NOISE > 0 and ratios.abs().max() > 0.5 and labels.any() and not labels.all()
    assert abs(ours - theirs) < TOLERANCE, f"ours {ours!r} vs TRL {theirs!r}"


def test_reference_point_is_the_clamped_detached_mean():
    x = torch.tensor([0.5, -2.0, 0.3], requires_grad=True)
    assert float(reference_point(x)) == 0.0  # a negative KL estimate is clamped
    y = torch.tensor([1.0, 2.0], requires_grad=True)
    z = reference_point(y)
    assert float(z) == 1.5 and not z.requires_grad
    with pytest.raises(ValueError, match="at least one mismatched"):
        reference_point(torch.zeros(0))
