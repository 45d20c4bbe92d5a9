"""One entry point for every model: parse a spec, build it, load weights, save and reload it.

A saved model is a safetensors file whose metadata holds the architecture spec as JSON, so it
reloads with no pickled code.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from compress.errors import InputError
from compress.io import atomic_path
from compress.models.cifar_resnet import DEPTHS, cifar_resnet
from compress.models.offline import offline
from compress.models.spec_schema import (
    MAX_MODEL_ELEMENTS,
    Problem,
    SpecDocument,
    architecture,
    error_lines,
    format_loc,
    is_saved_model,
    kwarg_problems,
)

CIFAR_NAMES = {f"cifar_resnet{d}": d for d in DEPTHS}
SPEC_HELP = (
    "expected cifar_resnet{20,32,44,56,110}, timm:NAME, torchvision:NAME, "
    "or the path of a model saved by compress (.safetensors)"
)
SPEC_METADATA_KEY = "compress.model_spec"


@dataclass
class ModelSpec:
    """What a model is: its name (a spec string), the keyword arguments that build it, and for an
    INT8 model the arguments of `quantize_int8` (`target`, `input_size`)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    int8: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kwargs": dict(self.kwargs)}
        if self.int8 is not None:
            d["int8"] = dict(self.int8)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "model spec") -> ModelSpec:
        """The spec of a `to_dict` mapping, checked against the schema of a saved model's spec
        (compress.models.spec_schema): InputError naming `where` and the field otherwise."""
        if not isinstance(d, dict):
            raise InputError(
                f'{where}: must be a JSON object {{"name": ..., "kwargs": {{...}}}} '
                f"(got a {type(d).__name__})"
            )
        try:
            SpecDocument.model_validate(d)
        except ValidationError as e:
            raise InputError(f"{where}: " + "; ".join(error_lines(e))) from None
        except RecursionError:
            raise InputError(f"{where}: nested too deeply") from None
        kwargs = dict(d.get("kwargs") or {})
        return cls(name=d["name"], kwargs=kwargs, int8=dict(d["int8"]) if d.get("int8") else None)


def float_spec(spec: ModelSpec) -> ModelSpec:
    """The float architecture of a (possibly INT8) model."""
    return ModelSpec(spec.name, spec.kwargs)


# ------------------------------------------------------------------ spec kinds, int8 routes, formats
# Each kind of spec, INT8 route and coded weights format is registered by the module that owns it.
# Kinds owned outside `compress.models` are imported on first use from the module named here, so the
# model registry never imports the search or quantization packages that build on it.


@dataclass(frozen=True)
class SpecKind:
    """A family of spec strings `PREFIX:NAME`: how to check a name and build a spec."""

    prefix: str
    check: Callable[[str], None]  # gets NAME; raises ValueError with a helpful message
    build: Callable[[ModelSpec], nn.Module]


SPEC_KINDS: dict[str, SpecKind] = {}
INT8_ROUTES: dict[str, Callable[[nn.Module, dict[str, Any]], nn.Module]] = {}
WEIGHT_FORMATS: dict[str, Callable[[Path], dict[str, torch.Tensor]]] = {}
_OWNERS = {
    ("spec", "search:"): "compress.search.surgery",
    ("int8", "brevitas"): "compress.quant.int8",
    ("int8", "onnxruntime"): "compress.quant.ort_int8",
    ("format", "compress.quantized_tensors"): "compress.quant.compact",
}


def register_spec_kind(
    prefix: str, check: Callable[[str], None], build: Callable[[ModelSpec], nn.Module]
) -> None:
    """Make `PREFIX:NAME` specs buildable (`prefix` ends with ':')."""
    SPEC_KINDS[prefix] = SpecKind(prefix, check, build)


def register_int8_route(
    route: str, build: Callable[[nn.Module, dict[str, Any]], nn.Module]
) -> None:
    """`build(float_model, spec.int8)` rebuilds an INT8 model of this route (weights loaded later)."""
    INT8_ROUTES[route] = build


def register_weight_format(
    metadata_key: str, read: Callable[[Path], dict[str, torch.Tensor]]
) -> None:
    """A saved model whose metadata has `metadata_key` loads its state dict with `read(path)`."""
    WEIGHT_FORMATS[metadata_key] = read


def _owned(kind: str, key: str, table: dict[str, Any]) -> Any:
    if key not in table and (kind, key) in _OWNERS:
        importlib.import_module(_OWNERS[kind, key])  # the owner registers itself on import
    return table.get(key)


def _spec_kind(name: str) -> SpecKind | None:
    prefix = name.split(":", 1)[0] + ":" if ":" in name else None
    return _owned("spec", prefix, SPEC_KINDS) if prefix else None


