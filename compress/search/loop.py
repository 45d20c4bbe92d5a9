"""The search loop: rollouts from the policies, candidates evaluated once each (by architecture
hash), one REINFORCE update per batch of rollouts, and the whole state checkpointed after every
update so a killed search resumes where it stopped."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from compress.io import atomic_path
from compress.log import logger
from compress.search.budget import CostBound, removal_mask, shrink_mask
from compress.search.policies import (
    MovingBaseline,
    RemovalPolicy,
    Rollout,
    ShrinkPolicy,
    reinforce_step,
)
from compress.search.records import (
    HISTORY_FILE,
    STATE_FILE,
    CandidateRecord,
    Evaluation,
    RemovalResult,
    SearchState,
    UpdateSummary,
    read_history,
    write_history,
)
from compress.search.reward import INVALID, constrained_reward
from compress.search.settings import SearchSettings
from compress.search.surgery import Candidate
from compress.search.units import FEATURES, SUPPORTED, Unit, feature_matrix

# evaluate(candidate) -> its evaluation: at least reward_raw (None when invalid) and violates, as
# an `Evaluation` or a mapping of its fields
Evaluate = Callable[[Candidate], Evaluation | Mapping[str, Any]]
# share(records) -> every rank's records, concatenated (all_gather under torchrun)
Share = Callable[[list[CandidateRecord]], list[CandidateRecord]]


class PolicyMismatch(ValueError):
    """A warm-start policy file made for other scales or another hidden size."""


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The policies are tiny: on one thread they run many times faster than on contended cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def phases(mode: str) -> list[str]:
    return ["removal", "shrink"] if mode == "sequential" else [mode]


class PolicySearch:
    """N2N-style search over `units`; `evaluate` scores a candidate (see `Evaluate`)."""

    def __init__(
        self,
        units: list[Unit],
        evaluate: Evaluate,
        settings: SearchSettings,
        work_dir: Path,
        *,
        seed: int = 0,
        writer: bool = True,
        warm_start: Path | None = None,
        rank: int = 0,
        world_size: int = 1,
        share: Share | None = None,
        on_update: Callable[[CandidateRecord | None], None] | None = None,
        bounds: list[CostBound] | None = None,
    ):
        """`seed` initialises the policies and their sampler. Under torchrun every rank samples
        the same rollouts (same seed); the new candidates of an update are split across ranks
        (`rank`, `world_size`) and their records pooled with `share`. `on_update(best)` runs on
        every rank after each update's records are in. `bounds` hold the shrink and removal actions
        to the budgets they estimate (compress.search.budget). A state left in `work_dir` by an earlier
        run is resumed (InputError when it cannot be read); a warm start with other scales or
        another hidden size raises PolicyMismatch."""
        self.units, self.evaluate, self.s = units, evaluate, settings
        self.bounds = bounds or []
        self.work_dir, self.writer = Path(work_dir), writer
        self.rank, self.world_size = rank, world_size
        self.share = share or (lambda records: records)
        self.on_update = on_update
        n_features = len(FEATURES)
        torch.manual_seed(seed)  # policy initialisation
        self.removal = RemovalPolicy(n_features, settings.hidden)
        self.shrink = ShrinkPolicy(n_features, len(settings.scales), settings.hidden)
        params = [*self.removal.parameters(), *self.shrink.parameters()]
        self.optimizer = torch.optim.Adam(params, lr=settings.policy_lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.baseline = MovingBaseline(settings.baseline_decay)
        self.phase_index = self.update = 0
        self.summaries: list[UpdateSummary] = []  # one per policy update
        self.stage1: RemovalResult | None = None  # the removal phase's best architecture
        self.records: dict[str, CandidateRecord] = {}  # architecture hash -> evaluation
        if not self._resume() and warm_start is not None:
            self.load_policies(warm_start)

    # ------------------------------------------------------------------ state

    def state(self) -> SearchState:
        """Everything a resumed search needs (checkpointed after every update)."""
        return SearchState(
            phase_index=self.phase_index,
            update=self.update,
            removal=self.removal.state_dict(),
            shrink=self.shrink.state_dict(),
            optimizer=self.optimizer.state_dict(),
            baseline=self.baseline.value,
            generator=self.generator.get_state(),
            summaries=list(self.summaries),
            stage1=self.stage1,
        )

    def _checkpoint(self) -> None:
        if self.writer:
            self.state().save(self.work_dir / STATE_FILE)

    def _write_history(self) -> None:
        if self.writer:
            write_history(self.work_dir, self.records.values())

    def _resume(self) -> bool:
        if (self.work_dir / HISTORY_FILE).is_file():
            self.records = {r.key: r for r in read_history(self.work_dir)}
        path = self.work_dir / STATE_FILE
        if not path.is_file():
            return False
        state = SearchState.load(path)
        self.removal.load_state_dict(state.removal)
        self.shrink.load_state_dict(state.shrink)
        self.optimizer.load_state_dict(state.optimizer)
        self.baseline.value = state.baseline
        self.generator.set_state(state.generator)
        self.phase_index, self.update = state.phase_index, state.update
        self.summaries, self.stage1 = state.summaries, state.stage1
        logger.info(
            f"search: resuming at {phases(self.s.mode)[min(self.phase_index, 1)]} "
            f"update {self.update}/{self.s.updates} ({len(self.records)} candidates known)"
        )
        return True

    def save_policies(self, path: Path) -> None:
        """The trained policies, for a warm start on another teacher."""
        with atomic_path(path) as tmp:
            torch.save(
                {
                    "removal": self.removal.state_dict(),
                    "shrink": self.shrink.state_dict(),
                    "features": list(FEATURES),
                    "scales": list(self.s.scales),
                    "hidden": self.s.hidden,
                },
                tmp,
            )

    def load_policies(self, path: Path) -> None:
        saved = torch.load(path, weights_only=True)
        if saved["scales"] != list(self.s.scales) or saved["hidden"] != self.s.hidden:
            raise PolicyMismatch(
                f"{path}: policies saved with scales {saved['scales']} and hidden {saved['hidden']}"
                f", this search uses {list(self.s.scales)} and {self.s.hidden}"
            )
        self.removal.load_state_dict(saved["removal"])
        self.shrink.load_state_dict(saved["shrink"])

    # ------------------------------------------------------------------ rollouts

    def _shrink_units(self) -> tuple[list[Unit], tuple[str, ...]]:
        removed = tuple(self.stage1.removed) if self.stage1 else ()
        return [u for u in self.units if u.shrinkable and u.name not in removed], removed

    def _rollout(self, phase: str) -> tuple[Rollout, Candidate]:
        uniform = self.s.strategy == "random"
        removable = [u for u in self.units if u.removable]
        removed: tuple[str, ...] = ()
        parts: list[Rollout] = []
        if phase in ("removal", "joint"):
            allowed = None
            if self.bounds and self._budgeted(phase):
                shrinkable = (
                    [u.name for u in self.units if u.shrinkable] if phase == "joint" else []
                )
                names = [u.name for u in removable]
                allowed = removal_mask(self.bounds, names, shrinkable)
            r = self.removal.sample(feature_matrix(removable), self.generator, uniform, allowed)
            removed = tuple(u.name for u, a in zip(removable, r.actions, strict=True) if a == 0)
            parts.append(r)
        scales: dict[str, float] = {}
        if phase in ("shrink", "joint"):
            if phase == "shrink":
                targets, removed = self._shrink_units()
            else:
                targets = [u for u in self.units if u.shrinkable and u.name not in removed]
            if targets:
                allowed = None
                if self.bounds:
                    names = [u.name for u in targets]
                    allowed = shrink_mask(self.bounds, removed, names, len(self.s.scales))
                r = self.shrink.sample(feature_matrix(targets), self.generator, uniform, allowed)
                scales = {u.name: self.s.scales[a] for u, a in zip(targets, r.actions, strict=True)}
                parts.append(r)
        return Rollout.join(parts), Candidate.make(removed, scales)

    def _evaluate_new(
        self, candidates: list[Candidate], phase: str, global_update: int, bar: tqdm
    ) -> None:
        """Evaluate the candidates not seen before, each once, this rank's share of them."""
        by_key = {c.key(): c for c in candidates if c.key() not in self.records}
        mine = list(by_key)[self.rank :: self.world_size]
        new = []
        for key in mine:
            t0 = time.perf_counter()
            result = self.evaluate(by_key[key])
            record = CandidateRecord.of(
                by_key[key],
                result,
                phase=phase,
                update=global_update,
                eval_s=time.perf_counter() - t0,
                rank=self.rank,
            )
            new.append(record)
            if self.world_size == 1:  # a candidate evaluated before a stop is not evaluated again
                self.records[key] = record
                self._write_history()
            bar.update(1)
        for record in self.share(new):
            self.records[record.key] = record
        self._write_history()
        bar.update(len(candidates) - len(mine))

    def _budgeted(self, phase: str) -> bool:
        """Whether the budgets shape this phase's rewards. A sequential search's removal phase is
        scored without them: its best architecture is only the start of the shrink phase, which
        can still cut widths to the budget, and forcing the budget on removal alone favours
        removing too much (the more damaging action)."""
        return not (self.s.mode == "sequential" and phase == "removal")

    def _reward(self, candidate: Candidate, phase: str, global_update: int) -> float:
        """What the policy learns from: the raw reward, penalised where a budget is broken."""
        record = self.records[candidate.key()]
        if record.reward_raw is None:
            return INVALID
        violates = record.violates and self._budgeted(phase)
        return constrained_reward(
            record.reward_raw, violates, global_update, self.s.penalty_anneal_updates
        )

    def run(self) -> CandidateRecord | None:
        """Run (or finish) every phase; returns the best record within the budgets (or None)."""
        names = phases(self.s.mode)
        total = len(names) * self.s.updates * self.s.rollouts
        done = (self.phase_index * self.s.updates + self.update) * self.s.rollouts
        bar = tqdm(total=total, initial=done, desc="search", unit="candidate", disable=None)
        while self.phase_index < len(names):
            phase = names[self.phase_index]
            if not self._phase_has_actions(phase):
                logger.info(f"search: no units to act on in the {phase} phase, skipped")
                self._next_phase(phase)
                continue
            while self.update < self.s.updates:
                self._one_update(phase, bar)
                self._checkpoint()
            self._next_phase(phase)
            self._checkpoint()
        bar.close()
        return self.best()

    def _phase_has_actions(self, phase: str) -> bool:
        if phase == "removal":
            return any(u.removable for u in self.units)
        if phase == "shrink":
            return bool(self._shrink_units()[0])
        return any(u.removable or u.shrinkable for u in self.units)

    def _next_phase(self, phase: str) -> None:
        if phase == "removal":
            scored = [r for r in self.records.values() if r.phase == "removal"]
            pool = [r for r in scored if r.valid]
            if self._budgeted(phase):  # keep to the budgets where any candidate met them
                pool = [r for r in pool if not r.violates] or pool
            if pool:
                best = max(pool, key=lambda r: r.reward_raw)
                self.stage1 = RemovalResult(removed=list(best.removed), key=best.key)
        self.phase_index += 1
        self.update = 0
        self.baseline = MovingBaseline(self.s.baseline_decay)  # a new action space

    def _one_update(self, phase: str, bar: tqdm) -> None:
        global_update = self.update + self.phase_index * self.s.updates
        with one_thread():  # the policy changes only after the update: sample every rollout first
            sampled = [self._rollout(phase) for _ in range(self.s.rollouts)]
        bar.set_postfix(phase=phase, update=f"{self.update + 1}/{self.s.updates}")
        self._evaluate_new([c for _, c in sampled], phase, global_update, bar)
        rollouts = [r for r, _ in sampled]
        rewards = [self._reward(c, phase, global_update) for _, c in sampled]
        keys = [c.key() for _, c in sampled]
        best = self.best()
        bar.set_postfix(
            phase=phase,
            update=f"{self.update + 1}/{self.s.updates}",
            best=f"{best.reward_raw:.3f}" if best else "-",
        )
        if self.on_update is not None:
            self.on_update(best)
        baseline = self.baseline.value
        if self.s.strategy == "policy_gradient":
            with one_thread():
                reinforce_step(
                    self.optimizer, rollouts, rewards, self.baseline, self.s.entropy_weight
                )
        self.summaries.append(
            UpdateSummary(
                phase=phase,
                update=global_update,
                rewards=rewards,
                mean_reward=sum(rewards) / len(rewards),
                baseline=baseline,
                candidates=keys,
            )
        )
        self.update += 1

    def best(self) -> CandidateRecord | None:
        """The candidate with the highest reward among the valid ones within the budgets."""
        ok = [r for r in self.records.values() if r.valid and not r.violates]
        return max(ok, key=lambda r: r.reward_raw) if ok else None

    def why_no_best(self) -> str:
        """Why `best()` is None, in a sentence: nothing to act on, the first candidate that could
        not be built or run (its error), or every valid candidate over the budgets."""
        records = list(self.records.values())
        text = f"no candidate within the budgets among {len(records)} evaluated"
        if not records:
            removable = sum(u.removable for u in self.units)
            shrinkable = sum(bool(u.shrinkable) for u in self.units)
            return (
                f"{text}: the {self.s.mode} search had no unit to act on ({len(self.units)} "
                f"units, {removable} removable, {shrinkable} shrinkable); it acts on {SUPPORTED}"
            )
        failed = [r for r in records if not r.valid]
        if failed:
            text += (
                f"; {len(failed)} failed, the first ({failed[0].key}) with: "
                f"{failed[0].error or 'no error recorded'}"
            )
        if len(failed) < len(records):
            text += (
                f"; {len(records) - len(failed)} over the budgets: raise the budgets or the "
                "number of updates"
            )
        return text
