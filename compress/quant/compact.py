"""The compact file of a quantized model: bit-packed level indices, codebooks and bucket scales.

One safetensors file: every quantized weight is stored as `<name>::indices` (bit-packed uint8 when
its levels fit 8 bits), `<name>::alpha` and `<name>::beta` (fp32 per bucket) and `<name>::points`
(fp32 codebook in [0, 1]); every other tensor of the state dict as it is. The metadata holds the
model spec and each quantized tensor's shape and level count, so `load_model` rebuilds the exact
weights the quantize stage measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.io import atomic_path
from compress.models.registry import SPEC_METADATA_KEY, ModelSpec, register_weight_format
from compress.quant.uniform import Quantized

CODES_METADATA_KEY = "compress.quantized_tensors"


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Indices < 2**bits as a flat uint8 tensor, `bits` bits each (big-endian within a byte)."""
    flat = indices.flatten().cpu().numpy()
    if bits > 8:
        return torch.from_numpy(flat.astype(np.int32))
    as_bits = np.unpackbits(flat.astype(np.uint8)[:, None], axis=1)[:, 8 - bits :]
    return torch.from_numpy(np.packbits(as_bits.flatten()))


def unpack_indices(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    if bits > 8:
        return packed.long()[:count]
    as_bits = np.unpackbits(packed.numpy())[: count * bits].reshape(count, bits)
    padded = np.zeros((count, 8), dtype=np.uint8)
    padded[:, 8 - bits :] = as_bits
    return torch.from_numpy(np.packbits(padded, axis=1).flatten()).long()


def save_compact(
    model: nn.Module, spec: ModelSpec, codes: dict[str, Quantized], path: Path
) -> Path:
    """Write `model` with its quantized weights in coded form; returns the path."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    described = {}
    for name, q in codes.items():
        bits = q.index_bits
        tensors[f"{name}::indices"] = pack_indices(q.indices, bits)
        tensors[f"{name}::alpha"] = q.alpha.flatten().float().contiguous()
        tensors[f"{name}::beta"] = q.beta.flatten().float().contiguous()
        tensors[f"{name}::points"] = q.codebook().float().contiguous()
        described[name] = {
            "shape": list(q.shape),
            "levels": q.levels,
            "bits": bits,
            "buckets": int(q.indices.shape[0]),
            "bucket_size": int(q.indices.shape[1]),
        }
    for name, t in model.state_dict().items():
        if name not in codes:
            tensors[name] = t.detach().cpu().contiguous()
    metadata = {
        SPEC_METADATA_KEY: json.dumps(spec.to_dict()),
        CODES_METADATA_KEY: json.dumps(described),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def compact_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The full state dict stored in a compact file, quantized weights decoded."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        described = json.loads(f.metadata()[CODES_METADATA_KEY])
        raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    state = {k: v for k, v in raw.items() if "::" not in k}
    for name, d in described.items():
        count = d["buckets"] * d["bucket_size"]
        indices = unpack_indices(raw[f"{name}::indices"], d["bits"], count)
        q = Quantized(
            indices.view(d["buckets"], d["bucket_size"]),
            raw[f"{name}::alpha"].view(-1, 1),
            raw[f"{name}::beta"].view(-1, 1),
            d["levels"],
            torch.Size(d["shape"]),
            raw[f"{name}::points"],
        )
        state[name] = q.dequantize()
    return state


register_weight_format(CODES_METADATA_KEY, compact_state_dict)
