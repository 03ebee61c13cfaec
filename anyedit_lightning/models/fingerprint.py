"""A cheap, stable identity for a model's weights (for caches and patches)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

_SAMPLES = 4096


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every parameter's name, shape, dtype and a strided sample of its values.

    Sampling keeps this to milliseconds on an 8B model; any edit of a down-projection changes whole
    rows or columns, so it always changes the sample's sum, which is hashed too.
    """
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES)
        sample = flat[::step][:_SAMPLES].to("cpu", torch.float64)
        total = flat.to(torch.float64).sum().reshape(1).cpu()
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        digest.update(sample.numpy().tobytes())
        digest.update(total.numpy().tobytes())
    return digest.hexdigest()
