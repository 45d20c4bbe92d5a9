"""A searched student rebuilt outside the search: the units found, the surgery applied, the spec
that reloads it, in one call."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from compress.models import ModelSpec
from compress.search.records import CandidateRecord
from compress.search.surgery import Candidate, build_candidate, candidate_spec
from compress.search.units import find_units


def as_candidate(candidate: Candidate | CandidateRecord | Mapping[str, Any]) -> Candidate:
    """A Candidate from itself, a record, or a mapping with `removed` and `scales` (a stage's
    `best_candidate` metric)."""
    if isinstance(candidate, Candidate):
        return candidate
    if isinstance(candidate, CandidateRecord):
        return candidate.candidate()
    return Candidate.make(candidate.get("removed", ()), candidate.get("scales", {}))


def build_student(
    teacher: nn.Module,
    spec: ModelSpec,
    candidate: Candidate | CandidateRecord | Mapping[str, Any],
    input_size: tuple[int, int, int],
    round_to: int = 8,
    reinit: bool = False,
) -> tuple[nn.Module, ModelSpec]:
    """The candidate cut from `teacher` (whose architecture `spec` rebuilds) as the search builds
    it before fine-tuning, with the teacher's weights (`reinit`: fresh ones), in eval mode, and
    the `search:` spec that rebuilds it. `round_to` must be the search's. The teacher is not
    changed (its units are found in eval mode, its mode restored)."""
    chosen = as_candidate(candidate)
    training = teacher.training
    teacher.eval()
    try:
        units = find_units(teacher, input_size)
        model = build_candidate(teacher, units, chosen, input_size, round_to, reinit)
    finally:
        teacher.train(training)
    return model, candidate_spec(spec, model, units, chosen, input_size)
