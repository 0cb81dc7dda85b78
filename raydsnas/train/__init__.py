"""The search job on Ray Train: the per-worker loop and the driver that launches it."""
