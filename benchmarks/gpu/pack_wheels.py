"""Pack the wheels the GPU check needs into folders that each fit one call to a lent GPU machine.

The lent machine has no package registry and takes at most 64 MiB per call (the working tree
included). The CUDA 13 ``onnxruntime-gpu`` wheel alone is 255 MB, 231 MB of it the CUDA kernels
of its CUDA provider compiled for six GPU generations (sm_75, 80, 86, 89, 90, 120). The GPU
runs one of them, so this script zeroes the others' payloads inside the provider's fatbin
(headers kept, so the CUDA driver still reads the container and picks the entry of its own
generation); zeros compress to nothing and the wheel drops to 114 MB for sm_90 (H100, H200).
Then every wheel is cut into parts over call-sized folders:

    python benchmarks/gpu/pack_wheels.py --lighten coopkit/embedded/assets/coopkit-tiny.safetensors

prints one device call per folder. The stash calls only copy their folder into /tmp on the
machine (``GPU_CHECK_STASH_ONLY=1``), so the machine must stay warm between them (issue them
back to back); ``--lighten`` names tracked files to move out of the working tree during the
stash calls (their bytes then go to wheels) and back before the last call, which carries the
small wheels and runs the check.
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import importlib.metadata
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
ELF_ENTRY = 2  # fatbin entry kinds: 1 PTX, 2 ELF (a cubin for one GPU generation)
CALL_BYTES = 64 * 2**20  # what one call to the lent machine carries, working tree included
MARGIN = 2**20
PROVIDER = "onnxruntime/capi/libonnxruntime_providers_cuda.so"
PYTHON_TAGS = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:", "--no-deps",
               *[x for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                 for x in ("--platform", p)]]


def elf_section(data: bytes, name: str) -> tuple[int, int]:
    """``(file offset, size)`` of an ELF64 little-endian file's section ``name``."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]
    for sh_name, _, _, _, offset, size in headers:
        end = data.index(b"\0", names_at + sh_name)
        if data[names_at + sh_name:end].decode() == name:
            return offset, size
    raise ValueError(f"no section {name!r}")


def fatbin_entries(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int, int]]:
    """``(header offset, header size, payload bytes, kind, sm)`` of every entry in the fatbin
    containers between ``start`` and ``end`` (containers are 8-byte aligned, zeros between)."""
    out = []
    p = start
    while p + 16 <= end:
        magic, _, header, size = struct.unpack_from("<IHHQ", data, p)
        if magic != FATBIN_MAGIC:
            p += 8
            continue
        q, stop = p + header, p + header + size
        while q < stop:
            kind, _, entry_header, padded = struct.unpack_from("<HHIQ", data, q)
            sm, = struct.unpack_from("<I", data, q + 28)
            out.append((q, entry_header, padded, kind, sm))
            q += entry_header + padded
        p = stop
    return out


def keep_only(data: bytearray, start: int, end: int, archs: set[int]) -> dict[int, int]:
    """Zero the payload of every fatbin entry that is not a cubin for one of ``archs``; the
    bytes kept per generation (``{sm: bytes}``). Refuses when no entry is for ``archs``."""
    entries = fatbin_entries(data, start, end)
    kept: dict[int, int] = collections.Counter()
    if not any(kind == ELF_ENTRY and sm in archs for _, _, _, kind, sm in entries):
        found = sorted({sm for _, _, _, kind, sm in entries if kind == ELF_ENTRY})
        raise ValueError(f"no cubin for sm {sorted(archs)}; the file has {found}")
    for at, header, padded, kind, sm in entries:
        if kind == ELF_ENTRY and sm in archs:
            kept[sm] += padded
        else:
            data[at + header:at + header + padded] = bytes(padded)
    return dict(kept)


def strip_wheel(wheel: Path, dest: Path, archs: set[int]) -> Path:
    """A copy of an onnxruntime-gpu wheel whose CUDA provider keeps only ``archs``' kernels
    (RECORD's hash and size for that file updated, everything else as it was)."""
    out = dest / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        record = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        provider = bytearray(src.read(PROVIDER))
        start, size = elf_section(provider, ".nv_fatbin")
        kept = keep_only(provider, start, start + size, archs)
        digest = base64.urlsafe_b64encode(hashlib.sha256(provider).digest()).rstrip(b"=").decode()
        for info in src.infolist():
            if info.filename == PROVIDER:
                dst.writestr(info, bytes(provider), zipfile.ZIP_DEFLATED, 9)
            elif info.filename == record:
                lines = [f"{PROVIDER},sha256={digest},{len(provider)}" if line.startswith(PROVIDER + ",") else line
                         for line in src.read(record).decode().splitlines()]
                dst.writestr(info, "\n".join(lines) + "\n")
            else:
                dst.writestr(info, src.read(info.filename), zipfile.ZIP_DEFLATED, 9)
    print(f"# {wheel.name}: {wheel.stat().st_size / 1e6:.0f} MB -> {out.stat().st_size / 1e6:.0f} MB "
          f"(cubins kept: {', '.join(f'sm_{k} {v / 1e6:.0f} MB' for k, v in sorted(kept.items()))})")
    return out


