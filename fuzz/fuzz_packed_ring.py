"""Fuzz packed-ring descriptor walking: a hostile driver's descriptors and ring indexes written into
a ``GuestMemory`` and popped by ``PackedDeviceQueue``; and a hostile device's used ring
reaped by our ``PackedDriverQueue`` (input layout: ``fuzz/_rings.py``).

Properties: only the ``ProtocolError`` family (DescriptorChainError, VirtqueueBrokenError,
GuestMemoryError); at most queue-size chains per pass and in flight; every chain's views add up
to its totals, <= 2**32; a broken queue stays broken; the driver completes only tokens it
added, each once, and never trusts an over-reported used length.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Target, instrumented, main  # noqa: E402

with instrumented():
    import _rings

    from virtiofs.errors import ProtocolError


def one_input(data: bytes) -> None:
    _rings.one_input("packed", data)


TARGET = Target("packed_ring", one_input, lambda: _rings.seeds("packed"), allowed=(ProtocolError,),
                max_len=16384)

if __name__ == "__main__":
    main(TARGET)
