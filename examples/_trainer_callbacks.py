"""Callbacks the Trainer examples share: stop right after a checkpoint, and slow a run down so a test can kill it."""

from __future__ import annotations

import os
import time

from transformers import TrainerCallback


class StopAt(TrainerCallback):
    """Exit the process right after the checkpoint of step ``step`` is complete, as if it had been killed."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            print(f"stopping right after the checkpoint at step {self.step}", flush=True)
            os._exit(0)


class SlowDown(TrainerCallback):
    """Sleep after every optimizer step (lets a test kill the process at a random point of a tiny run)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)
