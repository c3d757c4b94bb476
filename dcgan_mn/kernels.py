"""Counting the kernels a piece of PyTorch code launches, and the times it waits on the host.

On a GPU in eager mode, almost every aten operator that does work is one kernel launch, and a
DCGAN step at batch 64 is bound by launch latency rather than arithmetic. So the number of
kernel-launching aten ops, measured on any device with ``torch.profiler``, is a portable proxy
for a GPU step's overhead. We count this way:

* **kernels**: the outermost aten operators that do work, i.e. every aten operator except those
  that only make views, read metadata or allocate (``view``, ``expand``, ``transpose``,
  ``empty`` ...), not counting what they call (a GPU runs ``aten::sum`` as one kernel even
  where the CPU implementation fills its output first) but looking through views
  (``aten::to`` counts the copy below it); plus the fused kernels of compiled code
  (``cpp_fused_*`` on a CPU with ``torch._inductor.config.cpp.enable_kernel_profile``,
  ``triton_*`` on a GPU). A composite such as ``aten::cdist`` counts once although it may
  launch a few kernels: the count is a lower bound there.
* **host syncs**: operators that copy a device value to the host or whose output size depends
  on data (``aten::item``, ``aten::_local_scalar_dense``, ``aten::nonzero`` ...). On a CUDA
  device each one blocks the host until the queue drains, and breaks CUDA-graph capture.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, NamedTuple

import torch

__all__ = ["OpCount", "count_ops", "METADATA_OPS", "SYNC_OPS"]

# Operators that launch no kernel: views, metadata and allocation without initialisation.
METADATA_OPS = frozenset(
    "aten::" + name
    for name in (
        "view",
        "_unsafe_view",
        "reshape",
        "expand",
        "expand_as",
        "transpose",
        "t",
        "permute",
        "unsqueeze",
        "squeeze",
        "select",
        "slice",
        "narrow",
        "as_strided",
        "alias",
        "detach",
        "detach_",
        "lift_fresh",
        "empty",
        "empty_like",
        "empty_strided",
        "resize_",
        "new_empty",
        "new_empty_strided",
        "zeros_like_noop",
        "unflatten",
        "flatten",
        "split",
        "split_with_sizes",
        "unbind",
        "chunk",
        "numpy_T",
        "diagonal",
        "view_as",
        "_reshape_alias",
        "set_",
        "result_type",
        "size",
        "stride",
        "is_same_size",
        "_has_compatible_shallow_copy_type",
        "requires_grad_",
        "contiguous",
        "movedim",
        "to",
        "type_as",
        "_to_copy_noop",
        "broadcast_tensors",
        "real",
        "conj",
        "resolve_conj",
        "resolve_neg",
        "_shape_as_tensor",
        "lift",
        "_nested_tensor_from_mask_left_aligned",
    )
)

# Operators that make the host wait for the device (a read of a value, or a data-dependent size).
SYNC_OPS = frozenset(
    "aten::" + name
    for name in (
        "item",
        "_local_scalar_dense",
        "nonzero",
        "nonzero_static",
        "is_nonzero",
        "equal",
        "masked_select",
        "unique",
        "_unique",
        "_unique2",
        "unique_consecutive",
        "unique_dim",
        "repeat_interleave",
        "allclose",
        "tolist",
    )
)

_COMPILED_KERNEL_MARKERS = ("cpp_fused", "triton_", "cpp_kernel")


class OpCount(NamedTuple):
    """What one call launched: kernel count, host syncs, and both broken down by name."""

    kernels: int
    syncs: int
    by_name: dict[str, int]
    sync_names: dict[str, int]

    def to_json(self, top: int = 12) -> dict:
        most = sorted(self.by_name.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        return {
            "kernels": self.kernels,
            "host_syncs": self.syncs,
            "sync_ops": dict(self.sync_names),
            "top_ops": dict(most),
        }


def _is_compiled_kernel(name: str) -> bool:
    return any(marker in name for marker in _COMPILED_KERNEL_MARKERS)


def count_ops(fn: Callable[[], object]) -> OpCount:
    """Run ``fn()`` once under the profiler and count its kernels and host syncs (see above)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        fn()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    kernels: Counter = Counter()
    syncs: Counter = Counter()
    for event in events:
        if event.name in SYNC_OPS:
            syncs[event.name] += 1
    # Walk down from the roots; the outermost aten op that does work is one kernel, and what it
    # calls is not counted again (``aten::sum`` is one kernel on a GPU even where a CPU
    # implementation fills its output first). Views are looked through: ``aten::to`` or
    # ``aten::reshape`` launch the copies below them.
    stack = [e for e in events if e.cpu_parent is None]
    while stack:
        event = stack.pop()
        name = event.name
        if _is_compiled_kernel(name):
            kernels["compiled_kernel"] += 1
        elif name.startswith("aten::") and name not in METADATA_OPS:
            kernels[name] += 1
        else:
            stack.extend(event.cpu_children)
    return OpCount(sum(kernels.values()), sum(syncs.values()), dict(kernels), dict(syncs))