def check_spec(name: str) -> None:
    """Raise ValueError with a helpful message if `name` is not a model spec compress can build."""
    if name in CIFAR_NAMES:
        return
    kind = _spec_kind(name)
    if kind is not None:
        return kind.check(name[len(kind.prefix) :])
    if is_saved_model(name):
        if not Path(name).is_file():
            raise ValueError(f"saved model file not found: {name}")
        return
    raise ValueError(f"unknown model '{name}': {SPEC_HELP}")


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the architecture `spec` names, with freshly initialised weights (never downloads)."""
    if spec.int8 is not None:
        route = spec.int8.get("route", "brevitas")
        build_int8 = _owned("int8", route, INT8_ROUTES)
        if build_int8 is None:
            raise InputError(
                f"{spec.name}: unknown INT8 route {route!r} (one of {sorted(INT8_ROUTES)})"
            )
        return build_int8(build_model(float_spec(spec)), spec.int8)
    try:
        check_spec(spec.name)
    except ValueError as e:
        raise InputError(str(e)) from None
    problems = kwarg_problems(spec.name, spec.kwargs, saved=False)
    if problems:
        raise InputError(_problem_text(spec.name, problems))
    kind = _spec_kind(spec.name)
    if kind is None and spec.name not in CIFAR_NAMES:
        raise InputError(f"{spec.name}: a saved model file, not an architecture (use create_model)")
    with offline():  # after check_spec imported timm/torchvision, so their downloaders are seen
        if spec.name in CIFAR_NAMES:
            return cifar_resnet(CIFAR_NAMES[spec.name], **spec.kwargs)
        return kind.build(spec)


def _problem_text(where: str, problems: list[Problem], prefix: tuple = ("kwargs",)) -> str:
    return f"{where}: " + "; ".join(
        f"{format_loc((*prefix, *loc))}: {msg}" for loc, msg in problems
    )


# In-place initialisers are skipped on the meta device: their values do not exist there, and
# their reference implementations cost most of a meta build's time.
_INIT_OPS = frozenset(
    {"normal_", "uniform_", "fill_", "zero_", "random_", "bernoulli_", "exponential_"}
    | {"erfinv_", "clamp_", "mul_", "add_", "sub_", "div_", "copy_"}
)


def _no_init_mode():
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoInit(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in _INIT_OPS and args and args[0].is_meta:
                return args[0]
            return func(*args, **(kwargs or {}))

    return NoInit()


_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


def probe_problems(name: str, kwargs: dict[str, Any]) -> list[Problem]:
    """Build architecture `name` with `kwargs` on the meta device (no memory, no weights, a few
    tens of ms): the builder's refusal of an argument, or a model over MAX_MODEL_ELEMENTS. Empty
    also where the builder cannot build on the meta device (the real build then tells)."""
    if name not in CIFAR_NAMES and not name.startswith(("timm:", "torchvision:")):
        return []
    kwargs = {k: v for k, v in kwargs.items() if k != "pretrained"}  # the architecture only
    try:
        with torch.device("meta"), _no_init_mode():
            model = build_model(ModelSpec(name, kwargs))
    except InputError as e:
        return [((), str(e))]
    except TypeError as e:
        if "argument" not in str(e):
            return []
        unknown = _UNEXPECTED.search(str(e))
        loc = (unknown.group(1),) if unknown and unknown.group(1) in kwargs else ()
        return [(loc, f"{name} does not take this argument ({e})")]
    except (ValueError, AssertionError) as e:
        return [((), f"{name} cannot be built with these arguments ({e})")]
    except Exception:  # noqa: BLE001 - a builder that needs real tensors: not the spec's fault
        return []
    elements = sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    if elements > MAX_MODEL_ELEMENTS:
        return [
            (
                (),
                f"{name} with these arguments has {elements:,} parameter and buffer elements "
                f"(at most {MAX_MODEL_ELEMENTS:,})",
            )
        ]
    return []


def check_model_kwargs(name: str, kwargs: dict[str, Any]) -> list[Problem]:
    """What is wrong with a recipe's (or an API caller's) `kwargs` for model `name`: arguments that
    load or fetch anything or are out of bounds, then (for an architecture with arguments) what
    its builder refuses on the meta device. Locations are relative to the kwargs."""
    problems = kwarg_problems(name, kwargs, saved=False)
    if problems or not kwargs or is_saved_model(name):
        return problems
    try:
        check_spec(name)
    except ValueError:
        return []  # the name's own error is reported
    return probe_problems(name, kwargs)


def _check_timm(name: str) -> None:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model '{name}' (see timm.list_models())")


def _build_timm(spec: ModelSpec) -> nn.Module:
    import timm

    name, kwargs = spec.name.removeprefix("timm:"), dict(spec.kwargs)
    if kwargs.get("pretrained"):  # from timm's local cache only: never a download
        kwargs["pretrained_cfg_overlay"] = {"file": timm_cached_weights(name), "source": "file"}
    return timm.create_model(name, **kwargs)


def _check_torchvision(name: str) -> None:
    import torchvision

    if name not in torchvision.models.list_models():
        raise ValueError(f"unknown torchvision model '{name}'")


def _build_torchvision(spec: ModelSpec) -> nn.Module:
    import torchvision

    kwargs = {"weights": None, **spec.kwargs}
    return torchvision.models.get_model(spec.name.removeprefix("torchvision:"), **kwargs)


register_spec_kind("timm:", _check_timm, _build_timm)
register_spec_kind("torchvision:", _check_torchvision, _build_torchvision)


def timm_cached_weights(name: str) -> str:
    """The file of timm's pretrained weights for `name` in the local Hugging Face cache
    (`HF_HUB_CACHE`, else `HF_HOME`/hub, else ~/.cache/huggingface/hub); never downloads."""
    import os

    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id:
        raise InputError(f"timm:{name}: timm has no pretrained weights on the Hugging Face Hub")
    cache = os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if "HF_HOME" in os.environ else None
    )
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename, cache_dir=cache)
        if isinstance(found, str):
            return found
    raise InputError(
        f"timm:{name}: pretrained weights ({hub_id}) are not in the local Hugging Face cache "
        f"({cache or '~/.cache/huggingface/hub'}); compress never downloads them: fetch them "
        f"once with `huggingface-cli download {hub_id}`, or pass a local file as `weights`"
    )


def create_model(
    name: str,
    kwargs: dict[str, Any] | None = None,
    weights: Path | None = None,
    num_classes: int | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """The one way from a spec string to a model: a saved file reloads as saved; anything else is
    built (`num_classes` filling in a missing kwarg) and then given `weights` if named."""
    try:
        check_spec(name)
    except ValueError as e:
        raise InputError(str(e)) from None
    if is_saved_model(name):
        model, spec = load_model(Path(name))
    else:
        kwargs = dict(kwargs or {})
        if num_classes is not None:
            kwargs.setdefault("num_classes", num_classes)
        model = build_model(ModelSpec(name, kwargs))
        # Saved with the model, the spec rebuilds the architecture; its weights come from the file.
        spec = ModelSpec(name, {k: v for k, v in kwargs.items() if k != "pretrained"})
    if weights is not None:
        load_weights(model, weights)
    return model, spec


def _clean_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(
            f"{path}: not a state dict (expected a mapping of parameter names to tensors)"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a checkpoint into `model`: a state dict, {'state_dict': ...}, or a safetensors file.

    A `module.` prefix (DataParallel) is stripped; buffers a checkpoint lacks that PyTorch can
    regenerate (BatchNorm's `num_batches_tracked`) are tolerated, any other mismatch (a name or a
    shape) is an InputError naming the file, as is a file that cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a truncated or garbage file: say which one
            raise InputError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - report any unreadable checkpoint the same way
            raise InputError(f"{path}: cannot read weights ({e})") from None
        state = _clean_state_dict(obj, path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # e.g. a head for another class count: name the shapes
        own = model.state_dict()
        mismatched = [
            f"{k} is {list(v.shape)} in the file but {list(own[k].shape)} in the model"
            for k, v in state.items()
            if isinstance(own.get(k), torch.Tensor) and v.shape != own[k].shape
        ]
        if not mismatched:
            raise InputError(f"{path}: weights do not match the model ({e})") from None
        more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
        raise InputError(
            f"{path}: weights do not match the model's shapes: {'; '.join(mismatched[:3])}{more}"
        ) from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise InputError(
            f"{path}: weights do not match the model "
            f"(missing: {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )


def save_model(model: nn.Module, spec: ModelSpec, path: Path) -> Path:
    """Write `model` with its spec as one safetensors file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    # Every name gets its own copy: quantized models share quantizer parameters between modules,
    # and each name must reload.
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={SPEC_METADATA_KEY: json.dumps(spec.to_dict())})
    return path


