"""What a search writes: one record per evaluated candidate (`history.jsonl`, a JSON object per
line) and the state checkpointed after every update (`search_state.pt`, read with
`torch.load(weights_only=True)`), as typed values, with the functions that read them back."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compress.errors import InputError
from compress.io import atomic_path, write_text
from compress.search.surgery import Candidate

STATE_FILE = "search_state.pt"
HISTORY_FILE = "history.jsonl"
POLICY_FILE = "policy.pt"
# 2: typed summaries and stage-1 result; 1 (no `version` key): the stage-1 result a JSON string
STATE_VERSION = 2


@dataclass(kw_only=True)
class Evaluation:
    """What evaluating one candidate gave. `reward_raw` is None for a candidate that could not be
    built or run (`error` says why); the measurements are those the evaluator took."""

    params: float | None = None
    flops: float | None = None
    latency_ms: float | None = None
    val_top1: float | None = None
    compression: float | None = None  # C of the reward, for the cost it uses
    reward_raw: float | None
    violates: bool = False  # over a budget
    train_images: int | None = None  # images its fine-tuning processed
    error: str | None = None

    @property
    def valid(self) -> bool:
        return self.reward_raw is not None


# Written only when measured, as an evaluator that takes none of them records none
_OPTIONAL = ("params", "flops", "latency_ms", "val_top1", "compression", "train_images", "error")


@dataclass(kw_only=True)
class CandidateRecord(Evaluation):
    """One evaluated candidate: its architecture, its evaluation, and when and where it ran."""

    key: str  # the architecture hash (`Candidate.key`)
    removed: list[str] = field(default_factory=list)
    scales: dict[str, float] = field(default_factory=dict)  # units kept at a width below 1
    phase: str = ""  # removal, shrink or joint
    update: int = 0  # the policy update (counted over the phases) that sampled it
    eval_s: float = 0.0
    rank: int = 0  # the torchrun rank that evaluated it (and kept its weights)

    @classmethod
    def of(
        cls, candidate: Candidate, result: Evaluation | Mapping[str, Any], **where: Any
    ) -> CandidateRecord:
        """The record of `candidate`, evaluated as `result` (an `Evaluation`, or a mapping of its
        fields), with `where` (phase, update, eval_s, rank)."""
        if isinstance(result, Evaluation):
            result = {f.name: getattr(result, f.name) for f in dataclasses.fields(Evaluation)}
        return cls(key=candidate.key(), **candidate.to_dict(), **result, **where)

    def candidate(self) -> Candidate:
        return Candidate.make(self.removed, self.scales)

    def to_dict(self) -> dict[str, Any]:
        """A JSON object: the architecture first; measurements not taken are left out."""
        out = {"key": self.key, "removed": list(self.removed), "scales": dict(self.scales)}
        for f in dataclasses.fields(Evaluation):
            value = getattr(self, f.name)
            if value is not None or f.name not in _OPTIONAL:
                out[f.name] = value
        return out | {
            "phase": self.phase,
            "update": self.update,
            "eval_s": self.eval_s,
            "rank": self.rank,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CandidateRecord:
        """A record from its JSON object; keys this version does not know are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def read_history(folder: Path) -> list[CandidateRecord]:
    """The candidates a search stage folder's `history.jsonl` holds, in evaluation order."""
    path = Path(folder) / HISTORY_FILE
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(CandidateRecord.from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError) as e:
            raise InputError(f"{path}, line {n}: not a candidate record ({e})") from None
    return records


def write_history(folder: Path, records: Iterable[CandidateRecord]) -> None:
    write_text(
        Path(folder) / HISTORY_FILE, "".join(json.dumps(r.to_dict()) + "\n" for r in records)
    )


@dataclass
class UpdateSummary:
    """One policy update: the rewards its rollouts got, and the baseline they were compared with."""

    phase: str
    update: int  # counted over the phases
    rewards: list[float]
    mean_reward: float
    baseline: float | None  # None at a phase's first update (its own mean is the baseline)
    candidates: list[str]  # the rollouts' architecture hashes, in order

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UpdateSummary:
        return cls(**data)


@dataclass
class RemovalResult:
    """The removal phase's best architecture by reward: where a sequential search's shrink phase
    starts."""

    removed: list[str]
    key: str | None = None  # its record's key (None in a state written before it was kept)


@dataclass
class SearchState:
    """Everything a search needs to resume after its last finished update."""

    phase_index: int
    update: int  # finished updates of the current phase
    removal: dict[str, torch.Tensor]  # the policies' state dicts
    shrink: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    baseline: float | None
    generator: torch.Tensor  # the rollout sampler's RNG state
    summaries: list[UpdateSummary] = field(default_factory=list)
    stage1: RemovalResult | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain containers, tensors and numbers only (what `torch.load(weights_only=True)` reads)."""
        return {
            "version": STATE_VERSION,
            "phase_index": self.phase_index,
            "update": self.update,
            "removal": self.removal,
            "shrink": self.shrink,
            "optimizer": self.optimizer,
            "baseline": self.baseline,
            "generator": self.generator,
            "summaries": [dataclasses.asdict(s) for s in self.summaries],
            "stage1": None if self.stage1 is None else dataclasses.asdict(self.stage1),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchState:
        """The state `to_dict` gave, or one written before `version` (stage-1 result as JSON)."""
        version = data.get("version", 1)
        if version > STATE_VERSION:
            raise ValueError(f"state version {version}, this version reads up to {STATE_VERSION}")
        stage1 = data["stage1"]
        if isinstance(stage1, str):  # version 1: {"candidate": {"removed": [...]}} or null
            stage1 = json.loads(stage1)
            stage1 = None if stage1 is None else {"removed": stage1["candidate"]["removed"]}
        return cls(
            phase_index=data["phase_index"],
            update=data["update"],
            removal=data["removal"],
            shrink=data["shrink"],
            optimizer=data["optimizer"],
            baseline=data["baseline"],
            generator=data["generator"],
            summaries=[UpdateSummary.from_dict(s) for s in data["summaries"]],
            stage1=None if stage1 is None else RemovalResult(**stage1),
        )

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            torch.save(self.to_dict(), tmp)

    @classmethod
    def load(cls, path: Path) -> SearchState:
        """The state at `path`; InputError, saying how to start over, when it cannot be read."""
        try:
            return cls.from_dict(torch.load(path, weights_only=True))
        except Exception as e:  # a truncated, foreign or newer file: one message, no traceback
            reason = f"missing {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
            raise InputError(
                f"{path}: not a search state this version can resume ({type(e).__name__}: "
                f"{reason}); delete it and history.jsonl beside it to start the search over"
            ) from None


def read_search_state(folder: Path) -> SearchState:
    """The state a search stage folder holds (`search_state.pt`); FileNotFoundError without one."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no search state (the search has not finished an update)")
    return SearchState.load(path)
