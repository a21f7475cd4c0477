"""Linear layers for inference: oneDNN's fused linear(+GELU) on CPU, torch's F.linear elsewhere.

On x86 CPUs oneDNN runs the small-row matmuls of sparse token updates ~1.3-1.5x faster than the default
BLAS path and fuses the exact GELU. Dense and eventful paths use the same kernels, so their ratios stay fair.
Set EVENTFUL_ONEDNN=0 to use F.linear everywhere.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def onednn_available() -> bool:
    """Checked on first use, not at import: the check runs a kernel, which starts an OpenMP team on the calling
    thread (an importing event-loop thread must not get one: more spinning workers than cores halves step speed)."""
    if os.environ.get("EVENTFUL_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.inference_mode():
            x, w = torch.ones(2, 4), torch.ones(3, 4)
            out = torch.ops.mkldnn._linear_pointwise(x, w, None, "gelu", [], "none")
        return bool(torch.allclose(out, F.gelu(x @ w.T)))
    except (RuntimeError, AttributeError):
        return False


def _use_onednn(x: torch.Tensor, layer: nn.Linear) -> bool:
    """Eager CPU fp32 inference only: under torch.compile, F.linear is what the compiler lowers (and fuses)."""
    return (
        not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not (torch.is_grad_enabled() and layer.weight.requires_grad)
        and onednn_available()
    )


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """layer(x) for inference. x: [..., in] -> [..., out]."""
    if _use_onednn(x, layer):
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")
    return F.linear(x, layer.weight, layer.bias)


def linear_gelu(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """gelu(layer(x)) with the exact (erf) GELU, fused where the kernel allows."""
    if _use_onednn(x, layer):
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "gelu", [], "none")
    return F.gelu(F.linear(x, layer.weight, layer.bias))
