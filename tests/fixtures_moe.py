"""Shared pieces of the MoE layer tests: a dense FFN copied into one expert, and the sizes of every
tensor a forward pass allocates or saves for backward (to show no tokens x experts x capacity
tensor exists)."""

from __future__ import annotations

import contextlib

import torch

_ALLOCATORS = ("empty", "zeros", "full", "empty_like")


def copy_dense_into_expert(layer, dense, e: int = 0) -> None:
    """Make expert e of an MoE layer compute `dense` (a FeedForward)."""
    with torch.no_grad():
        layer.experts.w1[e].copy_(dense.fc1.weight.T)
        layer.experts.b1[e].copy_(dense.fc1.bias)
        layer.experts.w2[e].copy_(dense.fc2.weight.T)
        layer.experts.b2[e].copy_(dense.fc2.bias)


@contextlib.contextmanager
def tensor_sizes():
    """Yields a list that collects the numel of every tensor made by torch's allocators or saved
    for backward inside the block."""
    seen: list[int] = []
    orig = {name: getattr(torch, name) for name in _ALLOCATORS}

    def watch(fn):
        def inner(*a, **kw):
            t = fn(*a, **kw)
            seen.append(t.numel())
            return t
        return inner

    for name, fn in orig.items():
        setattr(torch, name, watch(fn))
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (seen.append(t.numel()), t)[1], lambda t: t):
            yield seen
    finally:
        for name, fn in orig.items():
            setattr(torch, name, fn)
