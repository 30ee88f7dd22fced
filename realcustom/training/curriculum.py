"""The stage schedule: which curriculum stage a global optimizer step belongs to.

Steps are counted from 0 over the whole run; stage i covers [start_i, start_i + steps_i). A step
count `n` (steps completed, as in `checkpoint-n`) resumes at step n, in the stage that contains it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from realcustom.training.config import StageConfig


@dataclass(frozen=True)
class StageSpan:
    """A stage with its position in the run: steps [start, end)."""

    index: int
    stage: StageConfig
    start: int
    end: int


class Curriculum:
    """Ordered stages, laid end to end."""

    def __init__(self, stages: tuple[StageConfig, ...]):
        if not stages:
            raise ValueError("a curriculum needs at least one stage")
        self.spans: list[StageSpan] = []
        start = 0
        for index, stage in enumerate(stages):
            self.spans.append(StageSpan(index, stage, start, start + stage.steps))
            start += stage.steps
        self._ends = [span.end for span in self.spans]

    @property
    def total_steps(self) -> int:
        return self._ends[-1]

    def stage_at(self, step: int) -> StageSpan:
        """The stage that runs 0-based step `step`."""
        if not 0 <= step < self.total_steps:
            raise ValueError(f"step {step} is outside the run's {self.total_steps} steps")
        return self.spans[bisect.bisect_right(self._ends, step)]

    def remaining(self, completed: int) -> list[tuple[StageSpan, int]]:
        """(stage, first step) of every stage still to run after `completed` steps."""
        if not 0 <= completed <= self.total_steps:
            raise ValueError(f"{completed} completed steps is outside the run's {self.total_steps} steps")
        return [(span, max(span.start, completed)) for span in self.spans if span.end > completed]
