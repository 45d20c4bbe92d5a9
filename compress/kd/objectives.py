"""Feature distillation objectives for the one training loop (`fit`), as `nn.Module`s.

The projectors are the objective's parameters: `fit` trains and checkpoints them with the
student, and they never become part of the student. Both objectives add their feature terms to
Hinton KD on the logits (`kd_loss`).

- `FeatureHintObjective`: a hint projector per tap pair and a mean squared error (FitNets-style).
- `ScaleKDObjective` (Fan et al. 2024): cross-attention projectors (CAP), dual-view feature
  mimicking (DFM: spatial view + frequency view without the direct component) and teacher
  parameter perception (TPP: the projected student tokens of the first tap pair run through the
  teacher's frozen last stage, are compared with the teacher's final features, and become the
  queries of the second pair's projectors). Each of the three can be switched off: without CAP
  the projectors are hint projectors, without DFM only the spatial view is used, without TPP
  each pair is compared directly with learned queries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import InputError
from compress.kd.losses import frequency_loss, spatial_loss
from compress.kd.projectors import CrossAttentionProjector, HintProjector
from compress.kd.taps import FeatureTaps, TapSpec, first_tensor, from_map, stage_names, to_map
from compress.train.objectives import kd_loss


def _shape(x: torch.Tensor) -> str:
    return "x".join(str(s) for s in x.shape[1:])


class TappedDistillation(nn.Module):
    """Teacher and student taps matched pairwise, probed once on `probe` images for their shapes."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        teacher_taps: Sequence[TapSpec],
        student_taps: Sequence[TapSpec],
        probe: torch.Tensor,
        temperature: float,
        alpha: float,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        if len(teacher_taps) != len(student_taps):
            raise InputError(
                f"teacher_taps {list(teacher_taps)} and student_taps {list(student_taps)}: "
                "need the same number of taps (they are matched pairwise)"
            )
        self._teacher = (teacher,)  # a tuple: not a submodule, so never trained or checkpointed
        self.temperature, self.alpha, self.label_smoothing = temperature, alpha, label_smoothing
        self.teacher_taps = FeatureTaps(teacher, teacher_taps, "teacher")
        self.student_taps = FeatureTaps(student, student_taps, "student")
        _, t_raw = self.teacher_pass(probe)
        self.teacher_taps.learn_layouts(t_raw)
        was_training = student.training
        student.eval()
        with torch.no_grad(), self.student_taps.capture() as s_raw:
            student(probe)
        student.train(was_training)
        self.student_taps.learn_layouts(s_raw)
        self.probe_teacher_raw = t_raw
        self.teacher_shapes = [m.shape[1:] for m in self.teacher_taps.maps(t_raw)]
        self.student_shapes = [m.shape[1:] for m in self.student_taps.maps(s_raw)]

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def pair_name(self, i: int) -> str:
        t, s = self.teacher_taps.taps[i], self.student_taps.taps[i]
        return f"teacher {t.describe()} / student {s.describe()}"

    @torch.no_grad()
    def teacher_pass(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with self.teacher_taps.capture() as raw:
            logits = self.teacher(images)
        return logits, raw

    def forward(self, model: nn.Module, images, labels, indices):
        t_logits, t_raw = self.teacher_pass(images)
        with self.student_taps.capture() as s_raw:
            logits = model(images)
        t_maps = [m.float() for m in self.teacher_taps.maps(t_raw)]
        s_maps = [m.float() for m in self.student_taps.maps(s_raw)]
        loss = kd_loss(
            logits,
            t_logits.float(),
            labels,
            self.temperature,
            self.alpha,
            self.label_smoothing,
        )
        return loss + self.feature_loss(s_maps, t_maps, t_raw), logits

    def feature_loss(self, s_maps, t_maps, t_raw) -> torch.Tensor:
        raise NotImplementedError


class FeatureHintObjective(TappedDistillation):
    """KD + `weight` * mean squared error between hint-projected student and teacher maps."""

    def __init__(self, *args, weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight = weight
        self.projectors = nn.ModuleList(
            HintProjector(s[0], t[0], tuple(t[1:]))
            for s, t in zip(self.student_shapes, self.teacher_shapes, strict=True)
        )

    def feature_loss(self, s_maps, t_maps, t_raw) -> torch.Tensor:
        terms = [
            F.mse_loss(p(s), t) for p, s, t in zip(self.projectors, s_maps, t_maps, strict=True)
        ]
        return self.weight * torch.stack(terms).sum()


class TeacherLastStage(nn.Module):
    """The teacher's modules after tap `first` up to tap `last`, run on projected maps.

    `last` is a later stage, or a module applied after the last stage (a ViT's or Swin's final
    `norm`, as ScaleKD's last ViT stage ends with it). On the probe images the chain must give the
    teacher's own output at `last`. Not a submodule of the objective: the teacher's weights stay
    frozen and out of checkpoints; gradients flow through them to the projected student tokens.
    """

    def __init__(self, objective: TappedDistillation):
        super().__init__()
        teacher = objective.teacher
        taps = objective.teacher_taps.taps
        names = stage_names(teacher)
        first, last = taps[-2].name, taps[-1].name
        start = names.index(first) + 1 if first in names else None
        if start is not None and last in names[start:]:
            chain = names[start : names.index(last) + 1]
        elif (
            start is not None
            and last not in names
            and not any(last.startswith(n + ".") for n in names)
        ):
            chain = [*names[start:], last]  # every later stage, then e.g. the final norm
        else:
            raise InputError(
                f"tpp: teacher_taps {[t.spec for t in taps]} must name a stage of the teacher "
                f"and then a later stage or a module after the stages, e.g. 'norm' (its "
                f"stages: {names})"
            )
        self._stage_modules = tuple(teacher.get_submodule(n) for n in chain)
        self.first, self.last = taps[-2].layout, taps[-1].layout
        raw = objective.probe_teacher_raw
        with torch.no_grad():
            out = self.run(to_map(raw[-2], self.first), raw[-2])
        want = to_map(raw[-1], self.last).float()
        if out.shape != want.shape:
            raise InputError(
                f"tpp: running the teacher from {taps[-2].describe()} gives "
                f"{_shape(out)}, not the {_shape(want)} of {taps[-1].describe()}"
            )
        gap = (out - want).abs().max().item()
        if gap > 1e-3 * max(1.0, want.abs().max().item()):
            raise InputError(
                f"tpp: running the teacher's {chain} from {taps[-2].describe()} does not "
                f"reproduce {taps[-1].describe()} (max difference {gap:.3g}): the teacher does "
                "more between these taps; choose taps with nothing else between them"
            )

    def run(self, m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        x = from_map(m.to(like.dtype), self.first, like)
        for module in self._stage_modules:
            x = first_tensor(module(x))
        return to_map(x, self.last).float()


class ScaleKDObjective(TappedDistillation):
    """KD + ScaleKD's feature terms (see the module docstring)."""

    def __init__(
        self,
        *args,
        spatial_weight: float = 0.08,
        frequency_weight: float = 0.06,
        cap: bool = True,
        dfm: bool = True,
        tpp: bool = True,
        heads: int | None = None,
        softmax_scale: float = 5.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.spatial_weight, self.frequency_weight = spatial_weight, frequency_weight
        self.dfm, self.tpp = dfm, tpp
        pairs = len(self.teacher_shapes)
        if tpp and pairs != 2:
            raise InputError(
                f"tpp: needs exactly two tap pairs (an earlier one whose projection runs through "
                f"the teacher's last stage, and the last one); got {pairs}"
            )
        self.last_stage = TeacherLastStage(self) if tpp else None
        views = 2 if dfm else 1
        self.projectors = nn.ModuleList()
        for i, (s, t) in enumerate(zip(self.student_shapes, self.teacher_shapes, strict=True)):
            s_grid, t_grid = tuple(s[1:]), tuple(t[1:])
            view = nn.ModuleList()
            for _ in range(views):
                if cap:
                    view.append(
                        CrossAttentionProjector(
                            s[0],
                            s_grid,
                            t[0],
                            t_grid,
                            heads,
                            softmax_scale,
                            learned_queries=not (tpp and i > 0),
                        )
                    )
                else:
                    view.append(HintProjector(s[0], t[0], t_grid))
            self.projectors.append(view)

    def _views(self, projected: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        loss = self.spatial_weight * spatial_loss(projected[0], target)
        if self.dfm:
            loss = loss + self.frequency_weight * frequency_loss(projected[1], target)
        return loss

    def feature_loss(self, s_maps, t_maps, t_raw) -> torch.Tensor:
        if self.last_stage is None:
            terms = [
                self._views([p(s) for p in views], t)
                for views, s, t in zip(self.projectors, s_maps, t_maps, strict=True)
            ]
            return torch.stack(terms).sum()
        # TPP: the first pair's projections pass the frozen last stage, then query the second.
        perceived = [self.last_stage.run(p(s_maps[0]), t_raw[-2]) for p in self.projectors[0]]
        final = [p(s_maps[1], q) for p, q in zip(self.projectors[1], perceived, strict=True)]
        return self._views(perceived, t_maps[1]) + self._views(final, t_maps[1])