def read_spec(path: Path, text: str) -> ModelSpec:
    """The spec in a saved model's metadata, checked against the schema before anything is built:
    one InputError naming the file and the field otherwise."""
    where = f"{path}: metadata {SPEC_METADATA_KEY}"

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        doc = json.loads(text, parse_constant=no_constant)
    except (ValueError, RecursionError) as e:
        raise InputError(f"{where}: not valid JSON ({e})") from None
    spec = ModelSpec.from_dict(doc, where)
    loc, name, kwargs = architecture(doc)
    problems = probe_problems(name, kwargs) if kwargs else []
    if problems:  # before the real build: an absurd size fails here, with no memory taken
        raise InputError(_problem_text(where, problems, loc))
    return spec


def load_model(path: Path) -> tuple[nn.Module, ModelSpec]:
    """Reload a model written by `save_model`: check its stored spec, build it, load its weights.

    Nothing in the file is trusted: a spec that does not pass the schema, asks a builder to load
    anything, or does not build is an InputError naming the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"saved model not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: not a safetensors model file ({e})") from None
    if SPEC_METADATA_KEY not in meta:
        raise InputError(f"{path}: no model spec in its metadata (was it saved by compress?)")
    spec = read_spec(path, meta[SPEC_METADATA_KEY])
    try:
        model = build_model(spec)
    except InputError as e:
        raise InputError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - the file's spec is data; any failure is the file's
        raise InputError(
            f"{path}: the model spec in its metadata does not build ({type(e).__name__}: {e})"
        ) from None
    coded = [key for key in meta if _owned("format", key, WEIGHT_FORMATS)]
    if coded:  # e.g. a quantized model in coded form
        try:
            model.load_state_dict(WEIGHT_FORMATS[coded[0]](path))
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{path}: its coded weights do not load ({e})") from None
    else:
        load_weights(model, path)
    return model, spec
