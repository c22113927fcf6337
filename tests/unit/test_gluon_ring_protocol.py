"""The ring protocol of the Gluon estimate loop (``est_gluon``, ops/xattention_triton/estimate_gluon.py),
modelled step by step in Python: the two consumer warpgroups, the first one's loads, the ``ready``,
``empty`` and ``go`` mbarriers with PTX's parity waits, TMA copies landing in any order and the two
warpgroups interleaved at random. For every ring depth and lag the op accepts: no deadlock, every
step reads the tile loaded for it, and no slot is refilled while a wgmma may still read it.
(The kernel cannot run on the CPU; this checks the order of its operations, which the model copies.)"""
import random

import pytest

from vllm_trianglemix.ops.xattention_triton.config import XAttnKernelConfig
from vllm_trianglemix.ops.xattention_triton.estimate_gluon import gluon_stages


class Barrier:
    """An mbarrier: ``count`` arrivals and the expected transaction bytes complete a phase."""

    def __init__(self, count: int):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0

    def arrive(self):
        self.pending -= 1
        self._advance()

    def expect(self, nbytes: int):  # mbarrier.arrive.expect_tx
        self.tx += nbytes
        self.arrive()

    def complete_tx(self, nbytes: int):  # a TMA copy landing
        self.tx -= nbytes
        self._advance()

    def _advance(self):
        assert self.pending >= 0 and self.tx >= 0
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def passes(self, parity: int) -> bool:  # mbarrier.try_wait.parity
        return self.phase % 2 != parity


def _run(stages: int, lag: int, tiles: int, steps: int, seed: int):
    """One program of ``tiles`` key tiles of ``steps`` steps, as estimate_gluon._consumer runs it."""
    rnd = random.Random(seed)
    total = tiles * steps
    ready = [Barrier(1) for _ in range(stages)]
    empty = [Barrier(2) for _ in range(stages)]
    go = Barrier(1)
    holds = [None] * stages  # the step whose tile a slot holds (None while a copy is in flight)
    in_flight = []  # (slot, step)
    reading = {0: set(), 1: set()}  # steps whose wgmma may still read their slot
    released = {0: set(), 1: set()}
    consumed = {0: [], 1: []}

    def issue_load(j):  # _issue_load
        if j >= total:
            return
        slot = j % stages
        if j >= stages:
            while not empty[slot].passes((j // stages - 1) & 1):
                yield
            for wg in (0, 1):
                assert j - stages in released[wg] and j - stages not in reading[wg], (j, wg)
        ready[slot].expect(1)
        holds[slot] = None
        in_flight.append((slot, j))

    def consumer(wg):  # _consumer
        if wg == 0:
            for j in range(stages - lag):
                yield from issue_load(j)
        else:
            while not go.passes(0):
                yield
        i = 0
        for _ in range(tiles):
            for _ in range(steps):
                slot = i % stages
                while not ready[slot].passes((i // stages) & 1):
                    yield
                assert holds[slot] == i, (wg, i, holds[slot])
                consumed[wg].append(i)
                reading[wg] = {i}  # warpgroup_mma, then warpgroup_mma_wait(1)
                if i > 0:
                    empty[(i - 1) % stages].arrive()
                    released[wg].add(i - 1)
                if wg == 0:
                    yield from issue_load(i + stages - lag)
                    if i == lag - 1:
                        go.arrive()
                i += 1
                yield
            reading[wg] = set()  # warpgroup_mma_wait(0), the tile's epilogue
            yield
        if wg == 0 and total < lag:
            go.arrive()

    running = {0: consumer(0), 1: consumer(1)}
    for _ in range(100_000):
        if not running:
            break
        choice = rnd.choice(list(running) + (["tma"] if in_flight else []))
        if choice == "tma":
            slot, j = in_flight.pop(rnd.randrange(len(in_flight)))
            holds[slot] = j
            ready[slot].complete_tx(1)
            continue
        try:
            next(running[choice])
        except StopIteration:
            del running[choice]
    assert not running, f"deadlock: stages {stages}, lag {lag}, {tiles} x {steps} steps"
    assert consumed[0] == consumed[1] == list(range(total))


@pytest.mark.parametrize("stages", range(2, 10))
def test_the_ring_never_deadlocks_nor_overwrites_a_slot_in_use(stages):
    for lag in range(1, stages):
        assert gluon_stages(XAttnKernelConfig(est_num_stages=stages, est_gluon_lag=lag)) == (stages, lag)
        for steps in (1, 3, 16):
            for tiles in (0, 1, 2, 5):
                for seed in range(6):
                    _run(stages, lag, tiles, steps, seed)


def test_the_model_detects_a_wrong_parity(monkeypatch):
    """The model can fail: waiting on the slot's current phase instead of the previous one lets a
    refill overwrite a tile still being read (or deadlocks)."""
    monkeypatch.setattr(Barrier, "passes", lambda self, parity: self.phase % 2 == parity)
    with pytest.raises(AssertionError):
        for seed in range(6):
            _run(4, 2, 3, 16, seed)
