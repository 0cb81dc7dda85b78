"""Cost of one DSNAS search step vs one step of training the fixed child on the same path.

Both run side by side in one process, interleaved, on the same batch; each DSNAS step's path is
the one the child was built for, so the ratio isolates the search machinery (sampling, the
dummy multipliers, the alpha update, the early-stop check). Memory is the bytes of tensors
autograd keeps for the backward pass (unique storages), measured on a real forward.

    python benchmarks/step_cost.py                      # CIFAR-sized space, batch 64
    python benchmarks/step_cost.py --space imagenet --batch 16 --steps 6
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from raydsnas import DSNAS, DSNASConfig, SearchSpace


def saved_tensor_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while `fn()` runs a forward pass."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", choices=["cifar", "imagenet"], default="cifar")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    space = SearchSpace.cifar(num_classes=10) if args.space == "cifar" else SearchSpace.imagenet()
    size = space.input_size
    x = torch.randn(args.batch, 3, size, size)
    y = torch.randint(0, space.num_classes, (args.batch,))
    d = DSNAS(space, DSNASConfig(lr=0.1, epochs=1, steps_per_epoch=10_000, warmup_epochs=0,
                                 h=1.0))

    def child_step(child, opt):
        loss = F.cross_entropy(child(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    search_t, child_t, search_m, child_m = [], [], [], []
    for i in range(args.steps + 2):
        path = d.sample_path()
        child = space.child(path).train()
        opt = torch.optim.SGD(child.parameters(), lr=0.1, momentum=0.9, weight_decay=4e-5)
        child_step(child, opt)  # warm the child's optimizer state, like the supernet's

        # Alternate which runs first, so drift in machine load falls on both alike.
        timings = {}
        for name in (("search", "child") if i % 2 else ("child", "search")):
            t0 = time.perf_counter()
            if name == "search":
                stats = d.step(x, y)
            else:
                child_step(child, opt)
            timings[name] = time.perf_counter() - t0
        assert stats.path == path
        if i >= 2:  # the first steps allocate optimizer state and warm caches
            search_t.append(timings["search"])
            child_t.append(timings["child"])
        if i == 2:
            ones = [torch.ones((), requires_grad=True) for _ in path]
            search_m.append(saved_tensor_bytes(lambda: d.supernet(x, path, ones)))
            child_m.append(saved_tensor_bytes(lambda: child(x)))

    s, c = statistics.median(search_t), statistics.median(child_t)
    print(f"space={args.space} input={size} batch={args.batch} steps={args.steps} "
          f"threads={args.threads} device=cpu")
    print(f"{'':24}{'dsnas step':>12}{'child step':>12}{'ratio':>8}")
    print(f"{'median time (ms)':24}{s * 1e3:12.1f}{c * 1e3:12.1f}{s / c:8.3f}")
    print(f"{'saved activations (MB)':24}{search_m[0] / 2**20:12.1f}{child_m[0] / 2**20:12.1f}"
          f"{search_m[0] / child_m[0]:8.3f}")


if __name__ == "__main__":
    main()
