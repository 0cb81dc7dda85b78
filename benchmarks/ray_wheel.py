"""Wheels that bring Ray 2.60 to the GPU test machine, within what one run can carry.

The GPU test machine (Python 3.12, torch 2.11) has no Ray and no network; a run carries the
working tree plus at most 64 MiB. The Ray 2.60.0 cp312 manylinux wheel alone is 79 MB. This
script, run on a CPU machine with pip and internet (stdlib + pip only):

1. downloads the ray==2.60.0 wheel for cp312 manylinux x86_64, and the wheels of the runtime
   dependencies that ray[default,train,tune,data] needs and the GPU machine lacks (DEPS; their
   dependency closure minus what the GPU machine has, GPU_HAS);
2. writes a slimmed Ray wheel into the output folder: the subpackages that a Train + Tune + Data
   job on one node never imports are removed (REMOVE, each with its reason), RECORD is rewritten
   (the removed files' entries gone, the sha256 and size of every kept file recomputed), console
   scripts whose module is gone are dropped from entry_points.txt;
3. prints the sizes and fails (exit 1) when all the wheels together exceed the budget;
4. writes install.sh into the output folder: the pip command lines for the GPU side.

    python benchmarks/ray_wheel.py                      # -> benchmarks/wheels/
    python benchmarks/ray_wheel.py --python-version 3.11 --out /tmp/wheels311   # a cp311 set

On the GPU machine (carry "benchmarks/wheels"):

    sh benchmarks/wheels/install.sh && python3 -m pip install -q --no-deps --no-index --no-build-isolation -e .
"""

from __future__ import annotations

import argparse
import base64
import csv
import fnmatch
import hashlib
import io
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

RAY_VERSION = "2.60.0"
MIB = 1024 * 1024
HERE = Path(__file__).resolve().parent

# Removed from the Ray wheel. A pattern ending in "/" is a path prefix, else an fnmatch pattern
# over the whole path ("*" crosses "/"). Each is safe for `import ray; ray.init()`, Ray Train V2
# (TorchTrainer), Tune, Data, the dashboard and `ray job submit` on one node:
REMOVE: list[tuple[str, str]] = [
    ("ray/jars/",
     ("Java workers only (33 MB): services.py starts a Java worker only when `java` is on PATH "
     "and ray/jars exists; without it the raylet gets an empty --java_worker_command")),
    ("ray/rllib/",
     ("RLlib: imported only by ray.tune.registry._has_rllib_trainable (inside try/except "
     "ImportError, for string trainable names) and tune/examples")),
    ("ray/serve/",
     ("Serve: imported only lazily by the dashboard's serve endpoints and the `serve`/`ray serve` "
     "CLI (inside try/except); Train/Tune/Data and the job server do not import it")),
    ("ray/llm/",
     "Ray LLM: imported only by ray.data.llm, which nothing imports unless asked"),
    ("ray/dashboard/client/build/*.map",
     ("source maps of the dashboard UI (debugging the JS only); the build itself stays, since "
     "the dashboard head refuses to start without client/build on Linux")),
    ("ray/tune/examples/", "examples, not imported"),
    ("ray/train/examples/", "examples, not imported"),
]

# What the GPU test machine has (normalized names), with the packages those pull in for sure
# (aiohttp's, requests'). Wheels of these are not sent along. Not assumed: six (pandas 3 no
# longer needs python-dateutil; a simulated machine with only this list had no six).
GPU_HAS = {
    "numpy", "pyarrow", "pandas", "fsspec", "pyyaml", "safetensors", "aiohttp", "grpcio",
    "protobuf", "msgpack", "click", "filelock", "requests", "tensorboard", "pytest", "onnx",
    "onnxruntime", "torch", "torchvision",
    # aiohttp's
    "aiohappyeyeballs", "aiosignal", "attrs", "frozenlist", "multidict", "propcache", "yarl",
    # requests'
    "certifi", "charset-normalizer", "idna", "urllib3",
}

