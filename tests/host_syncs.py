"""Count the reads of tensor values into Python (``float(t)``, ``t.item()``, ``t.tolist()``, ...).

On a GPU each such read makes the host wait for the device; the count is what a test can assert on any
machine, CPU included (a hook on the calls, not a timing).
"""

from __future__ import annotations

from torch.overrides import TorchFunctionMode

HOST_READS = frozenset({"__float__", "__int__", "__bool__", "__index__", "item", "tolist", "numpy"})


class HostReads(TorchFunctionMode):
    """``with HostReads() as reads: ...``; then ``reads.count`` and ``reads.names`` (in call order)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.names.append(name)
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        return len(self.names)
