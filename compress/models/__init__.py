"""Model zoo and model specs: `cifar_resnetN`, `timm:NAME`, `torchvision:NAME`, or a saved model path."""

from compress.models.registry import (
    ModelSpec,
    build_model,
    check_spec,
    create_model,
    float_spec,
    load_model,
    load_weights,
    register_spec_kind,
    save_model,
)

__all__ = [
    "ModelSpec",
    "build_model",
    "check_spec",
    "create_model",
    "float_spec",
    "load_model",
    "load_weights",
    "register_spec_kind",
    "save_model",
]
