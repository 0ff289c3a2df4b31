"""PackCache: packed weights kept while their source tensors are unchanged (pure Python + torch).

Shared by the Python-side backends: the Triton ops (atrous_conv.pack_forward,
separable_conv._pack) and the torch backend's oneDNN path (aspp_fused/torch_onednn.py). The
compiled CPU / CUDA kernels keep theirs in csrc/pack_cache.h.
"""
import os
import threading
import weakref

import torch


class PackCache:
    """Packed weights kept while their sources are unchanged (eval: the same parameters every call).

    An entry is keyed by the packing's own arguments (dtype, dilations, ...) and its source
    tensors' identities (so two models of the same shapes keep one entry each), and holds weak
    references to those sources with their version counters and storage pointers: an optimizer
    step, load_state_dict, an in-place edit under no_grad, a new parameter or .to() all miss.
    (An in-place write through ``.data`` bumps no counter: clear() after one, as
    aspp_fused.clear_caches does; ASPP_FUSED_FOLD_CACHE=0 turns it off.) Not used while tracing
    (torch.compile, export, fake tensors): a graph must not hold a copy its inputs cannot
    invalidate; an opaque op run by a compiled graph (the oneDNN path) uses it at run time.
    Sources must be parameters (nn.Parameter, frozen ones included) or views of them; others pack
    per call. Every torch.optim step drops the entries (aspp_fused/nn/_fold_cache.py: a fused
    optimizer writes the parameters without bumping their counters).
    Thread-safe; at most ``size`` entries (least recently used dropped), and an entry goes when a
    source tensor does."""

    def __init__(self, size: int = 16):
        self.size = size
        self.entries = {}
        # Re-entrant: a source's weakref callback (drop) can run from a garbage collection that
        # starts inside get(), in the same thread.
        self.lock = threading.RLock()
        self.misses = 0  # packings computed (tests count them)
        self.generation = 0  # bumped by clear(): a packing begun before one is not kept

    @staticmethod
    def _fingerprint(t):
        """(the tensor a view is of, what must not have moved). A view (a slice of a parameter
        made afresh each call, e.g. the projection's main part) is known by its base; views
        share the base's version counter."""
        base = PackCache._base(t)
        return base, (base._version, t.data_ptr(), tuple(t.shape), t.stride())

    @staticmethod
    def _base(t):
        return t if t._base is None else t._base

    def _state(self, tensors, key):
        # A source's death drops its entry (a deleted model's packed weights are not kept); not a
        # newer entry under the same key.
        def drop(ref):
            with self.lock:
                entry = self.entries.get(key)
                if entry is not None and any(r is ref for r, _ in entry[0]):
                    del self.entries[key]

        return [(weakref.ref(base, drop), rest) for base, rest in map(self._fingerprint, tensors)]

    def get(self, key, tensors, compute, valid=None):
        """The entry of ``key`` if its source ``tensors`` are unchanged (and ``valid(value)``, for
        sources that are not tensors to fingerprint, e.g. a BN scale made afresh each call and
        compared by value), else ``compute()``, stored."""
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        tensors = [t for t in tensors if t is not None]
        bases = [self._base(t) for t in tensors]
        if (os.environ.get("ASPP_FUSED_FOLD_CACHE", "1") == "0" or torch.compiler.is_compiling()
                or _get_current_dispatch_mode() is not None
                or any(isinstance(t, torch._subclasses.FakeTensor) for t in tensors)
                # Parameters (or views of them) only: a compiled graph's intermediate (an autocast
                # cast, a product of weights) is a buffer inductor reuses for a later value, the
                # same object, written through raw pointers with no counter bump; a parameter's
                # alias (.data, inductor's reinterpret_tensor) has a counter that its writes skip.
                or not all(isinstance(b, torch.nn.Parameter) for b in bases)
                or any(b.is_inference() for b in bases)):  # no version counter to follow
            return compute()
        if tensors and tensors[0].is_cuda:
            if torch.cuda.is_current_stream_capturing():
                # A CUDA graph packs on every replay: an entry read by the graph would not follow
                # later weight updates, one written during capture holds nothing until a replay.
                return compute()
            # Per stream: a packing is queued on the current stream, so an entry is only read on
            # the stream that wrote it, after the copies in stream order (as csrc/pack_cache.h).
            key = key + (torch.cuda.current_stream(tensors[0].device).cuda_stream,)
        # Entries of different models (the same shapes, other parameters) live side by side: the
        # sources' identities are part of the key (a dead source's entry goes with it, so a reused
        # id() meets no stale entry; the check below compares the objects themselves anyway).
        key = key + tuple(id(b) for b in bases)
        # Under the lock, compute included: threads sharing a model pack once (a packing is a few
        # copies, queued on the device's stream).
        with self.lock:
            entry = self.entries.pop(key, None)
            if entry is not None:
                state, value = entry
                if len(state) == len(tensors) and all(
                        ref() is base and rest == now
                        for (ref, rest), (base, now) in zip(state, map(self._fingerprint, tensors))) and (
                        valid is None or valid(value)):
                    self.entries[key] = entry  # most recent last
                    return value
            # The sources' state before packing: a write during compute() (an optimizer step in
            # another thread; the lock does not hold it off) leaves an entry that misses.
            state, generation = self._state(tensors, key), self.generation
            value = compute()
            self.misses += 1
            if generation != self.generation:
                return value
            self.entries[key] = (state, value)
            while len(self.entries) > self.size:
                self.entries.pop(next(iter(self.entries)))
            return value

    def clear(self):
        with self.lock:
            self.entries.clear()
            self.generation += 1


# The packed weights of the Triton ops (atrous_conv.pack_forward, separable_conv._pack: repacking
# costs a pass over every weight and several small launches per call, about 29 MB at the OS16
# head) and of the torch backend's oneDNN path (aspp_fused/torch_onednn.py: a reorder costs
# 3.2 ms per 3x3 branch weight at the CPU OS16 head, 13 to 18% of that branch's conv).
PACKED = PackCache()
