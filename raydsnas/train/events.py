"""TensorBoard event files for a run: scalars, per-layer entropy and the alpha heatmap.

Rank 0 writes locally and copies the event files to `<storage>/<run>/events/` after every
epoch (each copy is atomic), so `tensorboard --logdir <storage>` works on a local folder and,
through TensorBoard's own S3 support, on object storage.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pyarrow.fs as pafs
import torch

from raydsnas.data.storage import join_path, write_bytes_atomic


def alpha_heatmap(probs: torch.Tensor, frozen: dict[int, int], cell: int = 12) -> np.ndarray:
    """[3, L*cell, n*cell] uint8 image: one row per layer, brightness = probability; frozen
    layers are tinted green on their choice."""
    p = probs.detach().float().cpu().numpy()
    img = np.stack([p, p, p]) * 255
    for layer, choice in frozen.items():
        img[:, layer, :] *= 0.35
        img[:, layer, choice] = (40, 220, 90)
    img = np.repeat(np.repeat(img, cell, axis=1), cell, axis=2)
    return img.astype(np.uint8)


class EventLog:
    """A TensorBoard writer on rank 0 (a no-op elsewhere) mirrored to storage."""

    def __init__(self, enabled: bool, fs: pafs.FileSystem | None, remote_dir: str | None):
        self.enabled = enabled
        self.fs, self.remote_dir = fs, remote_dir
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.local_dir = tempfile.mkdtemp(prefix="raydsnas-events-")
            self.writer = SummaryWriter(self.local_dir)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def arch(self, step: int, probs: torch.Tensor, frozen: dict[int, int]) -> None:
        if self.writer is not None:
            from raydsnas.strategies.base import entropy_per_layer

            for layer, h in enumerate(entropy_per_layer(probs).tolist()):
                self.writer.add_scalar(f"entropy/layer_{layer:02d}", h, step)
            self.writer.add_image("alpha/probabilities", alpha_heatmap(probs, frozen), step)

    def credit(self, step: int, credit: list[float | None] | None) -> None:
        """The per-layer credit diagnostic (running mean of |dL/d(one_l)|), one scalar a layer."""
        if self.writer is not None and credit:
            for layer, value in enumerate(credit):
                if value is not None:
                    self.writer.add_scalar(f"credit/layer_{layer:02d}", value, step)

    def text(self, step: int, tag: str, message: str) -> None:
        """A text event (TensorBoard's Text tab), e.g. when the search ended."""
        if self.writer is not None:
            self.writer.add_text(tag, message, step)

    def sync(self) -> None:
        """Flush and copy every local event file to storage."""
        if self.writer is None or self.fs is None:
            return
        self.writer.flush()
        for name in os.listdir(self.local_dir):
            with open(os.path.join(self.local_dir, name), "rb") as f:
                write_bytes_atomic(self.fs, join_path(self.remote_dir, name), f.read())

    def close(self) -> None:
        if self.writer is not None:
            self.sync()
            self.writer.close()
