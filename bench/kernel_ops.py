"""What one call launches, read from a torch.profiler trace: kernel-producing operator calls and host syncs.

Kernel ops. An operator event (a name `namespace::op`: aten::add, mkldnn::_linear_pointwise) counts when it does the
work itself: it is not a view, metadata, allocation or no-op conversion (NO_KERNEL_OPS), and no operator it calls
counts. So aten::linear -> aten::t + aten::addmm counts once (addmm), aten::index -> aten::empty + aten::as_strided
counts once (index), aten::contiguous counts only when it copies (its aten::copy_), aten::to only when it converts.
An op that calls a counted op and also runs its own kernel (addmm copying its bias into the output, then the matrix
product) counts once, as what it calls: the count is a lower bound on kernel launches (exact on CUDA: device_kernels).
Compiled code adds the kernels inductor names in the trace: Triton launches (`triton_*`, recorded whenever the
profiler is on) and C++ kernels (`*cpp_fused*`, recorded only with torch._inductor.config.cpp.enable_kernel_profile).
A CUDA graph replay counts once (its `cudaGraphLaunch`): the host launches the graph, the device its kernels, which
`device_kernels` counts (kernels the CUDA trace shows, memcpy/memset excluded; None when no CUDA activity is traced).

Host syncs. Calls that make the host wait for a device value: the operators in SYNC_OPS (item(), int(), bool() of a
tensor end in aten::_local_scalar_dense; aten::nonzero reads its output size), explicit cuda*Synchronize calls, and
on CUDA any other operator whose device activity copies device to host (`Memcpy DtoH`: .cpu(), .tolist(); a
non-blocking copy into pinned memory is counted too). One count per outermost such call: item() ->
_local_scalar_dense -> cudaStreamSynchronize is one sync. On the CPU these are the calls that would sync on a GPU.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

NO_KERNEL_OPS = frozenset(
    "aten::" + name
    for name in (
        # views
        "view", "view_as", "reshape", "_reshape_alias", "_unsafe_view", "as_strided", "as_strided_", "slice",
        "select", "unsqueeze", "squeeze", "unsqueeze_", "squeeze_", "expand", "expand_as", "broadcast_to",
        "broadcast_tensors", "permute", "transpose", "transpose_", "t", "numpy_T", "mT", "mH", "adjoint", "movedim",
        "moveaxis", "swapaxes", "swapdims", "flatten", "unflatten", "unfold", "diagonal", "narrow", "unbind",
        "split", "split_with_sizes", "unsafe_split", "tensor_split", "chunk", "unsafe_chunk", "alias", "real",
        "imag", "conj", "_conj", "resolve_conj", "resolve_neg", "detach", "detach_", "lift_fresh", "align_to",
        "refine_names", "rename", "_nested_view_from_buffer",
        # allocation and metadata
        "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "resize_as_", "set_",
        "result_type", "size", "sym_size", "stride", "sym_stride", "numel", "sym_numel", "dim", "is_contiguous",
        "is_same_size", "is_complex", "is_floating_point", "_has_compatible_shallow_copy_type", "requires_grad_",
        "retains_grad", "record_stream", "_shape_as_tensor", "contiguous", "to", "type_as",
        # host syncs that launch no kernel (counted by host_syncs)
        "_local_scalar_dense", "item", "is_nonzero",
    )
)  # fmt: skip
SYNC_OPS = frozenset({"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero"})
SYNC_RUNTIME_CALLS = frozenset({"cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize"})
GRAPH_LAUNCH = "cudaGraphLaunch"
_OPERATOR = re.compile(r"^[A-Za-z_]\w*::\w+")
_INDUCTOR_KERNEL = re.compile(r"^triton_|cpp_fused")
_LABEL = "kernel_ops.counted"


@dataclass(frozen=True)
class LaunchCounts:
    """What one call launched (see the module docstring for the rules)."""

    kernel_ops: int
    host_syncs: int
    device_kernels: int | None  # None: no CUDA activity traced
    kernel_op_names: dict[str, int] = field(default_factory=dict)  # name -> count, for reading a count


def _is_kernel_event(name: str) -> bool:
    if _INDUCTOR_KERNEL.search(name) or name == GRAPH_LAUNCH:
        return True
    return bool(_OPERATOR.match(name)) and not name.startswith("profiler::") and name not in NO_KERNEL_OPS


def _count_kernels(event, counts: Counter) -> bool:
    """Count the kernel events under `event` (itself only when nothing under it counts); True when any counted."""
    found = False
    for child in event.cpu_children:
        found |= _count_kernels(child, counts)
    if not found and _is_kernel_event(event.name):
        counts[event.name] += 1
        return True
    return found


def _is_sync(event) -> bool:
    if event.name in SYNC_OPS or event.name in SYNC_RUNTIME_CALLS:
        return True
    return bool(_OPERATOR.match(event.name)) and any("DtoH" in kernel.name for kernel in event.kernels)


def _count_syncs(event) -> int:
    if _is_sync(event):
        return 1
    return sum(_count_syncs(child) for child in event.cpu_children)


def count_events(roots: Iterable[Any], device_events: Iterable[Any] | None = None) -> LaunchCounts:
    """Counts over the profiler events `roots` and everything under them (FunctionEvents with cpu_children);
    device_events: the CUDA trace's events, None when CUDA was not traced."""
    roots = list(roots)
    names: Counter = Counter()
    for root in roots:
        _count_kernels(root, names)
    kernels = None
    if device_events is not None:
        kernels = sum(1 for e in device_events if not e.name.startswith(("Memcpy", "Memset")))
    return LaunchCounts(
        kernel_ops=sum(names.values()),
        host_syncs=sum(_count_syncs(root) for root in roots),
        device_kernels=kernels,
        kernel_op_names=dict(names.most_common()),
    )


def count_launches(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, LaunchCounts]:
    """Call fn() once under the profiler; its result and what it launched. Only what fn does is counted (it runs
    inside a labelled range; the device synchronisation that completes the CUDA trace is outside it)."""
    device = torch.device(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with record_function(_LABEL):
            result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.events()
    labelled = [e for e in events if e.name == _LABEL and e.device_type == torch.autograd.DeviceType.CPU]
    if not labelled:
        raise RuntimeError(f"the profiler trace has no {_LABEL!r} range")
    device_events = None
    if device.type == "cuda":
        device_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    return result, count_events(labelled[0].cpu_children, device_events)


__all__ = ["NO_KERNEL_OPS", "SYNC_OPS", "LaunchCounts", "count_events", "count_launches"]
