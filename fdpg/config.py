"""Settings of an f-DPG run, as dataclasses that ``HfArgumentParser`` turns into CLI flags.

Every field is a flag (``--divergence js``, ``--lora_r 8``, dashes accepted too) and a key of an
optional YAML/JSON ``--config`` file; flags override the file, the file overrides the defaults. The
whole config is written to ``config.json`` in the run directory and checked on ``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The training algorithms of ``--algo``.
ALGORITHMS = ("fdpg", "ppo", "grpo", "dpo", "kto", "listwise", "online_dpo", "sft", "raft")
#: PPO's critics (``--critic``).
CRITICS = ("policy_head", "value_model", "none")
#: Fields that may differ between a run and its resumption (everything else must match).
RESUMABLE_CHANGES = frozenset({"steps", "resume", "output_dir", "report_to", "save_every", "log_samples_every",
                               "progress", "exact_kl_every", "eval_samples", "eval_every",
                               "vllm_kv_cache_gb", "vllm_gpu_memory_utilization", "plugins"})


@dataclass
class TrainConfig:
    """Everything that defines an f-DPG run."""

    # --- the algorithm
    algo: str = field(default="fdpg", metadata={
        "help": "fdpg (f-divergence minimisation), ppo (the RLHF baseline, reverse KL toward a exp(r/beta)), grpo "
                "(group-relative policy optimisation: --samples_per_prompt completions per prompt, no critic), kto "
                "(from completions labelled desirable or not, --preferences), listwise (RRHF, PRO or LiPO from "
                "rankings, --list_loss), online_dpo (two samples per prompt "
                "judged by the task's reward, --preference_loss on them), dpo "
                "(offline preference optimisation from --preferences; f-DPO with --divergence), sft (supervised "
                "fine-tuning on --data) or raft (online rejection-sampling fine-tuning: the best of "
                "--samples_per_prompt)."})

    # --- what to align, toward what
    model: str = field(default="smollm2-135m-instruct", metadata={
        "help": "Hub name, local path, or 'smollm2-135m-instruct' (the embedded default model)."})
    task: str = field(default="sentiment", metadata={"help": "Task name (see `fdpg tasks`)."})
    plugins: str = field(default="", metadata={
        "help": "Your own modules or .py files, comma-separated, imported before anything else (they register "
                "divergences, tasks, utilities, segmenters); also FDPG_PLUGINS and the 'fdpg.plugins' entry "
                "points. Recorded here, so --resume and fdpg report load them again (see fdpg.plugins)."})
    divergence: str = field(default="rkl", metadata={
        "help": "f-divergence: rkl, fkl, tv, js, chi2, hellinger, alpha:A, or a registered name."})
    beta: float = field(default=0.1, metadata={"help": "KL coefficient of reward targets P = a exp(r/beta)."})
    task_args: str = field(default="", metadata={
        "help": "Task options as key=value pairs separated by commas, e.g. 'word=amazing'."})
    prompts_file: str | None = field(default=None, metadata={
        "help": "Text file with one prompt per line, replacing the task's prompts."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    fit_samples: int | None = field(default=None, metadata={
        "help": "Base-model samples used to fit the target before training (distributional constraints); "
                "default: the task's suggestion."})

    # --- policy
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 = full fine-tuning with a frozen reference copy."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="q_proj,v_proj", metadata={
        "help": "Comma-separated module names for LoRA ('all-linear' for every linear layer)."})

    # --- sampling
    steps: int = field(default=40, metadata={"help": "Optimisation steps."})
    batch_size: int = field(default=16, metadata={"help": "Completions per step, over all processes."})
    samples_per_prompt: int = field(default=4, metadata={
        "help": "Completions drawn per prompt (per-prompt Z and baselines need several)."})
    generation_batch_size: int = field(default=16, metadata={
        "help": "Completions per generate() call; each chunk has its own seed, so results do not depend "
                "on the number of processes."})
    micro_batch_size: int = field(default=8, metadata={
        "help": "Completions per forward/backward pass (gradient accumulation within a step). The saved "
                "activations grow with it (~1.7 GB for 16 x 56 tokens of a 135M model); 8 halves them at "
                "the same speed on CPU."})
    activation_checkpointing: int = field(default=0, metadata={
        "help": "Recompute the activations of every n-th decoder layer in backward instead of keeping them "
                "(0: off, 1: every layer): less peak memory for one more forward of those layers per training "
                "pass; the gradient is the same up to rounding. Sampling and reference passes are unaffected."})
    max_new_tokens: int = field(default=32, metadata={"help": "Completion length limit."})
    temperature: float = field(default=1.0, metadata={
        "help": "Sampling temperature; != 1 makes the proposal differ from pi (importance-corrected)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling; < 1 is importance-corrected."})
    min_new_tokens: int = field(default=0, metadata={
        "help": "End-of-sequence is not drawn before this many tokens: another proposal, importance-corrected over "
                "the completions it can draw (like --top_p)."})

    # --- the generation engine (fdpg.generation)
    generation: str = field(default="torch", metadata={
        "help": "What samples, in training, its evaluations and the final one: torch (fdpg's own loop) or vllm (a "
                "vLLM engine in this process, weights synced after each step, its samples a proposal q corrected "
                "by pi/q; `make setup-vllm`)."})
    vllm_kv_cache_gb: float | None = field(default=None, metadata={
        "help": "--generation vllm on a CPU: the engine's KV cache in GiB (default 1)."})
    vllm_gpu_memory_utilization: float | None = field(default=None, metadata={
        "help": "--generation vllm on CUDA: the fraction of GPU memory the engine may take (default 0.3)."})
    vllm_enforce_eager: bool = field(default=False, metadata={
        "help": "--generation vllm: no compilation (CPU: a 3 s start instead of ~1 min, ~1.4x slower calls)."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={
        "help": "--generation vllm on CUDA: GPUs the engine shards the model over (vLLM's tensor parallelism)."})

    # --- objective
    baseline: str = field(default="prompt_loo", metadata={
        "help": "none, mean, loo, prompt_mean, prompt_loo or moving_average."})
    baseline_decay: float = field(default=0.9, metadata={"help": "Decay of the moving-average baseline."})
    log_z: str = field(default="running", metadata={"help": "running or window estimate of log Z."})
    log_z_window: int = field(default=1024, metadata={"help": "Window (samples per key) of the windowed log Z."})
    conditional: bool | None = field(default=None, metadata={
        "help": "One Z per prompt (default: the task decides; true when it has prompts)."})
    max_log_ratio: float | None = field(default=None, metadata={
        "help": "Clip log(pi/p) at this value (only for p = 0 under rkl/chi2; biased)."})

    token_credit: bool = field(default=False, metadata={
        "help": "f-DPG with reverse KL on a task with a fine-grained reward: weight each token by its reward-to-go "
                "(the segment rewards and log pi/a at or after it) instead of the sequence's pseudo-reward; the same "
                "expected gradient, lower variance (needs causal components and on-policy samples)."})

    # --- off-policy (DPG)
    off_policy: bool = field(default=False, metadata={
        "help": "Sample from a frozen proposal q, refreshed when pi is closer to the target."})
    importance_weight_clip: float | None = field(default=None, metadata={"help": "Clip pi/q at this value."})

    # --- optimisation
    learning_rate: float = field(default=1e-4, metadata={"help": "Adam learning rate."})
    lr_scheduler: str = field(default="constant", metadata={
        "help": "transformers scheduler name: constant, linear, cosine, constant_with_warmup, ..."})
    warmup_steps: int = field(default=0, metadata={"help": "Learning-rate warm-up steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping (None: off)."})
    mixed_precision: str = field(default="no", metadata={"help": "no, bf16 or fp16 (through accelerate)."})
    bf16_sampling: str = field(default="copy", metadata={
        "help": "Under --mixed_precision bf16, what samples: copy (a bf16 copy of the policy, LoRA merged, weights "
                "prepacked, kept in step with it; on a CPU with native bf16, else autocast) or autocast (the "
                "policy under the training pass's autocast). Estimates and gradients read pi from the training "
                "forward either way (fdpg.sampling_copy)."})
    seed: int = field(default=0, metadata={"help": "Seed of prompts, sampling and initialisation."})

    # --- PPO (--algo ppo; Schulman et al. 2017, as in Ziegler et al. 2019 and InstructGPT)
    reward_feature: str | None = field(default=None, metadata={
        "help": "PPO: the task feature used as the reward (default: r of a task whose target is a exp(r/beta)); "
                "name one, e.g. a 0/1 constraint, for other targets."})
    ppo_epochs: int = field(default=4, metadata={"help": "PPO: epochs over each batch."})
    ppo_minibatches: int = field(default=1, metadata={
        "help": "PPO: minibatches per epoch (shuffled; one optimizer step each); must divide the batch."})
    clip_range: float = field(default=0.2, metadata={"help": "PPO: epsilon of the clipped ratio."})
    dual_clip: float | None = field(default=None, metadata={
        "help": "PPO: dual-clip constant c > 1 bounding the loss of negative advantages (None: off)."})
    value_clip: float | None = field(default=0.2, metadata={"help": "PPO: clip of V around its old value (None: off)."})
    vf_coef: float = field(default=0.1, metadata={"help": "PPO: value-loss coefficient."})
    entropy_coef: float = field(default=0.0, metadata={"help": "PPO: entropy bonus coefficient."})
    gamma: float = field(default=1.0, metadata={"help": "PPO: discount of GAE."})
    gae_lambda: float = field(default=0.95, metadata={"help": "PPO: lambda of GAE."})
    whiten_advantages: bool = field(default=True, metadata={"help": "PPO: whiten the advantages over the batch."})
    kl_estimator: str = field(default="k1", metadata={"help": "PPO: per-token KL(pi||a) estimator k1, k2 or k3."})
    kl_in: str = field(default="reward", metadata={
        "help": "PPO: put beta * KL in the per-token reward (InstructGPT) or in the loss."})
    target_kl: float | None = field(default=None, metadata={
        "help": "PPO: adaptive KL controller target (Ziegler et al. 2019), nats per sequence; None: fixed beta."})
    kl_horizon: int = field(default=10000, metadata={"help": "PPO: horizon of the adaptive KL controller."})
    reward_clip: float | None = field(default=None, metadata={"help": "PPO: clip the reward to [-c, c]."})
    normalize_rewards: bool = field(default=False, metadata={
        "help": "PPO: divide rewards by their running standard deviation (after subtracting the running mean)."})
    missing_eos_penalty: float | None = field(default=None, metadata={
        "help": "PPO: subtract this from the reward of completions that end without EOS."})
    critic: str = field(default="policy_head", metadata={
        "help": "PPO: policy_head (a value head on the policy's own backbone, trained with it), value_model "
                "(a separate model, --value_model), reward_model:RUN (a separate value model initialised from a "
                "reward model of `fdpg reward-model train` on the policy's tokenizer, as InstructGPT) or none "
                "(V = 0)."})
    value_model: str | None = field(default=None, metadata={
        "help": "PPO: the separate value model's hub name or path (--critic value_model); same tokenizer."})
    loss_aggregation: str = field(default="token_mean", metadata={
        "help": "PPO: token_mean, seq_mean_token_sum (a constant normaliser) or seq_mean_token_mean."})

    # --- GRPO (--algo grpo; Shao et al. 2024, with TRL 1.16's variants; objectives.grpo)
    grpo_loss: str = field(default="dapo", metadata={
        "help": "GRPO: the loss aggregation, TRL's loss_type: grpo (token mean per sequence), bnpo (token mean per "
                "micro-batch), dr_grpo (sum over batch x --max_new_tokens), dapo (token mean over the generation "
                "batch; TRL's default), luspo (token sum per sequence) or cispo (clipped-ratio-weighted REINFORCE)."})
    scale_rewards: str = field(default="group", metadata={
        "help": "GRPO: divide the group-relative reward by the std of its group, of the batch, or none (Dr. GRPO)."})
    grpo_iterations: int = field(default=1, metadata={
        "help": "GRPO: passes over each batch of samples (mu of the paper, TRL's num_iterations)."})
    grpo_minibatches: int = field(default=1, metadata={
        "help": "GRPO: optimizer steps per pass, each on a shuffled share of the batch (TRL's steps_per_generation)."})
    epsilon_high: float | None = field(default=None, metadata={
        "help": "GRPO: the ratio's upper clip 1 + epsilon_high (DAPO's clip-higher; default --clip_range; cispo's "
                "cap on the ratio)."})
    grpo_delta: float | None = field(default=None, metadata={
        "help": "GRPO: cap of the unclipped ratio (two-sided clipping; None: off)."})
    importance_sampling: str = field(default="token", metadata={
        "help": "GRPO: the ratio per token, or per sequence (the geometric mean over its tokens: GSPO)."})
    kl_coef: float = field(default=0.0, metadata={
        "help": "GRPO: weight of the k3 KL to the reference in the loss (TRL's beta; 0, TRL's default: no KL "
                "term). --beta stays the target's, for the shared metrics."})
    kl_ratio_correction: bool = field(default=True, metadata={
        "help": "GRPO: multiply the KL term by the importance ratio (TRL 1.16's use_bias_correction_kl, its default)."})

    # --- DPO and f-DPO (--algo dpo; Rafailov et al. 2023, Wang et al. 2023)
    preferences: str | None = field(default=None, metadata={
        "help": "DPO: the preference pairs (columns prompt, chosen, rejected): a JSON/JSONL/CSV/Parquet file, a saved "
                "datasets directory, a hub dataset name, or 'task' (pairs made from the task: best against worst of "
                "--pair_samples base-model samples for --pair_prompts prompts, saved in the run directory)."})
    preference_loss: str = field(default="sigmoid", metadata={
        "help": "DPO: sigmoid (DPO; cDPO with --label_smoothing), ipo, hinge (SLiC), robust, exo_pair, discopop, "
                "sigmoid_norm (these read --divergence), or, reverse KL only, nca_pair, bco_pair, sppo_hard, "
                "apo_zero, apo_down, rdpo (R-DPO, --length_alpha), dpop (DPO-Positive, --positive_lambda); or, "
                "reference-free (no reference pass), simpo (--simpo_gamma), cpo (--nll_coef), orpo (beta is its "
                "lambda); see objectives.preference and objectives.reference_free."})
    preference_loss_weights: str = field(default="", metadata={
        "help": "DPO: weights of the losses of a combined --preference_loss (e.g. 'sigmoid,sft' with '0.8,0.2', as "
                "MPO; default 1 each, as TRL); sft is the chosen responses' NLL per token."})
    length_alpha: float = field(default=0.0, metadata={
        "help": "DPO --preference_loss rdpo: the margin's charge per token the chosen response is longer (R-DPO)."})
    positive_lambda: float = field(default=50.0, metadata={
        "help": "DPO --preference_loss dpop: the weight of max(0, log pi_ref/pi) of the chosen response (DPOP)."})
    simpo_gamma: float = field(default=0.5, metadata={
        "help": "DPO --preference_loss simpo: the target margin gamma of SimPO (reference-free)."})
    nll_coef: float = field(default=1.0, metadata={
        "help": "DPO --preference_loss cpo: the weight alpha of the chosen responses' NLL per token (ORPO's is 1)."})
    discopop_tau: float = field(default=0.05, metadata={
        "help": "DPO --preference_loss discopop: the temperature of its logistic/exponential mix."})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "DPO: probability that a preference label is flipped, in [0, 0.5) (the sigmoid, robust, exo_pair, aot, "
                "aot_unpaired, simpo and cpo losses)."})
    epochs: float | None = field(default=None, metadata={
        "help": "DPO: epochs over the training pairs, instead of --steps (steps = ceil(epochs * pairs / batch))."})
    eval_every: int = field(default=10, metadata={
        "help": "DPO: every N steps (and at the first and last), sample --batch_size completions of the task's prompts "
                "and log score/..., kl_pi_a, ... under f-DPG's names, and the held-out pairs' loss and accuracy; "
                "0: never."})
    heldout_fraction: float = field(default=0.1, metadata={"help": "DPO: fraction of the pairs held out, in [0, 1)."})
    pair_prompts: int = field(default=64, metadata={"help": "DPO with --preferences task: prompts to make pairs for."})
    pair_samples: int = field(default=4, metadata={
        "help": "DPO with --preferences task: base-model samples per prompt (the best against the worst)."})
    max_length: int | None = field(default=None, metadata={
        "help": "DPO: token limit of prompt + response (default: the model's context)."})
    truncate_pairs: bool = field(default=False, metadata={
        "help": "DPO: cut responses that do not fit in --max_length (default: refuse them, naming the row)."})

    # --- KTO (--algo kto; Ethayarajh et al. 2024; objectives.kto). --preferences, --epochs, --eval_every,
    # --heldout_fraction, --max_length, --truncate_pairs, --pair_prompts and --pair_samples apply as for DPO.
    kto_loss: str = field(default="kto", metadata={
        "help": "KTO: kto (against the batch's KL reference point) or apo_zero_unpaired (no reference point). "
                "--preferences holds (prompt, completion, label) rows, or pairs (chosen desirable, rejected not)."})
    desirable_weight: float = field(default=1.0, metadata={"help": "KTO: the weight lambda_D of desirable examples."})
    undesirable_weight: float = field(default=1.0, metadata={
        "help": "KTO: the weight lambda_U of undesirable examples (the paper: lambda_D n_D / lambda_U n_U in "
                "[1, 4/3])."})

    # --- list-wise losses (--algo listwise; objectives.list_losses): --preferences RANKINGS (prompt, responses best
    # first, optional scores), --epochs, --eval_every, --heldout_fraction, --max_length, --truncate_pairs as for DPO
    list_loss: str = field(default="lipo", metadata={
        "help": "listwise: lipo (LiPO-lambda: DPO terms of every ordered pair, lambda-weighted; reads the reference "
                "and --divergence), rrhf or pro (reference-free; --nll_coef weighs the best response's NLL)."})

    # --- SFT (--algo sft) and RAFT (--algo raft)
    data: str | None = field(default=None, metadata={
        "help": "SFT: the demonstrations (columns prompt, completion; or chat messages): a JSON/JSONL/CSV/Parquet "
                "file, a saved datasets directory or a hub dataset name. --epochs, --eval_every, --heldout_fraction "
                "and --max_length apply as for DPO."})
    raft_quantile: float | None = field(default=None, metadata={
        "help": "RAFT: keep every sample whose reward is at least this quantile of the batch's, in [0, 1) (default: "
                "the best of --samples_per_prompt per prompt)."})
    ptx_data: str | None = field(default=None, metadata={
        "help": "PPO-ptx: pretraining text (a 'text' column; file, saved directory or hub name) whose "
                "language-modelling loss, times --ptx_coef, is added to every PPO minibatch's loss."})
    ptx_coef: float = field(default=0.0, metadata={"help": "PPO-ptx: the coefficient gamma of the LM loss."})
    ptx_length: int = field(default=64, metadata={"help": "PPO-ptx: tokens per piece of pretraining text."})

    # --- metrics and the final evaluation
    eval_samples: int = field(default=256, metadata={
        "help": "Completions of the final policy (and, cached, of the base model) evaluated when the run finishes, "
                "into eval.json with standard errors (256: 0.02-0.03 for the built-in scores and fractions); "
                "0: no evaluation."})
    exact_kl_every: int = field(default=5, metadata={
        "help": "Log kl_pi_a_exact and entropy_exact (the exact next-token KL(pi||a) and entropy summed over each "
                "sample's prefix: never negative, far less variance) every N steps (two more forward passes on "
                "those steps); 0: never."})

    # --- run directory, logging, checkpoints
    output_dir: str = field(default="runs/fdpg", metadata={
        "help": "Run directory; an existing run is never overwritten (a fresh '-N' suffix is used)."})
    resume: str | None = field(default=None, metadata={"help": "Run directory to resume from its last checkpoint."})
    save_every: int = field(default=10, metadata={"help": "Checkpoint every N steps (and at the end)."})
    log_samples_every: int = field(default=1, metadata={"help": "Write samples.jsonl every N steps (0: never)."})
    report_to: str = field(default="none", metadata={
        "help": "Extra trackers through accelerate: tensorboard, wandb, ... (comma-separated) or none."})
    progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar."})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the setting, its value and the fix."""
        positive = ("steps", "batch_size", "samples_per_prompt", "generation_batch_size", "micro_batch_size",
                    "max_new_tokens", "save_every", "log_z_window")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be a positive integer, got {value!r}")
        if not isinstance(self.eval_samples, int) or self.eval_samples < 0:
            raise ValueError(f"--eval_samples must be a non-negative integer (0: no evaluation), got "
                             f"{self.eval_samples!r}")
        if not isinstance(self.activation_checkpointing, int) or self.activation_checkpointing < 0:
            raise ValueError(f"--activation_checkpointing must be a non-negative integer (0: off, n: every n-th "
                             f"decoder layer), got {self.activation_checkpointing!r}")
        if not isinstance(self.exact_kl_every, int) or self.exact_kl_every < 0:
            raise ValueError(f"--exact_kl_every must be a non-negative integer (0: never), got {self.exact_kl_every!r}")
        if self.fit_samples is not None and (not isinstance(self.fit_samples, int) or self.fit_samples < 1):
            raise ValueError(f"--fit_samples must be a positive integer, got {self.fit_samples!r}")
        if self.batch_size % self.samples_per_prompt:
            raise ValueError(
                f"--batch_size ({self.batch_size}) must be a multiple of "
                f"--samples_per_prompt ({self.samples_per_prompt})"
            )
        for name in ("beta", "learning_rate", "temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"--{name} must be a positive number, got {value!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p!r}")
        if self.lora_r < 0:
            raise ValueError(f"--lora_r must be >= 0 (0 = full fine-tuning), got {self.lora_r!r}")
        if self.log_z not in ("running", "window"):
            raise ValueError(f"--log_z must be 'running' or 'window', got {self.log_z!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"--mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.bf16_sampling not in ("copy", "autocast"):
            raise ValueError(f"--bf16_sampling must be copy or autocast, got {self.bf16_sampling!r}")
        from objectives.estimators import BASELINES

        if self.baseline not in BASELINES:
            raise ValueError(f"--baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        self._validate_generation()
        if self.algo not in ALGORITHMS:
            raise ValueError(f"--algo must be one of {', '.join(ALGORITHMS)}, got {self.algo!r}")
        if self.token_credit:
            self._validate_token_credit()
        if self.algo == "ppo":
            self._validate_ppo()
        if self.algo == "grpo":
            self._validate_grpo()
        if self.algo == "dpo":
            self._validate_dpo()
        if self.algo == "kto":
            self._validate_kto()
        if self.algo == "online_dpo":
            self._validate_online_dpo()
        if self.algo == "listwise":
            self._validate_listwise()
        if self.algo in ("sft", "raft"):
            self._validate_likelihood()
        if (self.ptx_data is not None or self.ptx_coef) and self.algo != "ppo":
            raise ValueError(f"--ptx_data/--ptx_coef mix a language-modelling loss into PPO's (PPO-ptx); --algo "
                             f"{self.algo} does not take them: drop them or use --algo ppo")

    def _validate_generation(self) -> None:
        from fdpg.generation import GENERATION_BACKENDS, require_vllm

        if self.generation not in GENERATION_BACKENDS:
            raise ValueError(f"--generation must be one of {', '.join(GENERATION_BACKENDS)}, got {self.generation!r}")
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"--min_new_tokens must be an integer in [0, --max_new_tokens], got "
                             f"{self.min_new_tokens!r}")
        if self.generation == "vllm":
            require_vllm()
            self.vllm_settings().check()
        elif (self.vllm_kv_cache_gb is not None or self.vllm_gpu_memory_utilization is not None
              or self.vllm_enforce_eager is not False or self.vllm_tensor_parallel_size != 1):  # (1.0 == 1: no `in`)
            raise ValueError("the --vllm_* settings are for --generation vllm; add it or drop them")

    def preference_losses(self) -> list[tuple[str, float]]:
        """``--preference_loss A,B --preference_loss_weights wA,wB`` as ``[(A, wA), (B, wB)]`` (weights 1 by default,
        as TRL's ``loss_type`` list and ``loss_weights``: MPO's combinations); ``sft`` is the chosen responses'
        NLL per token of the batch."""
        names = [n.strip() for n in str(self.preference_loss).split(",") if n.strip()]
        if not names:
            raise ValueError("--preference_loss is empty: name a loss (see fdpg train --help)")
        if self.preference_loss_weights.strip():
            try:
                weights = [float(w) for w in self.preference_loss_weights.split(",")]
            except ValueError as exc:
                raise ValueError(f"--preference_loss_weights must be numbers separated by commas, got "
                                 f"{self.preference_loss_weights!r}") from exc
            if len(weights) != len(names) or not all(math.isfinite(w) and w >= 0 for w in weights):
                raise ValueError(f"--preference_loss_weights {self.preference_loss_weights!r}: give one finite weight "
                                 f">= 0 per loss of --preference_loss {self.preference_loss!r}")
        else:
            weights = [1.0] * len(names)
        return list(zip(names, weights))

    def vllm_settings(self):
        """The vLLM engine's settings of this run (:class:`fdpg.vllm_generation.VLLMSettings`)."""
        from fdpg.vllm_generation import VLLMSettings

        return VLLMSettings(kv_cache_gb=self.vllm_kv_cache_gb, gpu_memory_utilization=self.vllm_gpu_memory_utilization,
                            enforce_eager=self.vllm_enforce_eager, seed=self.seed,
                            tensor_parallel_size=self.vllm_tensor_parallel_size)

    def _validate_likelihood(self) -> None:
        if self.algo == "sft" and not self.data:
            raise ValueError("--algo sft learns from demonstrations: give --data FILE_DIR_OR_HUB_NAME (columns "
                             "prompt and completion, or messages)")
        if self.algo != "sft" and self.data:
            raise ValueError(f"--data is SFT's demonstrations; --algo {self.algo} does not read it: drop it")
        if self.algo == "raft" and self.proposal_differs:
            raise ValueError("--algo raft samples from pi itself: drop --temperature, --top_p and --off_policy")
        if self.raft_quantile is not None and (self.algo != "raft" or not 0 <= self.raft_quantile < 1):
            raise ValueError(f"--raft_quantile must be in [0, 1) and needs --algo raft, got {self.raft_quantile!r} "
                             f"with --algo {self.algo}")
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"--epochs must be a positive number, got {self.epochs!r}")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"--heldout_fraction must be in [0, 1), got {self.heldout_fraction!r}")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ValueError(f"--eval_every must be an integer >= 0, got {self.eval_every!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"--max_length must be at least 2 tokens, got {self.max_length!r}")

    def _validate_token_credit(self) -> None:
        from objectives import ReverseKL, get_divergence

        if self.algo != "fdpg":
            raise ValueError(f"--token_credit is f-DPG's reward-to-go; --algo {self.algo} places fine-grained rewards "
                             "itself (PPO takes them per token): drop --token_credit")
        if not isinstance(get_divergence(self.divergence), ReverseKL):
            raise ValueError(f"--token_credit splits the reverse-KL pseudo-reward over tokens; --divergence "
                             f"{self.divergence} has no such split: use --divergence rkl or drop --token_credit")
        if self.proposal_differs:
            raise ValueError("--token_credit needs on-policy samples (no --temperature, --top_p or --off_policy)")
        if self.baseline == "moving_average":
            raise ValueError("--token_credit uses a per-position batch baseline: choose --baseline prompt_loo, loo, "
                             "mean, prompt_mean or none")

    def _validate_dpo(self) -> None:
        from objectives import get_divergence
        from objectives.preference import check_preference_settings, f_dpo_problem

        if not self.preferences:
            raise ValueError("--algo dpo learns from preference pairs: give --preferences FILE_DIR_OR_HUB_NAME "
                             "(columns prompt, chosen, rejected) or --preferences task (pairs made from the task)")
        problem = f_dpo_problem(get_divergence(self.divergence))
        if problem is not None:
            raise ValueError(f"--algo dpo --divergence {self.divergence}: f-DPO is not defined for it, since "
                             f"{problem}; use rkl (DPO), fkl, js or alpha:A")
        from objectives.reference_free import REFERENCE_FREE_LOSSES

        losses = [name for name, _ in self.preference_losses()]  # also checks names against weights
        if len(losses) > 1 and set(losses) & set(REFERENCE_FREE_LOSSES):
            raise ValueError(f"--preference_loss {self.preference_loss}: a reference-free loss "
                             f"({', '.join(REFERENCE_FREE_LOSSES)}) is not combined with others; give it alone")
        from objectives.preference import BATCH_LOSSES

        if len(losses) > 1 and set(losses) & set(BATCH_LOSSES):
            raise ValueError(f"--preference_loss {self.preference_loss}: {', '.join(BATCH_LOSSES)} sort over the "
                             "batch and are not combined with others here; give one alone")
        if losses == ["sft"]:
            raise ValueError("--preference_loss sft alone is supervised fine-tuning on the chosen responses: use "
                             "--algo sft, or combine it (--preference_loss sigmoid,sft, as MPO)")
        if self.preference_loss in REFERENCE_FREE_LOSSES:
            if self.divergence != "rkl":
                raise ValueError(f"--preference_loss {self.preference_loss} is reference-free: it reads no "
                                 f"pi/pi_ref, so it has no --divergence {self.divergence} form; drop --divergence")
            if self.label_smoothing and self.preference_loss == "orpo":
                raise ValueError("--label_smoothing is not part of ORPO (simpo and cpo take it): drop it")
            if not 0.0 <= self.label_smoothing < 0.5:
                raise ValueError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
            if not (math.isfinite(self.beta) and self.beta > 0):
                raise ValueError(f"--beta must be a positive number, got {self.beta!r}")
        else:
            for name in losses:
                if name != "sft":
                    check_preference_settings(name, self.beta, self.label_smoothing, get_divergence(self.divergence))
        for name in ("length_alpha", "positive_lambda", "discopop_tau", "simpo_gamma", "nll_coef"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name} must be a finite number >= 0, got {value!r}")
        if self.discopop_tau == 0:
            raise ValueError("--discopop_tau must be positive (it divides the margin)")
        self._validate_offline_pairs()

    def _validate_offline_pairs(self) -> None:
        """The settings DPO and KTO share: epochs, the held-out split, evaluation, pairs from a task, lengths."""
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"--epochs must be a positive number, got {self.epochs!r}")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"--heldout_fraction must be in [0, 1), got {self.heldout_fraction!r}")
        for name, low in (("eval_every", 0), ("pair_prompts", 1), ("pair_samples", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"--max_length must be at least 2 tokens, got {self.max_length!r}")

    def _validate_grpo(self) -> None:
        from objectives import ReverseKL, get_divergence
        from objectives.grpo import GRPO_LOSSES, IMPORTANCE_LEVELS, REWARD_SCALINGS

        if not isinstance(get_divergence(self.divergence), ReverseKL):
            raise ValueError(f"--algo grpo maximises the reward (with an optional KL term), so --divergence "
                             f"{self.divergence!r} does not apply; drop it (or use --algo fdpg for other divergences)")
        if self.proposal_differs:
            raise ValueError("--algo grpo samples from pi itself (its ratio is pi/pi_old): drop --temperature, "
                             "--top_p, --min_new_tokens and --off_policy, or use --algo fdpg, which corrects for a "
                             "proposal")
        if self.samples_per_prompt < 2:
            raise ValueError(f"--algo grpo compares the completions of a prompt with each other: --samples_per_prompt "
                             f"must be at least 2 (the group size G), got {self.samples_per_prompt}")
        for name, choices in (("grpo_loss", GRPO_LOSSES), ("scale_rewards", REWARD_SCALINGS),
                              ("importance_sampling", IMPORTANCE_LEVELS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name in ("grpo_iterations", "grpo_minibatches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be a positive integer, got {value!r}")
        if self.batch_size % self.grpo_minibatches:
            raise ValueError(f"--grpo_minibatches ({self.grpo_minibatches}) must divide --batch_size "
                             f"({self.batch_size})")
        checks = {"clip_range": 0 < self.clip_range < 1, "kl_coef": math.isfinite(self.kl_coef) and self.kl_coef >= 0,
                  "epsilon_high": self.epsilon_high is None or self.epsilon_high > 0,
                  "grpo_delta": self.grpo_delta is None or self.grpo_delta > 1}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"--{bad[0]} {getattr(self, bad[0])!r} is out of range (clip_range in (0, 1), kl_coef "
                             ">= 0, epsilon_high > 0, grpo_delta > 1)")

    def _validate_online_dpo(self) -> None:
        from objectives import get_divergence
        from objectives.preference import BATCH_LOSSES, check_preference_settings, f_dpo_problem
        from objectives.reference_free import REFERENCE_FREE_LOSSES

        if self.samples_per_prompt != 2:
            raise ValueError(f"--algo online_dpo judges two completions of each prompt: --samples_per_prompt must be "
                             f"2, got {self.samples_per_prompt}")
        if self.preferences:
            raise ValueError("--algo online_dpo makes its pairs from the policy's own samples each step: drop "
                             "--preferences (or use --algo dpo for fixed pairs)")
        problem = f_dpo_problem(get_divergence(self.divergence))
        if problem is not None:
            raise ValueError(f"--algo online_dpo --divergence {self.divergence}: f-DPO is not defined for it, since "
                             f"{problem}; use rkl (DPO), fkl, js or alpha:A")
        losses = [name for name, _ in self.preference_losses()]
        unsupported = [n for n in losses if n in BATCH_LOSSES or n in REFERENCE_FREE_LOSSES or n == "sft"]
        if len(losses) > 1 or unsupported:
            raise ValueError(f"--algo online_dpo takes one pair loss of --preference_loss (sigmoid, ipo, hinge, ...); "
                             f"{self.preference_loss!r} is not one here (combinations, sft, the batch-sorted and the "
                             "reference-free losses are --algo dpo's)")
        check_preference_settings(losses[0], self.beta, self.label_smoothing, get_divergence(self.divergence))
        for name in ("length_alpha", "positive_lambda", "discopop_tau"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name} must be a finite number >= 0, got {value!r}")

    def _validate_listwise(self) -> None:
        from objectives import get_divergence
        from objectives.list_losses import LIST_LOSSES, REFERENCE_FREE_LIST_LOSSES
        from objectives.preference import f_dpo_problem

        if not self.preferences or self.preferences == "task":
            raise ValueError("--algo listwise learns from K-wise rankings: give --preferences FILE_DIR_OR_HUB_NAME "
                             "(columns prompt, responses best first, optional scores; `fdpg label-rankings` writes "
                             "them)")
        if self.list_loss not in LIST_LOSSES:
            raise ValueError(f"--list_loss must be one of {', '.join(LIST_LOSSES)}, got {self.list_loss!r}")
        if self.list_loss in REFERENCE_FREE_LIST_LOSSES and self.divergence != "rkl":
            raise ValueError(f"--list_loss {self.list_loss} is reference-free: it reads no pi/pi_ref, so it has no "
                             f"--divergence {self.divergence} form; drop --divergence (lipo takes one)")
        problem = f_dpo_problem(get_divergence(self.divergence))
        if problem is not None:
            raise ValueError(f"--list_loss lipo --divergence {self.divergence}: its implicit reward f'(pi/pi_ref) is "
                             f"not defined, since {problem}; use rkl, fkl, js or alpha:A")
        if self.preference_loss != "sigmoid" or self.label_smoothing:
            raise ValueError("--preference_loss and --label_smoothing are DPO's; --algo listwise takes --list_loss: "
                             "drop them")
        if not (math.isfinite(self.nll_coef) and self.nll_coef >= 0):
            raise ValueError(f"--nll_coef must be a finite number >= 0, got {self.nll_coef!r}")
        self._validate_offline_pairs()

    def _validate_kto(self) -> None:
        from objectives import ReverseKL, get_divergence
        from objectives.kto import KTO_LOSSES

        if not self.preferences:
            raise ValueError("--algo kto learns from labelled completions: give --preferences FILE_DIR_OR_HUB_NAME "
                             "(columns prompt, completion, label; or pairs prompt, chosen, rejected) or --preferences "
                             "task")
        if not isinstance(get_divergence(self.divergence), ReverseKL):
            raise ValueError(f"--algo kto: its reference point is the batch's KL(pi||pi_ref), the mean of the "
                             f"reverse-KL implicit reward; --divergence {self.divergence} has no such form (TRL's KTO "
                             "neither): drop it")
        if self.kto_loss not in KTO_LOSSES:
            raise ValueError(f"--kto_loss must be one of {', '.join(KTO_LOSSES)}, got {self.kto_loss!r}")
        if self.preference_loss != "sigmoid" or self.label_smoothing:
            raise ValueError("--preference_loss and --label_smoothing are DPO's; --algo kto takes --kto_loss: drop "
                             "them")
        for name in ("desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"--{name} must be a positive number, got {value!r}")
        self._validate_offline_pairs()

    def _validate_ppo(self) -> None:
        from objectives import ReverseKL, get_divergence
        from objectives.rl import AGGREGATIONS, KL_ESTIMATORS

        if not isinstance(get_divergence(self.divergence), ReverseKL):
            raise ValueError(f"--algo ppo optimises the reverse-KL objective E[r] - beta KL(pi||a), so --divergence "
                             f"{self.divergence!r} does not apply; drop it (or use --algo fdpg for other divergences)")
        if self.proposal_differs:
            raise ValueError("--algo ppo samples from pi itself (its ratio is pi/pi_old): drop --temperature, --top_p "
                             "and --off_policy, or use --algo fdpg, which corrects for a proposal")
        for name in ("ppo_epochs", "ppo_minibatches", "kl_horizon"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be a positive integer, got {value!r}")
        if self.batch_size % self.ppo_minibatches:
            raise ValueError(f"--ppo_minibatches ({self.ppo_minibatches}) must divide --batch_size ({self.batch_size})")
        checks = {"clip_range": self.clip_range > 0, "vf_coef": self.vf_coef >= 0,
                  "entropy_coef": self.entropy_coef >= 0,
                  "gamma": 0 <= self.gamma <= 1, "gae_lambda": 0 <= self.gae_lambda <= 1,
                  "dual_clip": self.dual_clip is None or self.dual_clip > 1,
                  "value_clip": self.value_clip is None or self.value_clip > 0,
                  "target_kl": self.target_kl is None or self.target_kl > 0,
                  "reward_clip": self.reward_clip is None or self.reward_clip > 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            name = bad[0]
            raise ValueError(f"--{name} {getattr(self, name)!r} is out of range (clip_range > 0, vf_coef and "
                             "entropy_coef >= 0, gamma and gae_lambda in [0, 1], dual_clip > 1, value_clip, "
                             "target_kl and reward_clip > 0)")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"--kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if self.kl_in not in ("reward", "loss"):
            raise ValueError(f"--kl_in must be 'reward' or 'loss', got {self.kl_in!r}")
        if self.loss_aggregation not in AGGREGATIONS:
            raise ValueError(f"--loss_aggregation must be one of {', '.join(AGGREGATIONS)}, "
                             f"got {self.loss_aggregation!r}")
        if self.critic not in CRITICS and not (self.critic.startswith("reward_model:") and self.critic[13:].strip()):
            raise ValueError(f"--critic must be one of {', '.join(CRITICS)} or reward_model:RUN, got {self.critic!r}")
        if self.ptx_coef < 0 or (self.ptx_coef > 0) != (self.ptx_data is not None) or self.ptx_length < 1:
            raise ValueError(f"PPO-ptx needs both --ptx_data TEXT and --ptx_coef G > 0 (and --ptx_length >= 1), got "
                             f"--ptx_data {self.ptx_data!r}, --ptx_coef {self.ptx_coef!r}, --ptx_length "
                             f"{self.ptx_length!r}")
        if (self.critic == "value_model") != (self.value_model is not None):
            raise ValueError("--critic value_model needs --value_model NAME_OR_PATH, and --value_model needs "
                             f"--critic value_model (got --critic {self.critic!r}, --value_model {self.value_model!r})")

    @property
    def proposal_differs(self) -> bool:
        """Whether samples come from a distribution other than pi (importance weights needed)."""
        return self.off_policy or self.temperature != 1.0 or self.top_p < 1.0 or self.min_new_tokens > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def task_options(self) -> dict[str, str]:
        """``task_args`` parsed into a dict (``'word=amazing,n=3'`` -> ``{'word': 'amazing', 'n': '3'}``)."""
        out: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in self.task_args.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--task_args items must be key=value, got {item!r} in {self.task_args!r}")
            out[key.strip()] = value.strip()
        return out


def incompatible_settings(saved: dict[str, Any], current: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Settings that differ between a checkpointed run and the config used to resume it."""
    now = current.to_dict()
    # A setting added after the run was made has its default there.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return {
        key: (saved.get(key, defaults[key]), now[key])
        for key in now
        if key not in RESUMABLE_CHANGES and saved.get(key, defaults[key]) != now[key]
    }


def read_mapping_file(path: str | Path, flag: str) -> dict[str, Any]:
    """A YAML (``.yaml``/``.yml``) or JSON file that holds one mapping; ``flag`` names it in errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{flag} file {str(path)!r} must hold a mapping of settings, got {type(data).__name__}")
    return data


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON settings file into a dict (keys are TrainConfig field names)."""
    data = read_mapping_file(path, "--config")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--config file {str(path)!r} has unknown settings {unknown}; see `fdpg train --help`")
    return data
