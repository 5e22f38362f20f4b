"""Typed settings of one module's GRPO run: the TRL knobs that matter, with CPU-sane defaults.

The defaults train SmolLM2-135M on a 2-core CPU in minutes: 4 prompts x 4 sampled completions per step,
short completions, full fine-tuning in float32, a small KL penalty so the policy stays near the model
the prompts (and demos) were bootstrapped for. :meth:`ModuleGRPOConfig.to_trl` builds
``trl.GRPOConfig`` from them; anything else TRL offers goes through ``trl_overrides``.

Scaling out is configuration only (nothing here is CPU-specific code):

* GPU, one process: ``use_cpu=False, dtype="bfloat16"``.
* A CPU with native bfloat16 (AVX512-BF16, AMX): ``mixed_precision="bf16"`` (float32 weights, bfloat16 math).
* vLLM generation on the training GPU: ``use_vllm=True, vllm_mode="colocate"``
  (``vllm_gpu_memory_utilization`` is vLLM's share of GPU memory, e.g. 0.3).
* vLLM on its own GPU(s): start ``trl vllm-serve --model <weights folder>`` there, then
  ``use_vllm=True, vllm_mode="server", vllm_server_base_url="http://host:8000"``.
* Several GPUs: run the same entry point under ``accelerate launch --num_processes N ...``; TRL's
  trainer reads the accelerate environment. ``prompts_per_step`` is then per process.
* Memory: ``use_lora=True`` (PEFT adapters; merged into plain weights when saved) and
  ``gradient_checkpointing=True`` for larger models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from apexdsp.errors import ApexError

DEFAULT_COMPLETION_TOKENS = 64  # when neither the config nor the module's predictor sets a length


def completion_length_for(config: "ModuleGRPOConfig", predictor: Any) -> "ModuleGRPOConfig":
    """``config`` with ``max_completion_length`` filled from the predictor's ``max_tokens`` when unset."""
    if config.max_completion_length is not None:
        return config
    tokens = (getattr(predictor, "config", None) or {}).get("max_tokens")
    return replace(config, max_completion_length=int(tokens) if tokens else DEFAULT_COMPLETION_TOKENS)


@dataclass
class LoraOptions:
    """Full fine-tuning (default) or LoRA adapters; shared by the GRPO and SFT stage configs."""

    use_lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def lora(self) -> Any:
        """The ``peft.LoraConfig`` when ``use_lora``, else ``None`` (full fine-tuning)."""
        if not self.use_lora:
            return None
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=list(self.lora_target_modules), task_type="CAUSAL_LM")


