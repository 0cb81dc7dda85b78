"""benchmarks/ray_wheel.py's slimming: removed paths gone, RECORD exact and hashed, pip installs it.

A small synthetic wheel built in a tmp dir; no network.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("ray_wheel", ROOT / "benchmarks" / "ray_wheel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ray_wheel = _load()

DIST = "fakeray-1.0.dist-info"
FILES = {
    "fakeray/__init__.py": b"VERSION = '1.0'\n",
    "fakeray/core/raylet": b"\x7fELF binary" * 100,
    "fakeray/jars/big.jar": b"PK jar" * 1000,
    "fakeray/rllib/__init__.py": b"import fakeray\n",
    "fakeray/rllib/algo.py": b"x = 1\n",
    "fakeray/serve/__init__.py": b"",
    "fakeray/serve/scripts.py": b"def cli():\n    pass\n",
    "fakeray/scripts.py": b"def main():\n    pass\n",
    "fakeray/dashboard/client/build/index.html": b"<html></html>\n",
    "fakeray/dashboard/client/build/static/js/main.js": b"console.log(1)\n",
    "fakeray/dashboard/client/build/static/js/main.js.map": b"{}" * 500,
    "fakeray/rllibish.py": b"# not under fakeray/rllib/\n",
    f"{DIST}/METADATA": b"Metadata-Version: 2.1\nName: fakeray\nVersion: 1.0\n",
    f"{DIST}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    f"{DIST}/entry_points.txt": (b"[console_scripts]\nfakeray = fakeray.scripts:main\n"
                                b"fakeserve = fakeray.serve.scripts:cli\n"),
}
PATTERNS = ["fakeray/jars/", "fakeray/rllib/", "fakeray/serve/",
            "fakeray/dashboard/client/build/*.map"]
REMOVED = {"fakeray/jars/big.jar", "fakeray/rllib/__init__.py", "fakeray/rllib/algo.py",
           "fakeray/serve/__init__.py", "fakeray/serve/scripts.py",
           "fakeray/dashboard/client/build/static/js/main.js.map"}


def _sha(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _build(path: Path) -> Path:
    rows = [[name, _sha(data), str(len(data))] for name, data in FILES.items()]
    rows.append([f"{DIST}/RECORD", "", ""])
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in FILES.items():
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFREG | (0o755 if name.endswith("raylet") else 0o644)) << 16
            z.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
        z.writestr(f"{DIST}/RECORD", buf.getvalue())
    return path


def test_slim_wheel_removes_rewrites_record_and_installs(tmp_path):
    (tmp_path / "src").mkdir()
    src = _build(tmp_path / "src" / "fakeray-1.0-py3-none-any.whl")
    dst_dir = tmp_path / "out"
    dst_dir.mkdir()
    dst = dst_dir / src.name
    stats = ray_wheel.slim_wheel(src, dst, PATTERNS)

    with zipfile.ZipFile(dst) as z:
        names = {i.filename for i in z.infolist() if not i.is_dir()}
        assert not names & REMOVED
        assert set(FILES) - REMOVED <= names
        assert "fakeray/rllibish.py" in names  # a prefix is a folder, not a string prefix
        assert stats["removed_files"] == len(REMOVED)
        assert stats["dropped_scripts"] == ["fakeserve = fakeray.serve.scripts:cli"]
        assert z.getinfo("fakeray/core/raylet").external_attr >> 16 & 0o777 == 0o755

        record = list(csv.reader(io.StringIO(z.read(f"{DIST}/RECORD").decode())))
        listed = {row[0] for row in record}
        assert listed == names  # exactly the files in the wheel, RECORD included
        for path, digest, size in record:
            if path == f"{DIST}/RECORD":
                assert digest == "" and size == ""
                continue
            data = z.read(path)
            assert digest == _sha(data), path
            assert int(size) == len(data), path
        entry_points = z.read(f"{DIST}/entry_points.txt").decode()
        assert "fakeray = fakeray.scripts:main" in entry_points
        assert "fakeserve" not in entry_points

    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
         "--disable-pip-version-check", "--target", str(target), str(dst)],
        capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (target / "fakeray" / "__init__.py").is_file()
    assert (target / "fakeray" / "core" / "raylet").stat().st_mode & 0o111
    assert not (target / "fakeray" / "rllib").exists()
    assert not (target / "fakeray" / "jars").exists()
    assert (target / "bin" / "fakeray").exists() and not (target / "bin" / "fakeserve").exists()
    installed = (target / DIST / "RECORD").read_text()
    assert "fakeray/rllib/algo.py" not in installed


def test_is_removed_patterns():
    assert ray_wheel.is_removed("ray/jars/ray_dist.jar", ["ray/jars/"])
    assert not ray_wheel.is_removed("ray/jarsish.py", ["ray/jars/"])
    assert ray_wheel.is_removed("ray/dashboard/client/build/static/js/a.js.map",
                                ["ray/dashboard/client/build/*.map"])
    assert not ray_wheel.is_removed("ray/dashboard/client/build/static/js/a.js",
                                    ["ray/dashboard/client/build/*.map"])
