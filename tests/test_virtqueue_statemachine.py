"""Hypothesis state machines: a driver queue and a device queue over one GuestMemory, driven by
random add/pop/push/reap/sleep/wake/restart sequences, checked against a plain model.

Run for both layouts, with and without EVENT_IDX and INDIRECT_DESC. Besides the data, the
notification protocol is checked for lost wake-ups: once a side has re-enabled notifications
and seen nothing pending, the other side's next publish must say "notify".
"""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
from _virtqueue_util import make_pair
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from virtiofs.errors import LocalProtocolError

SETTINGS = settings(max_examples=30, stateful_step_count=40, deadline=None)


class QueueMachine(RuleBasedStateMachine):
    KIND = "split"
    EVENT_IDX = False
    INDIRECT = False
    SIZE = 8

    def __init__(self) -> None:
        super().__init__()
        self.p = make_pair(self.KIND, self.SIZE, event_idx=self.EVENT_IDX,
                           indirect=self.INDIRECT, mem_size=1 << 18)
        self.tokens = 0
        self.avail: deque[tuple[int, int, bytes, int]] = deque()  # token, head, readable, wlen
        self.inflight: dict[int, Any] = {}  # token -> chain
        self.head_of: dict[int, int] = {}
        self.pushed: deque[tuple[int, bytes]] = deque()
        self.ndesc: dict[int, int] = {}  # outstanding token -> ring descriptors
        self.dev_waiting = False
        self.drv_waiting = False

    def teardown(self) -> None:
        self.p.mem.close()

    @property
    def free(self) -> int:
        return self.SIZE - sum(self.ndesc.values())

    @rule(readable=st.lists(st.binary(max_size=40), max_size=3),
          wsizes=st.lists(st.integers(0, 40), max_size=3),
          indirect=st.sampled_from([None, True, False]))
    def add(self, readable: list[bytes], wsizes: list[int], indirect: bool | None) -> None:
        n = len(readable) + len(wsizes)
        use_ind = bool(indirect)
        ndesc = 1 if use_ind else n
        refused = (n == 0 or (use_ind and not self.INDIRECT) or ndesc > self.free
                   or len(self.ndesc) >= self.SIZE)
        token = self.tokens
        if refused:
            with pytest.raises(LocalProtocolError):
                self.p.drv.add(readable, wsizes, token, indirect=indirect)
            return
        self.tokens += 1
        head = self.p.drv.add(readable, wsizes, token, indirect=indirect)
        self.ndesc[token] = ndesc
        self.head_of[token] = head
        self.avail.append((token, head, b"".join(readable), sum(wsizes)))
        kick = self.p.drv.needs_kick()
        if self.dev_waiting:
            assert kick, "lost kick: the device asked for one and went to sleep"
            self.dev_waiting = False

    @rule()
    def pop(self) -> None:
        chain = self.p.dev.pop()
        if not self.avail:
            assert chain is None
            return
        token, head, data, wlen = self.avail.popleft()
        assert chain is not None and chain.head == head
        assert chain.read_all() == data and chain.readable_len == len(data)
        assert chain.writable_len == wlen
        self.inflight[token] = chain

    @precondition(lambda self: self.inflight)
    @rule(pick=st.integers(0, 1000), data=st.binary(max_size=120))
    def push(self, pick: int, data: bytes) -> None:
        token = sorted(self.inflight)[pick % len(self.inflight)]
        chain = self.inflight.pop(token)
        n = chain.write(data)
        self.p.dev.push(chain)
        self.pushed.append((token, data[:n]))
        call = self.p.dev.needs_notification()
        if self.drv_waiting:
            assert call, "lost interrupt: the driver asked for one and went to sleep"
            self.drv_waiting = False

    @rule()
    def reap(self) -> None:
        done = self.p.drv.reap()
        assert [(c.token, c.data) for c in done] == list(self.pushed)
        assert all(c.error is None and c.length == len(c.data) for c in done)
        for token, _ in self.pushed:
            del self.ndesc[token]
        self.pushed.clear()

    @rule()
    def device_sleeps(self) -> None:
        more = self.p.dev.enable_notification()
        assert more == bool(self.avail)
        if not more:
            self.dev_waiting = True

    @rule()
    def device_wakes(self) -> None:
        self.p.dev.disable_notification()
        self.dev_waiting = False

    @rule()
    def driver_sleeps(self) -> None:
        more = self.p.drv.enable_interrupts()
        assert more == bool(self.pushed)
        if not more:
            self.drv_waiting = True

    @rule()
    def driver_wakes(self) -> None:
        self.p.drv.disable_interrupts()
        self.drv_waiting = False

    @precondition(lambda self: not self.inflight)
    @rule()
    def device_restarts_from_vring_base(self) -> None:
        """vhost-user GET_VRING_BASE on the old back-end, SET_VRING_BASE on a new one."""
        base = self.p.dev.vring_base
        if self.KIND == "split":
            self.p.dev = self.p.new_device(next_avail=base)
        else:
            self.p.dev = self.p.new_device(vring_base=base)

    @invariant()
    def counts_agree(self) -> None:
        assert self.p.drv.num_free == self.free
        assert self.p.drv.outstanding == len(self.ndesc)
        assert self.p.dev.inflight == len(self.inflight)
        assert not self.p.dev.broken and not self.p.drv.broken


def _machine(kind: str, event_idx: bool, indirect: bool, size: int) -> type[QueueMachine]:
    return type(f"M_{kind}_{event_idx}_{indirect}", (QueueMachine,), {
        "KIND": kind, "EVENT_IDX": event_idx, "INDIRECT": indirect, "SIZE": size})


# Packed with a size that is not a power of 2 and smaller than a lap of traffic, so the wrap
# counters flip often.
_CASES = [(k, e, i, 8 if k == "split" else 5)
          for k in ("split", "packed") for e in (False, True) for i in (False, True)]


@pytest.mark.parametrize("kind,event_idx,indirect,size", _CASES,
                         ids=[f"{k}-{'evidx' if e else 'flags'}-{'ind' if i else 'direct'}"
                              for k, e, i, _ in _CASES])
def test_driver_and_device_agree_with_the_model(kind, event_idx, indirect, size):
    machine = _machine(kind, event_idx, indirect, size)
    machine.TestCase.settings = SETTINGS
    machine.TestCase().runTest()
