"""Smoke test of a Ray installed from benchmarks/wheels (see ray_wheel.py).

One TorchTrainer worker (on the GPU when CUDA is there, else the CPU) reads a local Parquet file
through Ray Data, takes a few SGD steps and reports one metric; then the same through Tune.

    python benchmarks/ray_wheel_smoke.py [--dashboard]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def train_loop(config):
    import ray.train
    import ray.train.torch
    import torch

    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    shard = ray.train.get_dataset_shard("train")
    loss = None
    for _ in range(config["epochs"]):
        for batch in shard.iter_torch_batches(batch_size=32, device=device):
            x = torch.stack([batch[f"x{i}"] for i in range(4)], dim=1).float()
            loss = torch.nn.functional.mse_loss(model(x).squeeze(1), batch["y"].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
    # Train V2 keeps in Result.metrics only what came with a checkpoint.
    with tempfile.TemporaryDirectory() as ckpt:
        torch.save(model.state_dict(), Path(ckpt) / "model.pt")
        ray.train.report({"loss": loss.item(), "device": str(device)},
                         checkpoint=ray.train.Checkpoint.from_directory(ckpt))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dashboard", action="store_true", help="ray.init(include_dashboard=True)")
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import ray.data
    import ray.train
    import ray.train.torch
    import ray.tune
    import torch

    use_gpu = torch.cuda.is_available()
    t0 = time.time()
    ray.init(num_cpus=4 if use_gpu else 2, include_dashboard=args.dashboard)
    print("ray", ray.__version__, "resources", ray.cluster_resources(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        n = 256
        xs = torch.randn(n, 4)
        table = pa.table({**{f"x{i}": xs[:, i].numpy() for i in range(4)},
                          "y": (xs.sum(1) * 0.5).numpy()})
        pq.write_table(table, Path(tmp) / "part-0.parquet")
        ds = ray.data.read_parquet(tmp)
        print("parquet rows", ds.count(), flush=True)

        trainer = ray.train.torch.TorchTrainer(
            train_loop, train_loop_config={"epochs": 3},
            scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=use_gpu),
            run_config=ray.train.RunConfig(storage_path=str(Path(tmp) / "runs"), name="smoke"),
            datasets={"train": ds})
        result = trainer.fit()
        print("TorchTrainer metrics", result.metrics, flush=True)
        assert result.metrics and "loss" in result.metrics, result
        assert (Path(result.checkpoint.path) / "model.pt").is_file(), result.checkpoint

        def trainable(config):
            ray.tune.report({"score": config["a"] * 2})

        grid = ray.tune.Tuner(
            trainable, param_space={"a": ray.tune.grid_search([1, 2])},
            run_config=ray.tune.RunConfig(storage_path=str(Path(tmp) / "tune"), name="t"),
        ).fit()
        scores = sorted(r.metrics["score"] for r in grid)
        print("Tune scores", scores, flush=True)
        assert scores == [2, 4], scores
    ray.shutdown()
    print(f"SMOKE OK in {time.time() - t0:.1f} s (use_gpu={use_gpu})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