@dataclass
class ModuleGRPOConfig(LoraOptions):
    """One module's GRPO run. Field names follow ``trl.GRPOConfig`` where they map one to one."""

    # What one step is: prompts x completions each (TRL's per-device batch counts completions).
    prompts_per_step: int = 4
    num_generations: int = 4
    # None: the module's own ``max_tokens`` (what it may write at inference), so that training samples what
    # inference would and a reward never scores a plan cut short that the program would have finished.
    max_completion_length: int | None = None
    # Sequences per forward/backward pass (None: one prompt's group). The step's prompts x generations are
    # generated together, then trained in micro-batches with gradient accumulation: activation memory grows
    # with the micro-batch, and a whole step in one pass (16 sequences of 800 tokens) needs over 11 GB on CPU.
    micro_batch_size: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    # Optimisation
    learning_rate: float = 1e-5
    beta: float = 0.04  # KL penalty to the starting model; 0 skips the reference model (faster, no KL)
    epsilon: float = 0.2
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    max_steps: int = 50
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    # Full fine-tuning or LoRA: see LoraOptions
    # Bookkeeping
    logging_steps: int = 1
    save_steps: int = 10  # checkpoints an interrupted run resumes from
    save_total_limit: int = 2
    keep_checkpoints: bool = False  # checkpoints are removed once the trained weights are saved
    resume: bool = True
    zero_std_warning: float = 0.95  # warn when this share of groups (or more) carries no learning signal
    # Where it runs
    use_cpu: bool | None = None  # None: CPU when no CUDA device is visible
    dtype: Literal["float32", "bfloat16"] = "float32"  # the weights (and so the optimizer's updates)
    # "bf16": forward and backward run under bfloat16 autocast while the weights stay in ``dtype`` (TRL's
    # ``bf16=True`` with a float32 model, accelerate's ``--mixed_precision bf16``). Measured on this CPU
    # (AVX512-BF16): a forward + backward of SmolLM2-135M over 2 x 660 tokens took 10.5 s against 18 s.
    # Pure bfloat16 weights are no substitute: an update of 2e-5 is below their resolution and is lost.
    mixed_precision: Literal["no", "bf16"] = "no"
    num_threads: int | None = 2  # torch threads on CPU (the machine is shared)
    gradient_checkpointing: bool = False
    # Who samples the completions: "transformers" is TRL's ``model.generate``; "apexdsp" is the local engine's
    # batching decoder (a prompt prefilled once for its whole group, finished rows dropped; engine_rollout.py)
    rollout_engine: Literal["transformers", "apexdsp"] = "transformers"
    use_vllm: bool = False
    vllm_mode: Literal["colocate", "server"] = "colocate"
    vllm_server_base_url: str | None = None
    vllm_gpu_memory_utilization: float = 0.3
    trl_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ApexError(f"num_generations must be >= 2 (GRPO compares completions), got {self.num_generations}")
        for name in ("prompts_per_step", "max_completion_length", "max_steps", "save_steps", "logging_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ApexError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vllm_mode == "server" and self.use_vllm and not self.vllm_server_base_url:
            raise ApexError("vllm_mode='server' needs vllm_server_base_url (where `trl vllm-serve` listens)")
        if self.rollout_engine not in ("transformers", "apexdsp"):
            raise ApexError(f"rollout_engine must be 'transformers' or 'apexdsp', got {self.rollout_engine!r}")
        if self.rollout_engine == "apexdsp" and self.use_vllm:
            raise ApexError("rollout_engine='apexdsp' and use_vllm=True both want to sample: choose one")
        if self.mixed_precision not in ("no", "bf16"):
            raise ApexError(f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")
        self.lora_target_modules = tuple(self.lora_target_modules)
        self.micro_batch()  # a size that does not divide the step fails here, not after prompt collection

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def on_cpu(self) -> bool:
        if self.use_cpu is not None:
            return self.use_cpu
        import torch

        return not torch.cuda.is_available()

    def micro_batch(self) -> int:
        size = self.micro_batch_size or self.num_generations
        total = self.prompts_per_step * self.num_generations
        if size < 1 or total % size:
            raise ApexError(f"micro_batch_size {size} must divide prompts_per_step x num_generations = {total}")
        return size

    def to_trl(self, output_dir: str | Path) -> Any:
        """The ``trl.GRPOConfig`` for a run writing checkpoints under ``output_dir``."""
        from trl import GRPOConfig

        settings: dict[str, Any] = dict(
            output_dir=str(output_dir),
            per_device_train_batch_size=self.micro_batch(),
            gradient_accumulation_steps=self.prompts_per_step * self.num_generations // self.micro_batch(),
            num_generations=self.num_generations,
            max_completion_length=self.max_completion_length or DEFAULT_COMPLETION_TOKENS,
            temperature=self.temperature,
            top_p=self.top_p,
            learning_rate=self.learning_rate,
            beta=self.beta,
            epsilon=self.epsilon,
            loss_type=self.loss_type,
            scale_rewards=self.scale_rewards,
            max_steps=self.max_steps,
            warmup_steps=self.warmup_steps,
            max_grad_norm=self.max_grad_norm,
            seed=self.seed,
            logging_steps=self.logging_steps,
            save_strategy="steps",
            save_steps=self.save_steps,
            save_total_limit=self.save_total_limit,
            save_only_model=False,  # optimizer and RNG state too: a resumed run continues, not restarts
            report_to="none",  # metrics go to the active MLflow run through apexdsp's callback
            use_cpu=self.on_cpu(),
            bf16=self.dtype == "bfloat16" or self.mixed_precision == "bf16",
            fp16=False,
            gradient_checkpointing=self.gradient_checkpointing,
            use_vllm=self.use_vllm,
            vllm_mode=self.vllm_mode,
            vllm_server_base_url=self.vllm_server_base_url,
            vllm_gpu_memory_utilization=self.vllm_gpu_memory_utilization,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            disable_tqdm=False,
        )
        settings.update(self.trl_overrides)
        return GRPOConfig(**settings)

__all__ = ["LoraOptions", "ModuleGRPOConfig"]
