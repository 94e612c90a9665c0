"""A driver in a child process and a device in this one exchange chains over one memfd.

The child gets only file descriptors (the memfd, a kick and a call eventfd, via ``pass_fds``)
and the ring addresses: nothing else is shared. This is the setup the loopback transport and the
FUSE client build on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from virtiofs.errors import LocalProtocolError
from virtiofs.virtqueue import (
    EventFd,
    GuestMemory,
    PackedDeviceQueue,
    PackedLayout,
    SplitDeviceQueue,
    SplitLayout,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
COUNT = 300
MEM_SIZE = 1 << 20
QSIZE = 32


def payload(i: int) -> bytes:
    sys.path.insert(0, HERE)
    from _virtqueue_child import payload as p

    return p(i)


@pytest.mark.parametrize("kind", ["split", "packed"])
def test_driver_in_a_child_process_and_device_here_share_one_memfd(kind):
    mem = GuestMemory.allocate(MEM_SIZE)
    kick, call = EventFd(), EventFd()
    child = None
    try:
        if kind == "split":
            layout = SplitLayout.place(0, QSIZE)
            dev = SplitDeviceQueue(mem, layout, event_idx=True, indirect=True)
            areas = (layout.desc, layout.avail, layout.used)
        else:
            layout = PackedLayout.place(0, QSIZE)
            dev = PackedDeviceQueue(mem, layout, event_idx=True, indirect=True)
            areas = (layout.desc, layout.driver_event, layout.device_event)
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        args = [kind, mem.fd, MEM_SIZE, kick.fileno(), call.fileno(), QSIZE, *areas, 0x10000,
                COUNT]
        child = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "_virtqueue_child.py"), *map(str, args)],
            pass_fds=(mem.fd, kick.fileno(), call.fileno()), env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        served = calls = 0
        deadline = time.monotonic() + 60
        while served < COUNT and time.monotonic() < deadline and child.poll() is None:
            kick.wait(0.5)
            while True:  # vhost's loop: drain, then re-enable and re-check
                dev.disable_notification()
                for chain in dev.pop_many(64):
                    request = chain.read_all()
                    assert request == payload(served), served  # in order from one driver
                    assert chain.write(request[::-1]) == len(request)
                    dev.push(chain)
                    served += 1
                if dev.needs_notification():
                    call.write(1)
                    calls += 1
                if not dev.enable_notification():
                    break
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0, out
        assert out.startswith(f"OK {COUNT}"), out
        assert served == COUNT and not dev.broken
        # Notification suppression worked both ways: far fewer signals than requests.
        assert 0 < calls <= COUNT
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait(10)
        kick.close()
        call.close()
        mem.close()


def test_eventfd_writes_coalesce_into_one_wakeup():
    e = EventFd()
    try:
        assert e.read() == 0  # non-blocking: nothing written yet
        e.write(1)
        e.notify()
        e.write(3)
        assert e.wait(5.0) == 5
        assert e.wait(0.01) == 0  # timed out
    finally:
        e.close()
    e.close()  # idempotent
    assert e.closed
    with pytest.raises(LocalProtocolError):
        e.fileno()


def test_eventfd_wraps_a_received_fd():
    owner = EventFd()
    peer = EventFd(fd=os.dup(owner.fileno()))
    try:
        peer.write(1)
        assert owner.wait(5.0) == 1
    finally:
        peer.close()
        owner.close()