def plan(files: list[Path], small: list[Path], dest: Path, stash_bytes: int, last_bytes: int) -> list[Path]:
    """Cut ``files`` into parts (``NAME.part-NN`` plus ``NAME.parts``, the count, as
    gpu_check.sh assembles them) over folders ``dest/c1 ...`` of at most ``stash_bytes``; the
    last folder holds ``small`` whole and must fit ``last_bytes``. Returns the folders."""
    if sum(f.stat().st_size for f in small) > last_bytes:
        raise ValueError("the small wheels alone do not fit the last call")
    folders: list[Path] = []
    room = 0

    def folder() -> Path:
        nonlocal room
        folders.append(dest / f"c{len(folders) + 1}")
        folders[-1].mkdir(parents=True)
        room = stash_bytes
        return folders[-1]

    current = folder()
    for f in files:
        data, n = f.read_bytes(), 0
        while data:
            if room < MARGIN:
                current = folder()
            take = data[: room - 64]  # the count file rides along with each part's folder
            (current / f"{f.name}.part-{n:02d}").write_bytes(take)
            room -= len(take) + 64
            data, n = data[len(take):], n + 1
        (folders[-1] / f"{f.name}.parts").write_text(f"{n}\n")
    last = folder()
    for f in small:
        shutil.copy2(f, last)
    return folders


def ignore_locally(root: Path, folder: Path) -> None:
    """Name ``folder`` in .git/info/exclude when it lies in the checkout: an untracked folder that
    git does not ignore travels with every call, and the wheels would not fit."""
    try:
        line = f"/{folder.resolve().relative_to(root).as_posix()}/"
    except ValueError:
        return
    exclude = root / ".git" / "info" / "exclude"
    if exclude.parent.is_dir() and line not in (exclude.read_text().splitlines() if exclude.exists() else []):
        with exclude.open("a") as f:
            f.write(line + "\n")


def tracked_bytes(root: Path) -> int:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    return sum((root / n).stat().st_size for n in names.decode().split("\0") if n and (root / n).is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=Path(".gpuwhl"),
                    help="folders c1, c2, ... (named in .git/info/exclude when inside the checkout)")
    ap.add_argument("--download", type=Path, default=Path("/tmp/coopkit-gpu-wheels"), help="pip's download folder")
    ap.add_argument("--sm", type=int, nargs="+", default=[90], help="GPU generations to keep: 90 for H100/H200")
    ap.add_argument("--lighten", type=Path, nargs="*", default=[], help="tracked files moved out during the stash calls")
    ap.add_argument("--no-openvino", action="store_true", help="leave OpenVINO's CPU rows out (one call fewer)")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[2]
    big = [f"onnxruntime-gpu=={importlib.metadata.version('onnxruntime-gpu')}"]
    if not args.no_openvino:
        big.append(f"openvino=={importlib.metadata.version('openvino')}")
    small = [f"open_clip_torch=={importlib.metadata.version('open_clip_torch')}", "ftfy", "wcwidth", "openvino-telemetry"]
    args.download.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", *PYTHON_TAGS, "-d", str(args.download), *big, *small],
                   check=True)

    def wheel(spec: str) -> Path:
        stem = spec.split("==")[0].replace("-", "_").lower()
        found = [w for w in args.download.glob("*.whl") if w.name.lower().startswith(stem + "-")]
        return max(found, key=lambda w: w.stat().st_mtime)

    if args.dest.exists():
        shutil.rmtree(args.dest)
    args.dest.mkdir(parents=True)
    ignore_locally(root, args.dest)
    stripped = args.download / "stripped"
    stripped.mkdir(exist_ok=True)
    files = [strip_wheel(wheel(big[0]), stripped, set(args.sm))] + [wheel(s) for s in big[1:]]
    tree = tracked_bytes(root)
    light = tree - sum(f.stat().st_size for f in args.lighten)
    folders = plan(files, [wheel(s) for s in small], args.dest, CALL_BYTES - light - MARGIN, CALL_BYTES - tree - MARGIN)
    moved = " ".join(str(f) for f in args.lighten)
    lightened = f" ({light / 1e6:.1f} MB lightened)" if args.lighten else ""
    print(f"# working tree {tree / 1e6:.1f} MB{lightened}; {len(folders)} calls, back to back:")
    if moved:
        print(f"# before the first: mkdir -p /tmp/lightened && mv {moved} /tmp/lightened/  (git checkout them after)")
    for f in folders[:-1]:
        print(f"run carry=[{str(f)!r}]  GPU_CHECK_STASH_ONLY=1 COOPKIT_WHEELS={f} bash benchmarks/gpu/gpu_check.sh")
    if moved:
        print(f"# before the last: git checkout -- {moved}")
    print(f"run carry=[{str(folders[-1])!r}]  set -o pipefail; COOPKIT_WHEELS={folders[-1]} "
          "bash benchmarks/gpu/gpu_check.sh 2>&1 | tee $OUT/live.log")


if __name__ == "__main__":
    main()