# Top-level packages to send: Ray's own Requires-Dist (base and the default/train/tune/data
# extras) that the GPU machine lacks and a one-node Train/Tune/Data job imports.
DEPS: list[tuple[str, str]] = [
    ("jsonschema", "base requirement: runtime_env plugin schemas, autoscaler config validation"),
    ("packaging", "base requirement (the GPU machine has it through pytest; a fallback)"),
    ("pydantic", "Train V2 refuses to import without it; the dashboard's job/state schemas"),
    ("aiohttp_cors", "dashboard (ray.dashboard.optional_deps): the dashboard and `ray job submit`"),
    ("opencensus", "dashboard/metrics agent (optional_deps); installed --no-deps, see NO_DEPS"),
    ("opencensus-context", "opencensus' own dependency (opencensus itself goes in --no-deps)"),
    ("six", "opencensus' own dependency (opencensus.metrics imports it)"),
    ("googleapis-common-protos", ("google.rpc, which opencensus.trace imports (the dashboard agent "
                                 "dies without it); the one part of google-api-core's chain needed")),
    ("opentelemetry-sdk", "dashboard/metrics agent (optional_deps)"),
    ("opentelemetry-exporter-prometheus", "dashboard/metrics agent (optional_deps)"),
    ("opentelemetry-proto", "dashboard/metrics agent (optional_deps)"),
    ("prometheus_client", "dashboard/metrics agent (optional_deps)"),
    ("colorful", "ray[default]: the CLI logger's colours (ray start, ray job)"),
    ("smart_open", "ray[default]: object spilling to URIs, remote runtime_env packages"),
    ("tensorboardX", "ray[tune]/[train]: Tune's default TensorBoard logger callback"),
]
# Installed with --no-deps: opencensus declares google-api-core (-> google-auth -> cryptography,
# ~6 MB together), which the opencensus.stats/metrics/tags modules Ray imports never import.
NO_DEPS = {"opencensus": {"google-api-core", "google-auth", "cryptography", "cffi", "pycparser",
                          "pyasn1", "pyasn1-modules", "proto-plus", "rsa", "cachetools"}}
# Left out of ray[default] on purpose:
#   virtualenv  only for runtime_env {"pip"/"uv"/"virtualenv"}, which cannot download there
#   py-spy      only for the dashboard's stack-trace/flame-graph buttons and `ray stack`

PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_28_x86_64", "manylinux1_x86_64",
             "manylinux_2_5_x86_64"]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_project(path: Path) -> str:
    return normalize(path.name.split("-")[0])


# ---------------------------------------------------------------------------- slimming

