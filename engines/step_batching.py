"""Step-level batching: requests join and leave one running batch at step boundaries.

A `RunningBatch` owns the `LoopState` of one prepared (bucket, graph settings) of a `GraphLoop` and
replays its captured steps. Between two steps, finished rows leave (their x̂₀ and final masks are
handed back) and waiting requests join free rows: `LoopState.load_rows` writes a request's
conditioning, noise and image K/V into its rows at step 0, and `RowSchedule.load` gives those rows
the request's own schedule. Each row carries its own step index, step count, guidance scale, mask
scope and `mask_reused_step`, so requests with different step counts and mask-reuse steps share
one UNet batch; what changes the captured operations (scheduler family, mask mode, overlap, size,
subject slots) selects the running batch.

A step runs the MASK_UPDATE graph while any active row is in its mask-update phase (rows past
theirs keep their masks: the step updates a row's mask only while it is in that phase), the
MASK_REUSE graph otherwise. Free rows are parked at step 0 with zero latents, so their (discarded)
computation stays finite. Rows do not interact: a request's result does not depend on its
companions beyond floating-point reduction order.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

from engines.compiled import GraphLoop
from engines.static_loop import Bucket, GraphKey, GraphSettings
from realcustom.step import Conditioning, LoopState, StepKind


@dataclass
class RowRequest:
    """One request's loop: `cond` and `latents` hold its samples (one row each)."""

    key: Hashable
    cond: Conditioning
    latents: torch.Tensor
    num_steps: int
    mask_reused_step: int

    @property
    def rows(self) -> int:
        return self.cond.batch_size


@dataclass
class Finished:
    """A request whose loop ended: x̂₀ [rows, C, h, w] to decode and its final masks [rows, S, h, w]."""

    key: Hashable
    latents: torch.Tensor
    masks: torch.Tensor


@dataclass
class _Slot:
    request: RowRequest
    rows: slice
    step: int = 0

    def updating(self) -> bool:
        return self.step < self.request.mask_reused_step or self.step == 0


class RunningBatch:
    """The running batch of one prepared (bucket, graph settings) of `graphs`."""

    def __init__(self, graphs: GraphLoop, bucket: Bucket, settings: GraphSettings):
        state = graphs.states.get((bucket, settings))
        if state is None:
            raise ValueError(f"{bucket} with {settings} was not prepared: call graphs.prepare first")
        self.graphs, self.bucket, self.settings = graphs, bucket, settings
        self.state: LoopState = state
        self.steps = {kind: graphs.steps[GraphKey.of(kind, bucket, settings)] for kind in StepKind}
        self.slots: list[_Slot] = []
        self._park(range(bucket.batch))

    # ---- membership (between steps) -------------------------------------------------------------

    @property
    def free_rows(self) -> int:
        return self.bucket.batch - sum(slot.request.rows for slot in self.slots)

    @property
    def active(self) -> list[Hashable]:
        return [slot.request.key for slot in self.slots]

    def _first_free(self, count: int) -> int | None:
        taken = sorted((slot.rows.start, slot.rows.stop) for slot in self.slots)
        start = 0
        for begin, end in taken:
            if begin - start >= count:
                return start
            start = end
        return start if self.bucket.batch - start >= count else None

    def join(self, request: RowRequest) -> bool:
        """Load `request` into free rows at step 0; False when it does not fit now."""
        subjects = request.cond.image_tokens.shape[1]
        if subjects > self.bucket.subjects:
            raise ValueError(f"{subjects} subjects exceed the bucket's {self.bucket.subjects} slots")
        start = self._first_free(request.rows)
        if start is None:
            return False
        state = self.state
        rows = state.load_rows(
            self.graphs.pipeline.unet, request.cond, request.latents, request.mask_reused_step, start
        )
        state.schedule.load(request.num_steps, rows)
        self.slots.append(_Slot(request, rows))
        return True

    def cancel(self, key: Hashable) -> bool:
        """Free a request's rows now (between steps); False when it is not in the batch."""
        for slot in self.slots:
            if slot.request.key == key:
                self.slots.remove(slot)
                self._park(range(slot.rows.start, slot.rows.stop))
                return True
        return False

    def _park(self, rows) -> None:
        rows = list(rows)
        if not rows:  # a full batch: no host-to-device copy at this step boundary
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.state.latents.device)
        self.state.latents.index_fill_(0, index, 0)
        self.state.step.index_fill_(0, index, 0)

    # ---- one step -------------------------------------------------------------------------------

    def step(self) -> list[Finished]:
        """Run one step for every active row; return the requests whose loop ended."""
        if not self.slots:
            return []
        updating = any(slot.updating() for slot in self.slots)
        self.steps[StepKind.MASK_UPDATE if updating else StepKind.MASK_REUSE]()
        self.graphs.stats["graph_replays"] += 1
        finished = []
        for slot in list(self.slots):
            slot.step += 1
            if slot.step == slot.request.num_steps:
                subjects = slot.request.cond.image_tokens.shape[1]
                latents = self.state.x0[slot.rows].clone()
                masks = self.state.masks[slot.rows, :subjects].clone()
                finished.append(Finished(slot.request.key, latents, masks))
                self.slots.remove(slot)
        self._park(self._free_row_indices())  # rows keep stepping in the graph: reset the free ones
        return finished

    def _free_row_indices(self) -> list[int]:
        taken = {row for slot in self.slots for row in range(slot.rows.start, slot.rows.stop)}
        return [row for row in range(self.bucket.batch) if row not in taken]
