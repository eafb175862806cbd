"""The log of a training run's steps: the loss terms averaged over each logging window, the share of the codebook
the window's batches chose, and the training images found unreadable, appended to `metrics.jsonl` (main process)
and the trackers."""

from __future__ import annotations

import json
import time

import torch
from accelerate.utils import gather_object

from .state import StepResult

__all__ = ["MetricsLog"]


class MetricsLog:
    """Collects each step's `StepResult` (`add`), writes one `train` record per logging window (`flush`) and any
    other record (`write`). `unreadable` holds the names of the training images this process found unreadable."""

    def __init__(self, path: str, accelerator, images_per_step: int, codebook_size: int):
        self.path, self.accelerator, self.images_per_step = path, accelerator, images_per_step
        # Which codes the training batches chose since the last logging window (one flag per code).
        self.codes_chosen_in_window = torch.zeros(codebook_size, dtype=torch.bool, device=accelerator.device)
        self.unreadable: set[str] = set()
        self._start()

    def _start(self) -> None:
        self.sums, self.steps, self.started = {}, 0, time.perf_counter()

    def add(self, result: StepResult) -> None:
        for name, value in result.terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.codes_chosen_in_window[result.codes.to(self.codes_chosen_in_window.device)] = True
        self.unreadable.update(result.unreadable)
        self.steps += 1

    def write(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        prefix = "eval" if record["type"] == "eval" else "train"
        numbers = {f"{prefix}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        self.accelerator.log(numbers, step=record["step"])

    def flush(self, step: int, learning_rate: float) -> dict:
        """Write the window's means as a `train` record (averaged over processes), with the share of the codebook
        the window's batches used (over all processes), and start a new window."""
        names = list(self.sums)
        # The window's only host sync for the loss terms (the sums are float64 tensors; the means float32 as before).
        sums = [
            torch.as_tensor(self.sums[name], dtype=torch.float64, device=self.accelerator.device) for name in names
        ]
        means = (torch.stack(sums) / self.steps).float() if names else torch.zeros(0, device=self.accelerator.device)
        means = dict(zip(names, self.accelerator.reduce(means, "mean").tolist()))
        used = int((self.accelerator.reduce(self.codes_chosen_in_window.int(), "sum") > 0).sum())
        self.codes_chosen_in_window.zero_()
        elapsed = time.perf_counter() - self.started
        record = {"type": "train", "step": step, **means, "learning_rate": learning_rate}
        record["codebook_usage"] = used / len(self.codes_chosen_in_window)
        record["grad_norm"] = record.get("grad_norm")
        record["steps_per_second"] = self.steps / elapsed
        record["images_per_second"] = self.steps * self.images_per_step / elapsed
        self.write(record)
        self._start()
        return record

    def unreadable_count(self) -> int:
        """The number of distinct unreadable training images over all processes (they may meet the same one)."""
        return len(set(gather_object(sorted(self.unreadable))))
