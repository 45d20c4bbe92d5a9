"""Structural search (N2N-style): removable/shrinkable units, candidate surgery, LSTM policies,
reward and the REINFORCE search loop behind the `search` stage.

Modules, bottom up: `units` (what a search acts on), `surgery` (a candidate as a real module),
`budget` (action bounds), `policies` and `reward`, `settings` (the stage's fields), `records`
(history and state files), `loop` (PolicySearch), `evaluate` (candidate fine-tuning and scoring),
`run` (a whole search from explicit inputs), `build` (a searched student rebuilt), `plot`.
"""

from compress.search.build import build_student
from compress.search.records import (
    CandidateRecord,
    Evaluation,
    RemovalResult,
    SearchState,
    UpdateSummary,
    read_history,
    read_search_state,
)
from compress.search.settings import SearchSettings

__all__ = [
    "CandidateRecord",
    "Evaluation",
    "RemovalResult",
    "SearchSettings",
    "SearchState",
    "UpdateSummary",
    "build_student",
    "read_history",
    "read_search_state",
]
