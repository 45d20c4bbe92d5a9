"""What a search is configured with: every field of the `search` stage, which inherits them, so a
recipe writes them flat under the stage and the search reads them as they were validated."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from compress.config import StrictModel, resolve_path

N2N_SCALES = [0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


class SearchSettings(StrictModel):
    """The action space, the policies and their training, the budgets and candidate training."""

    mode: Literal["sequential", "removal", "shrink", "joint"] = Field(
        "sequential",
        description="sequential: removal policy, then shrinkage on the best removal result "
        "(as in N2N); joint: both per rollout.",
    )
    start_from: Literal["model", "teacher"] = Field(
        "model",
        description="Candidates are cut from the current model, or from the teacher (after an "
        "adapt_teacher stage, the adapted copy), as N2N derives its students from the teacher.",
    )
    strategy: Literal["policy_gradient", "random"] = Field(
        "policy_gradient", description="random: uniform actions over the same space (a baseline)."
    )
    updates: int = Field(10, gt=0, description="Policy updates per phase (M).")
    rollouts: int = Field(5, gt=0, description="Candidates sampled per update (N).")
    scales: list[float] = Field(
        N2N_SCALES, min_length=1, description="Width scales the shrink policy picks from."
    )
    round_to: int = Field(8, gt=0, description="Shrunk channel counts are multiples of this.")
    cost: Literal["params", "flops", "latency"] = Field(
        "params", description="Cost in the reward's compression term C."
    )
    max_params: int | None = Field(None, gt=0, description="Budget: parameters.")
    max_flops: int | None = Field(None, gt=0, description="Budget: FLOPs per image.")
    max_latency_ms: float | None = Field(
        None, gt=0, description="Budget: eager batch-1 latency on this machine (ms)."
    )
    bound_actions: bool = Field(
        True,
        description="Shrink and removal actions that would leave a candidate over max_params or "
        "max_flops (each unit's saving measured at each kept width) are not sampled, as AMC "
        "bounds its actions; off: sampled freely and only penalised, as in N2N. A sequential "
        "search's removal phase is never bounded (its shrink phase reaches the budget).",
    )
    penalty_anneal_updates: int = Field(
        15, ge=0, description="Over-budget penalty goes from soft to a hard -1 over these updates."
    )
    policy_lr: float = Field(0.01, gt=0, description="Adam learning rate of the policies.")
    entropy_weight: float = Field(0.0, ge=0, description="Entropy bonus weight.")
    baseline_decay: float = Field(0.9, ge=0, lt=1, description="Moving-average baseline decay.")
    hidden: int = Field(30, gt=0, description="LSTM hidden size of both policies.")
    warm_start: Path | None = Field(
        None, description="policy.pt of an earlier search (policy transfer)."
    )
    candidate_steps: int = Field(
        50, ge=0, description="KD fine-tuning steps per candidate (0: inherited weights only)."
    )
    candidate_batch_size: int = Field(64, gt=0, description="Batch size of candidate training.")
    candidate_images: int | None = Field(
        5000, gt=0, description="Train images candidates train on (null: the whole split)."
    )
    candidate_lr: float = Field(0.002, gt=0, description="Peak LR of candidate fine-tuning.")
    candidate_optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd or adamw.")
    temperature: float = Field(4.0, gt=0, description="KD temperature of candidate training.")
    alpha: float = Field(0.9, ge=0, le=1, description="KD weight of candidate training.")
    val_images: int | None = Field(
        1000, gt=0, description="Validation images each candidate is scored on (null: all)."
    )
    reinit: bool = Field(
        False, description="Re-initialise candidates (N2N's from-scratch children)."
    )
    project_shape_changes: bool = Field(
        False,
        description="Residual blocks that change shape (downsampling, widening) may be removed "
        "too: such a block becomes its own shortcut path (a ResNet's 1x1 conv + BN downsample or "
        "the CIFAR ResNets' zero-pad shortcut, then the block's activation), or a new 1x1 conv + BN "
        "for an inverted residual without a skip. Off: they stay (N2N keeps strided layers).",
    )

    _resolve_warm = field_validator("warm_start", mode="before")(resolve_path)

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        if any(not 0 < s <= 1 for s in v):
            raise ValueError(f"every scale must be in (0, 1] (got {v})")
        return v

    @field_validator("warm_start")
    @classmethod
    def _warm_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"policy file not found: {v}")
        return v

    @property
    def cost_key(self) -> str:
        """The cost measurement the reward uses (`latency` is measured as `latency_ms`)."""
        return "latency_ms" if self.cost == "latency" else self.cost
