"""`python -m raydsnas.search [--config jobs/x.yaml] [--set key=value ...]`

With no arguments it runs the embedded default: a local Ray, the built-in digits data set,
output under ./runs/<name>/, a few minutes on a 2-core laptop. Under `ray job submit` (or with
RAY_ADDRESS set) it runs on that cluster. Running the same job again resumes it.
`--dry-run` starts nothing: it prints the resolved config and a preflight (data set size, the
resources it will ask for, supernet size, the space's FLOPs range, estimated peak memory per
worker) and fails on a job that cannot fit (`--cluster` checks against a cluster file).
Exit codes: 0 done, 2 bad configuration or input (nothing written), 1 the run failed,
130 interrupted (Ctrl-C; the local Ray it started is stopped, a rerun resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import yaml

from raydsnas.config import ConfigError, load_config
from raydsnas.data.errors import DataError
from raydsnas.export import ArtifactError
from raydsnas.train.provenance import RunConflictError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raydsnas.search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="job YAML file (default: the embedded default job)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value, e.g. search.h=0.2 "
                        "(repeatable; values are YAML: 0.2, [1,4], null, s3://bucket/runs)")
    parser.add_argument("--print-config", action="store_true",
                        help="print every setting with the value the run would use (defaults "
                        "filled in) and exit")
    parser.add_argument("--resume-with-changes", action="store_true",
                        help="rerunning an existing run: apply changed search.epochs (to "
                        "extend it), checkpoint_every, bn_recalibration_batches or "
                        "data.skip_corrupt from the epoch it reached, and record them. Without "
                        "it a rerun must have the run's recorded settings")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and a preflight (resources, memory, "
                        "FLOPs, data size); exit 2 if the job cannot fit. Starts nothing")
    parser.add_argument("--cluster", metavar="FILE",
                        help="with --dry-run: check against this cluster launcher YAML or KubeRay "
                        "manifest (default: RAY_ADDRESS's cluster, else this machine)")
    parser.add_argument("--gpu-memory-gib", type=float, metavar="GIB",
                        help="with --dry-run: memory of one GPU, when the cluster file does not "
                        "say (e.g. KubeRay)")
    args = parser.parse_args(argv)
    try:
        job = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"raydsnas: configuration error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(job.resolved(), indent=2))
        return 0
    if args.dry_run:
        return dry_run(job, args.cluster, args.gpu_memory_gib)
    if args.cluster or args.gpu_memory_gib:
        parser.error("--cluster and --gpu-memory-gib go with --dry-run")

    from raydsnas.train.launcher import run_search  # imports Ray: after the config is valid

    try:
        outcome = run_search(job, resume_with_changes=args.resume_with_changes)
    except KeyboardInterrupt:
        return interrupted(job)
    except RunConflictError as err:
        print(f"raydsnas: configuration error: {err}", file=sys.stderr)
        return 2
    except (DataError, ConfigError) as err:
        print(f"raydsnas: input error: {err}", file=sys.stderr)
        return 2
    except ArtifactError as err:
        print(f"raydsnas: the run finished without a child network: {err}", file=sys.stderr)
        return 1
    for note in outcome.notes:
        print(f"raydsnas: {note}")
    meta = outcome.record["meta"]
    if outcome.already_finished:
        print(f"\nraydsnas: search '{job.name}' had already finished with these settings "
              f"({outcome.run_uri}); nothing to do. To run it again, choose a new name "
              f"(--set name={job.name}-2); to train it longer, raise search.epochs with "
              "--resume-with-changes")
    else:
        print(f"\nraydsnas: search '{job.name}' finished in {outcome.wall_s:.0f} s "
              f"({meta['worker_hours']:.3f} worker-hours of training)")
    print(f"  child network: {outcome.subnet_uri}")
    print(f"  architecture:  {outcome.record['arch']}")
    print(f"  validation:    top-1 {meta['top1']:.4f}, top-5 {meta['top5']:.4f} "
          f"({meta['val_samples']} images)")
    print(f"  cost:          {outcome.record['flops'] / 1e6:.2f}M FLOPs, "
          f"{outcome.record['params'] / 1e6:.3f}M params")
    skipped = meta.get("skipped_images")
    if skipped:
        print(f"  skipped:       {len(skipped)} undecodable image(s) (data.skip_corrupt), "
              f"listed in {outcome.subnet_uri}/arch.json meta.skipped_images")
    print(f"  load it with:  raydsnas.load_child({outcome.subnet_uri!r})")
    return 0


def interrupted(job) -> int:
    """Ctrl-C: end this driver's Ray (the local instance it started stops with it; a cluster it
    joined only loses this driver and its run), say where a rerun resumes, exit 130."""
    import ray

    from raydsnas.train.launcher import latest_checkpoint_epoch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
    ray.shutdown()  # first: no checkpoint is registered after the epoch read below
    try:
        epoch = latest_checkpoint_epoch(job)
    except DataError:  # storage unreachable: the rerun still resumes, from wherever it can
        epoch = None
    where = ("from its last checkpoint" if epoch is None else
             f"from epoch {epoch}" if epoch else "from the start")
    print(f"raydsnas: interrupted: rerun the same command to resume {where}", file=sys.stderr)
    return 130


def dry_run(job, cluster: str | None, gpu_memory_gib: float | None) -> int:
    """Print the resolved config and the preflight; 0 if the job fits, 2 if not."""
    from raydsnas import preflight

    print("# resolved configuration")
    print(yaml.safe_dump(job.to_dict(), sort_keys=False).rstrip())
    print("\n# preflight")
    try:
        if cluster:
            capacity = preflight.load_cluster(cluster)
        elif os.environ.get("RAY_ADDRESS"):
            capacity = preflight.running_cluster_capacity(os.environ["RAY_ADDRESS"])
        else:
            capacity = preflight.local_capacity()
        result = preflight.preflight(job, capacity, gpu_memory_gib=gpu_memory_gib)
    except (ConfigError, DataError) as err:
        print(f"raydsnas: preflight failed: {err}", file=sys.stderr)
        return 2
    print(preflight.render(result))
    return 0 if result.ok else 2


if __name__ == "__main__":
    sys.exit(main())
