"""Stage types: importing this package registers every built-in stage."""

from compress.stages import (  # noqa: F401 - importing registers the stage types
    adapt_teacher,
    bench,
    distill,
    evaluate,
    export,
    quantize,
    search,
    train,
)
from compress.stages.base import STAGES, StageConfig, StageContext, StageResult, register_stage

__all__ = ["STAGES", "StageConfig", "StageContext", "StageResult", "register_stage"]