def record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def is_removed(path: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if pattern.endswith("/"):
            if path.startswith(pattern):
                return True
        elif fnmatch.fnmatchcase(path, pattern):
            return True
    return False


def _module_present(module: str, names: set[str]) -> bool:
    base = module.replace(".", "/")
    return f"{base}.py" in names or f"{base}/__init__.py" in names or any(
        n.startswith(f"{base}.") and n.endswith((".so", ".pyd")) for n in names)


def _prune_entry_points(text: str, names: set[str]) -> tuple[str, list[str]]:
    """Drop console/gui scripts whose module is no longer in the wheel."""
    out, dropped, section = [], [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
        elif "=" in stripped and section in ("[console_scripts]", "[gui_scripts]"):
            module = stripped.split("=", 1)[1].strip().split(":")[0].strip()
            if not _module_present(module, names):
                dropped.append(stripped)
                continue
        out.append(line)
    return "\n".join(out) + "\n", dropped


def slim_wheel(src: Path, dst: Path, patterns: list[str]) -> dict:
    """Copy wheel `src` to `dst` without the members matching `patterns`; RECORD is rewritten.

    Kept members keep their bytes, timestamps, permissions and compression; RECORD lists every
    kept member with its sha256 and size (RECORD itself with neither), entry_points.txt loses
    the scripts whose module went, and <dist-info>/SLIMMED says what was removed.
    """
    with zipfile.ZipFile(src) as zin:
        infos = [i for i in zin.infolist() if not i.is_dir()]
        records = [i.filename for i in infos if re.fullmatch(r"[^/]+\.dist-info/RECORD", i.filename)]
        if len(records) != 1:
            raise ValueError(f"{src.name}: expected one .dist-info/RECORD, found {records}")
        record_name = records[0]
        dist_info = record_name.rsplit("/", 1)[0]
        protected = f"{dist_info}/"
        removed = [i for i in infos if not i.filename.startswith(protected)
                   and is_removed(i.filename, patterns)]
        removed_names = {i.filename for i in removed}
        kept = [i for i in infos if i.filename not in removed_names and i.filename != record_name]
        kept_names = {i.filename for i in kept}
        dropped_scripts: list[str] = []
        rows: list[list[str]] = []
        tmp = dst.with_name(dst.name + ".part")
        with zipfile.ZipFile(tmp, "w") as zout:
            for info in kept:
                data = zin.read(info)
                if info.filename == f"{dist_info}/entry_points.txt":
                    text, dropped_scripts = _prune_entry_points(data.decode("utf-8"), kept_names)
                    data = text.encode("utf-8")
                zout.writestr(_copy_info(info), data, compress_type=info.compress_type)
                rows.append([info.filename, record_hash(data), str(len(data))])
            note = "".join(f"{p}\n" for p in patterns).encode("utf-8")
            note_name = f"{dist_info}/SLIMMED"
            if note_name not in kept_names:
                info = zipfile.ZipInfo(note_name, date_time=(2026, 1, 1, 0, 0, 0))
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                zout.writestr(info, note, compress_type=zipfile.ZIP_DEFLATED)
                rows.append([note_name, record_hash(note), str(len(note))])
            rows.append([record_name, "", ""])
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(rows)
            info = _copy_info(zin.getinfo(record_name))
            zout.writestr(info, buf.getvalue().encode("utf-8"), compress_type=zipfile.ZIP_DEFLATED)
    tmp.replace(dst)
    return {
        "removed_files": len(removed),
        "removed_bytes": sum(i.file_size for i in removed),
        "removed_compressed": sum(i.compress_size for i in removed),
        "kept_files": len(rows),
        "dropped_scripts": dropped_scripts,
        "per_pattern": {p: sum(i.compress_size for i in removed if is_removed(i.filename, [p]))
                        for p in patterns},
    }


def _copy_info(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    new = zipfile.ZipInfo(info.filename, date_time=info.date_time)
    new.external_attr = info.external_attr
    new.create_system = info.create_system
    return new


# ---------------------------------------------------------------------------- downloading

def pip_download(args: list[str], dest: Path, python_version: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    cmd += ["-d", str(dest), *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def fetch(out: Path, cache: Path, python_version: str) -> tuple[Path, list[Path]]:
    """The original Ray wheel (in `cache`) and the dependency wheels to send (copied to `out`)."""
    cache.mkdir(parents=True, exist_ok=True)
    tag = "cp" + python_version.replace(".", "")
    ray_dir = cache / f"ray-{tag}"
    ray_dir.mkdir(exist_ok=True)
    pip_download(["--no-deps", f"ray=={RAY_VERSION}"], ray_dir, python_version)
    ray_wheels = sorted(ray_dir.glob(f"ray-{RAY_VERSION}-{tag}-*.whl"))
    if len(ray_wheels) != 1:
        raise SystemExit(f"expected one ray {RAY_VERSION} {tag} wheel in {ray_dir}, "
                         f"found {[w.name for w in ray_wheels]}")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        staging = Path(tmp)
        pip_download([name for name, _ in DEPS], staging, python_version)
        cut = set().union(*NO_DEPS.values())
        sent = []
        for wheel in sorted(staging.glob("*.whl")):
            project = wheel_project(wheel)
            if project in GPU_HAS or project in cut:
                print(f"  not sent: {wheel.name} ({'on the GPU machine' if project in GPU_HAS else 'cut with --no-deps'})")
                continue
            shutil.copy2(wheel, out / wheel.name)
            sent.append(out / wheel.name)
    return ray_wheels[0], sent


# ---------------------------------------------------------------------------- install script

def install_script(ray_wheel: str, deps: list[Path]) -> str:
    resolved = sorted(normalize(n) for n, _ in DEPS if normalize(n) not in NO_DEPS)
    no_deps = sorted(d.name for d in deps if wheel_project(d) in NO_DEPS)
    return f"""#!/bin/sh
# Installs Ray {RAY_VERSION} (slimmed, see ray_wheel.py) from this folder, offline.
# Usage, from the repo root on the GPU machine:  sh benchmarks/wheels/install.sh
#   then the project:  python3 -m pip install -q --no-deps --no-index --no-build-isolation -e .
# (--no-build-isolation: offline, pip cannot fetch setuptools into an isolated build env.)
# PYTHON overrides the interpreter (default python3). Dependencies already installed and new
# enough are kept; only the missing ones come from this folder.
set -e
W="$(cd "$(dirname "$0")" && pwd)"
PY="${{PYTHON:-python3}}"
"$PY" -m pip install -q --no-index --no-cache-dir --find-links "$W" "$W/{ray_wheel}" {' '.join(resolved)}
# Declared dependencies cut on purpose (google-api-core and its chain), hence --no-deps; pip then
# says "opencensus ... requires google-api-core ..., which is not installed": expected.
"$PY" -m pip install -q --no-index --no-cache-dir --no-deps {' '.join('"$W/' + n + '"' for n in no_deps)}
"$PY" -c "import ray, ray.train.torch, ray.tune, ray.data; print('ray', ray.__version__, 'from', ray.__file__)"
"""


# ---------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "wheels",
                        help="folder of the wheels to send (default benchmarks/wheels/)")
    parser.add_argument("--cache", type=Path, default=HERE / "wheels_cache",
                        help="where the original Ray wheel is kept (default benchmarks/wheels_cache/)")
    parser.add_argument("--python-version", default="3.12",
                        help="target Python (default 3.12, the GPU machine's)")
    parser.add_argument("--budget-mib", type=float, default=48.0,
                        help="the most all wheels together may weigh (default 48 MiB of the 64 "
                             "a run carries, the rest for the working tree)")
    args = parser.parse_args(argv)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.whl")) + list(out.glob("install.sh")):
        old.unlink()  # one version of each package, or pip stops

    ray_src, deps = fetch(out, args.cache, args.python_version)
    ray_dst = out / ray_src.name
    patterns = [p for p, _ in REMOVE]
    stats = slim_wheel(ray_src, ray_dst, patterns)
    (out / "install.sh").write_text(install_script(ray_dst.name, deps))

    print(f"\nRay wheel slimmed: {ray_src.name}")
    print(f"  {ray_src.stat().st_size / MIB:.2f} MiB -> {ray_dst.stat().st_size / MIB:.2f} MiB; "
          f"{stats['removed_files']} files removed ({stats['removed_bytes'] / MIB:.1f} MiB "
          f"unpacked), {stats['kept_files']} in RECORD")
    for pattern, reason in REMOVE:
        print(f"  - {pattern:36s} {stats['per_pattern'][pattern] / MIB:6.2f} MiB  {reason}")
    for script in stats["dropped_scripts"]:
        print(f"  console script dropped: {script}")

    wheels = sorted(out.glob("*.whl"), key=lambda p: -p.stat().st_size)
    total = sum(w.stat().st_size for w in wheels)
    print(f"\nWheels in {out} (python {args.python_version}):")
    for wheel in wheels:
        print(f"  {wheel.stat().st_size / MIB:7.2f} MiB  {wheel.name}")
    print(f"  {total / MIB:7.2f} MiB  total, {len(wheels)} wheels; budget {args.budget_mib:.1f} MiB")
    print(f"install: sh {out}/install.sh")
    if total > args.budget_mib * MIB:
        print(f"FAIL: the wheels weigh {total / MIB:.2f} MiB, over the {args.budget_mib:.1f} MiB "
              "budget; remove more from the Ray wheel (REMOVE) or send fewer packages (DEPS)",
              file=sys.stderr)
        return 1
    print(f"OK: {total / MIB:.2f} MiB <= {args.budget_mib:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
