"""The deployable artifact: a child network's architecture and weights, written and read safely.

`save_child(child, uri)` writes to any fsspec URL (local path, `s3://...`):

    <uri>/model.safetensors   weights only (no pickle)
    <uri>/model.pt2           a self-contained `torch.export` program (optional)
    <uri>/arch.json           architecture, space, FLOPs, params, metadata, and the sha256 of
                              every other file; written last, it is the commit marker

Each file is written atomically (local: a temporary name, then a rename; object stores: one
upload, published whole), and `arch.json` goes last, so a reader never trusts a half-written artifact: `load_child` checks every checksum.
`load_child(uri)` rebuilds the `ChildNet` from `arch.json` and the safetensors file alone: no
supernet, no unpickling.

Command line: `python -m raydsnas.export URI` loads, verifies and summarises an artifact
(`--batch` sets the batch of a test forward pass on random input).

`load_program` is for artifacts you trust: `torch.export.load` may unpickle, so it asks for
`trusted=True`. `load_child` is the safe path for anything else.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import sys
from collections.abc import Mapping
from typing import Any

import pyarrow.fs as pafs
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from raydsnas.data.errors import DataError
from raydsnas.data.storage import read_bytes, resolve_filesystem, storage_errors, write_bytes_atomic
from raydsnas.space.child import ChildNet
from raydsnas.space.space import SearchSpace

FORMAT = "raydsnas.child/1"
ARCH_FILE = "arch.json"
WEIGHTS_FILE = "model.safetensors"
PROGRAM_FILE = "model.pt2"


class ArtifactError(RuntimeError):
    """An artifact that is missing, incomplete or fails its checksums."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_program(child: ChildNet) -> bytes:
    """A `torch.export` program of `child` in eval mode, batch dimension dynamic, as bytes."""
    child = child.eval()
    device = next(child.parameters()).device
    size = child.space.input_size
    example = torch.zeros(2, child.space.in_channels, size, size, device=device)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(child, (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def save_child(child: ChildNet, uri: str, *, meta: Mapping[str, Any] | None = None,
               program: bool = True, storage_options: Mapping[str, Any] | None = None) -> str:
    """Write `child` (architecture + weights [+ exported program]) to `uri`; returns `uri`.

    `meta` (final metrics, the config that produced it, ...) is stored in `arch.json` as is; it
    must be JSON-serialisable and must not hold secrets.
    """
    fs, root = resolve_filesystem(uri, storage_options)
    state = {k: v.detach().cpu().contiguous() for k, v in child.state_dict().items()}
    files = {WEIGHTS_FILE: save_safetensors(state, metadata={"format": FORMAT})}
    program_error = None
    if program:
        try:
            files[PROGRAM_FILE] = export_program(child)
        except Exception as err:  # the weights are the artifact; the program is a convenience
            program_error = f"{type(err).__name__}: {err}"[:2000]

    space = child.space
    record = {
        "format": FORMAT,
        "arch": list(child.arch),
        "arch_names": space.arch_names(child.arch),
        "space": space.to_dict(),
        "flops": space.flops(child.arch),
        "params": space.params(child.arch),
        "meta": dict(meta or {}),
        "files": {name: {"sha256": _sha256(data), "bytes": len(data)}
                  for name, data in files.items()},
        "versions": {"raydsnas": _version(), "torch": torch.__version__},
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if program_error:
        record["program_error"] = program_error
    with storage_errors(uri, storage_options):
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(root, recursive=True)
        for name, data in files.items():
            write_bytes_atomic(fs, f"{root}/{name}", data)
        write_bytes_atomic(fs, f"{root}/{ARCH_FILE}",
                           json.dumps(record, indent=2, sort_keys=True).encode())
    return uri


def read_record(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The parsed `arch.json` of an artifact."""
    fs, root = resolve_filesystem(uri, storage_options)
    path = f"{root}/{ARCH_FILE}"
    with storage_errors(uri, storage_options):
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise ArtifactError(f"no {ARCH_FILE} at {uri}: not a raydsnas child artifact "
                                "(or its write never committed)")
        record = json.loads(read_bytes(fs, path))
    if record.get("format") != FORMAT:
        raise ArtifactError(f"{uri}/{ARCH_FILE} has format {record.get('format')!r}; "
                            f"this raydsnas reads {FORMAT!r}")
    return record


def _read_verified(fs, root: str, uri: str, record: dict, name: str) -> bytes:
    expected = record["files"].get(name)
    if expected is None:
        raise ArtifactError(f"{uri} has no {name}")
    try:
        data = read_bytes(fs, f"{root}/{name}")
    except FileNotFoundError as err:
        raise ArtifactError(f"{uri}/{name} is listed in {ARCH_FILE} but missing") from err
    if _sha256(data) != expected["sha256"]:
        raise ArtifactError(f"{uri}/{name} does not match the checksum in {ARCH_FILE} "
                            "(a partial or concurrent write?)")
    return data


def load_child(uri: str, *, device: torch.device | str = "cpu",
               storage_options: Mapping[str, Any] | None = None) -> ChildNet:
    """The child network at `uri`, in eval mode, with `.arch`, `.meta` and `.record`.

    `.meta` is the metadata saved with it (a run's export: `top1`, `top5`, `val_samples`,
    `worker_hours`, `config`, ...), always with the architecture's `flops` and `params`;
    `.record` is the whole `arch.json` (space, checksums, versions).
    Reads JSON and safetensors only: nothing is unpickled and no code from the artifact runs.
    """
    fs, root = resolve_filesystem(uri, storage_options)
    record = read_record(uri, storage_options)
    state = load_safetensors(_read_verified(fs, root, uri, record, WEIGHTS_FILE))
    child = ChildNet(SearchSpace.from_dict(record["space"]), record["arch"])
    child.load_state_dict(state, strict=True)
    child.record = record
    child.meta = {**record["meta"], "flops": record["flops"], "params": record["params"]}
    return child.to(device).eval()


def load_program(uri: str, *, trusted: bool = False,
                 storage_options: Mapping[str, Any] | None = None):
    """The artifact's `torch.export` program (an `ExportedProgram`; call `.module()` to run it).

    Only for artifacts you trust (`trusted=True`): `torch.export.load` can fall back to full
    unpickling. Use `load_child` for anything else.
    """
    if not trusted:
        raise ArtifactError("load_program() may unpickle: pass trusted=True for an artifact you "
                            "trust, or use load_child(), which never unpickles")
    fs, root = resolve_filesystem(uri, storage_options)
    record = read_record(uri, storage_options)
    data = _read_verified(fs, root, uri, record, PROGRAM_FILE)
    return torch.export.load(io.BytesIO(data))


def _version() -> str:
    from raydsnas import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raydsnas.export",
                                     description="Load, verify and summarise a child artifact.")
    parser.add_argument("uri", help="artifact location (local path or s3://...)")
    parser.add_argument("--batch", type=int, default=2, help="batch size of the test forward pass")
    args = parser.parse_args(argv)
    try:
        child = load_child(args.uri)
    except (ArtifactError, DataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    space, record = child.space, child.record
    x = torch.rand(args.batch, space.in_channels, space.input_size, space.input_size)
    with torch.no_grad():
        logits = child(x)
    print(json.dumps({
        "uri": args.uri, "arch": record["arch"], "arch_names": record["arch_names"],
        "flops": record["flops"], "params": record["params"], "meta": record["meta"],
        "forward": {"input": list(x.shape), "output": list(logits.shape)},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
