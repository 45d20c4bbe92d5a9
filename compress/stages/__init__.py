"""Stage types: importing this package registers every built-in stage."""

from compress.stages import bench, distill, evaluate, export, train  # noqa: F401 - registration
from compress.stages.base import STAGES, StageConfig, StageContext, StageResult, register_stage

__all__ = ["STAGES", "StageConfig", "StageContext", "StageResult", "register_stage"]
