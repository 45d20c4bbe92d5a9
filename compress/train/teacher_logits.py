"""Teacher logits computed once and looked up by sample index.

Only the samples a stage trains on get a row (a search fine-tunes candidates on a subset of the
train split). With many classes the rows keep, as TinyViT does, only the teacher's top-k
probabilities in half precision with their class indices; a lookup spreads the remaining
probability evenly over the other classes and returns log-probabilities, which are the teacher's
logits up to a constant per row for the kept classes, so a KD loss at any temperature reads them
as logits.
"""

from __future__ import annotations

import torch

DENSE_MAX_CLASSES = 100  # up to this many classes every logit is kept (float32)
TOP_K = 10


class TeacherLogits:
    """Rows of teacher outputs for some train samples; `store[indices]` gives their logits."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state
        self.row_of = state["row_of"]  # sample index -> row, -1 where never computed

    @classmethod
    def from_rows(
        cls, size: int, samples: torch.Tensor, logits: torch.Tensor, top_k: int | None = None
    ) -> TeacherLogits:
        """`logits[i]` belongs to train sample `samples[i]` of a split of `size` samples;
        `top_k` defaults to TOP_K above DENSE_MAX_CLASSES classes, else every logit."""
        classes = logits.shape[1]
        if top_k is None and classes > DENSE_MAX_CLASSES:
            top_k = TOP_K
        row_of = torch.full((size,), -1, dtype=torch.long)
        row_of[samples] = torch.arange(len(samples))
        state = {"row_of": row_of, "classes": torch.tensor(classes)}
        if top_k is None or top_k >= classes:
            state["logits"] = logits.float()
        else:
            values, indices = logits.float().softmax(1).topk(top_k, dim=1)
            state["top_probs"] = values.half()
            state["top_classes"] = indices.to(torch.int32)
        return cls(state)

    @classmethod
    def load(cls, obj: dict[str, torch.Tensor] | torch.Tensor) -> TeacherLogits:
        if isinstance(obj, torch.Tensor):  # an older file: one dense row per train sample
            return cls.from_rows(len(obj), torch.arange(len(obj)), obj, top_k=obj.shape[1])
        return cls(obj)

    @property
    def sparse(self) -> bool:
        return "top_probs" in self.state

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())

    def __getitem__(self, samples: torch.Tensor) -> torch.Tensor:
        rows = self.row_of[samples]
        if (rows < 0).any():
            missing = samples[rows < 0][:5].tolist()
            raise KeyError(f"no teacher logits stored for train samples {missing}")
        if not self.sparse:
            return self.state["logits"][rows]
        classes = int(self.state["classes"])
        probs = self.state["top_probs"][rows].float()
        k = probs.shape[1]
        rest = (1.0 - probs.sum(1, keepdim=True)).clamp_min(1e-8) / (classes - k)
        full = rest.expand(len(rows), classes).clone()
        full.scatter_(1, self.state["top_classes"][rows].long(), probs)
        return full.clamp_min(1e-8).log()
