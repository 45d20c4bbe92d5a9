"""Training objectives: `objective(model, images, labels, indices) -> (loss, student_logits)`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.train.teacher_logits import TeacherLogits


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Hinton KD: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    The KL term is averaged over the batch (`batchmean`), the mathematically correct reduction.
    """
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return alpha * t * t * kl + (1.0 - alpha) * ce


class CrossEntropyObjective:
    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def __call__(self, model: nn.Module, images, labels, indices):
        logits = model(images)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing), logits


class DistillationObjective:
    """KD against a fixed teacher; uses precomputed teacher logits by sample index when given."""

    def __init__(
        self,
        teacher: nn.Module,
        temperature: float,
        alpha: float,
        label_smoothing: float = 0.0,
        teacher_logits: TeacherLogits | None = None,
    ):
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha
        self.label_smoothing = label_smoothing
        self.teacher_logits = teacher_logits

    def __call__(self, model: nn.Module, images, labels, indices):
        if self.teacher_logits is not None:
            teacher_logits = self.teacher_logits[indices.cpu()].to(images.device)
        else:
            with torch.no_grad():
                teacher_logits = self.teacher(images)
        logits = model(images)
        loss = kd_loss(
            logits,
            teacher_logits.float(),
            labels,
            self.temperature,
            self.alpha,
            self.label_smoothing,
        )
        return loss, logits
