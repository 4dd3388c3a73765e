"""benchmarks/gpu/pack_wheels.py: the fatbin slimming keeps exactly one GPU generation's kernels, and
the parts fit their calls and put the wheels back together byte for byte."""

from __future__ import annotations

import importlib.util
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def pack() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pack_wheels", ROOT / "benchmarks" / "gpu" / "pack_wheels.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def entry(kind: int, sm: int, payload: bytes) -> bytes:
    """One fatbin entry as CUDA writes it: a 64-byte header (kind, version, header size, padded
    payload size, ..., the SM generation at byte 28), then the payload."""
    header = bytearray(64)
    struct.pack_into("<HHIQ", header, 0, kind, 0x101, 64, len(payload))
    struct.pack_into("<I", header, 28, sm)
    return bytes(header) + payload


def container(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def test_keep_only_zeroes_every_other_payload_and_no_header() -> None:
    m = pack()
    rng = np.random.default_rng(0)
    payloads = [rng.bytes(n) for n in (64, 32, 48, 16)]
    first = container(entry(2, 80, payloads[0]), entry(2, 90, payloads[1]))
    blob = bytearray(b"\0" * 8 + first + container(entry(1, 90, payloads[2]), entry(2, 90, payloads[3])) + b"\0" * 8)
    before = bytes(blob)
    kept = m.keep_only(blob, 0, len(blob), {90})
    assert kept == {90: 48}  # the two sm_90 cubins; the PTX entry is not a cubin
    expected = bytearray(before)
    for at, n in ((8 + 16 + 64, 64), (8 + len(first) + 16 + 64, 48)):  # the sm_80 cubin's and the PTX's payloads
        expected[at:at + n] = bytes(n)
    assert blob == expected
    with pytest.raises(ValueError, match=r"no cubin for sm \[100\]; the file has \[80, 90\]"):
        m.keep_only(bytearray(before), 0, len(before), {100})


def test_elf_section_agrees_with_readelf() -> None:
    m = pack()
    exe = Path(sys.executable).resolve()
    out = subprocess.run(["readelf", "-SW", str(exe)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("readelf is not installed")
    line = next(x for x in out.stdout.splitlines() if " .text " in x).split("]", 1)[1].split()
    assert m.elf_section(exe.read_bytes(), ".text") == (int(line[3], 16), int(line[4], 16))
    with pytest.raises(ValueError, match="no section"):
        m.elf_section(exe.read_bytes(), ".nv_fatbin")


def test_onnxruntime_cuda_provider_has_sm90_kernels() -> None:
    """The installed onnxruntime-gpu's CUDA provider parses into entries, sm_90 among them (the
    same build, for Python 3.12, is what the script slims)."""
    m = pack()
    import onnxruntime

    provider = Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not provider.exists():
        pytest.skip("this onnxruntime has no CUDA provider")
    data = provider.read_bytes()
    start, size = m.elf_section(data, ".nv_fatbin")
    entries = m.fatbin_entries(data, start, start + size)
    assert {kind for *_, kind, _ in entries} <= {1, 2}
    assert 90 in {sm for *_, kind, sm in entries if kind == 2}
    assert sum(padded for _, _, padded, _, _ in entries) <= size


def test_plan_fits_each_call_and_reassembles(tmp_path: Path) -> None:
    m = pack()
    rng = np.random.default_rng(1)
    big = []
    for name, n in (("a-1.whl", 5 * 2**20 + 123), ("b-2.whl", 3 * 2**20)):
        (tmp_path / name).write_bytes(rng.bytes(n))
        big.append(tmp_path / name)
    small = tmp_path / "c-3.whl"
    small.write_bytes(rng.bytes(1000))
    budget = 2 * 2**20 + 500
    folders = m.plan(big, [small], tmp_path / "out", budget, 2000)
    for f in folders:
        assert sum(p.stat().st_size for p in f.iterdir()) <= budget
    assert [p.name for p in folders[-1].iterdir()] == ["c-3.whl"]
    for wheel in big:
        parts = [p for f in folders for p in f.glob(wheel.name + ".part-*")]
        counts = [p for f in folders for p in f.glob(wheel.name + ".parts")]
        assert len(counts) == 1 and int(counts[0].read_text()) == len(parts)
        assert b"".join(p.read_bytes() for p in sorted(parts, key=lambda p: p.name)) == wheel.read_bytes()
    with pytest.raises(ValueError, match="small wheels"):
        m.plan(big, [small], tmp_path / "out2", budget, 999)
