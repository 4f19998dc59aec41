"""Worst cases under the decoding limits of one record (storage.datasets: MAX_DECODE_PIXELS,
MAX_JPEG_SCANS, MAX_TIFF_VALUES, ...): time and memory of `_decode_image` on files built to cost the
most while staying inside them. No record may make a release run out of memory or time, so these are
what a custodian's extraction process must afford per file.

    python bench/bench_decode_limits.py [--repeats 3]

Each file is decoded `--repeats` times, each in a fresh process; reported: the median seconds and the
median peak RSS above that process's RSS after its imports (MiB). Rows: bench/results/decode_limits.json.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from storage.datasets import MAX_DECODE_PIXELS, MAX_JPEG_SCANS, MAX_TIFF_VALUES  # noqa: E402

SIDE = int(MAX_DECODE_PIXELS ** 0.5)  # 5,792: the largest square under the pixel cap

DECODE = """
import json, resource, sys, time
from pathlib import Path
from storage.datasets import CorruptImageError, _decode_image
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
try:
    _decode_image(Path(sys.argv[1]), 28, 1)
    outcome = "decoded"
except CorruptImageError as exc:
    outcome = "undecodable: " + str(exc).split(": ", 1)[1]
print(json.dumps({"seconds": time.perf_counter() - start, "outcome": outcome,
                  "rss_above_imports_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base}))
"""


def _segment(marker: int, payload: bytes) -> bytes:
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload


def _packed(bits: str) -> bytes:
    bits += "1" * (-len(bits) % 8)
    out = bytearray()
    for i in range(0, len(bits), 8):
        out.append(int(bits[i:i + 8], 2))
        if out[-1] == 0xFF:
            out.append(0)  # byte stuffing
    return bytes(out)


def progressive_jpeg(side: int, scans: int) -> bytes:
    """Grey progressive JPEG, side x side: one DC scan, one AC scan, then `scans - 2` AC refinement scans,
    each an end-of-band run of a few bytes and a whole-image pass (refinements cost the most)."""
    blocks = ((side + 7) // 8) ** 2
    runs, left = [], blocks
    while left > 0:  # EOB14 runs of 16,384 + (0..16,383) blocks
        run = min(left, 32767) if left >= 16384 else 16384
        runs.append("0" + format(run - 16384, "014b"))
        left -= run
    header = (b"\xff\xd8" + _segment(0xDB, b"\x00" + b"\x01" * 64)
              + _segment(0xC2, struct.pack(">BHHB", 8, side, side, 1) + b"\x01\x11\x00")
              + _segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")
              + _segment(0xC4, b"\x10" + bytes([1] + [0] * 15) + b"\xe0"))
    dc = _segment(0xDA, b"\x01\x01\x00\x00\x00\x00") + _packed("0" * blocks)
    band = _packed("".join(runs))
    ac = _segment(0xDA, b"\x01\x01\x00\x01\x3f\x00") + band
    refine = _segment(0xDA, b"\x01\x01\x00\x01\x3f\x10") + band  # Ah 1, Al 0
    return header + dc + ac + refine * (scans - 2) + b"\xff\xd9"


def animated_webp(side: int) -> bytes:
    """An animated WebP whose canvas is side x side and whose one frame is 1 x 1 pixel."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 10, 10)).save(out, "WEBP", lossless=True)
    raw = out.getvalue()
    vp8l = raw[raw.index(b"VP8L"):]

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return kind + struct.pack("<I", len(payload)) + payload + (b"\0" if len(payload) & 1 else b"")

    def u24(v: int) -> bytes:
        return struct.pack("<I", v)[:3]

    body = (b"WEBP" + chunk(b"VP8X", bytes([0x12, 0, 0, 0]) + u24(side - 1) + u24(side - 1))
            + chunk(b"ANIM", bytes(4) + struct.pack("<H", 0))
            + chunk(b"ANMF", u24(0) * 4 + u24(100) + b"\0" + vp8l))
    return b"RIFF" + struct.pack("<I", len(body)) + body


def many_strip_tiff(rows: int) -> bytes:
    """1 x `rows` grey TIFF, one strip per row, each strip its own byte: MAX_TIFF_VALUES' worst case."""
    def tag(code: int, kind: int, count: int, value: int) -> bytes:
        return struct.pack("<HHII", code, kind, count, value)

    pixels = 8 + 2 + 9 * 12 + 4
    offsets = pixels + rows
    counts = offsets + 4 * rows
    entries = [tag(256, 4, 1, 1), tag(257, 4, 1, rows), tag(258, 3, 1, 8), tag(259, 3, 1, 1), tag(262, 3, 1, 1),
               tag(273, 4, rows, offsets), tag(277, 3, 1, 1), tag(278, 4, 1, 1), tag(279, 4, rows, counts)]
    return (b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", 9) + b"".join(entries) + bytes(4)
            + b"\x64" * rows + b"".join(struct.pack("<I", pixels + i) for i in range(rows))
            + struct.pack("<I", 1) * rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows_per_tiff = (MAX_TIFF_VALUES - 16) // 2  # 9 entries and 7 single values besides the two arrays
    files = {f"progressive JPEG {SIDE}^2, {MAX_JPEG_SCANS} scans": ("x.jpg", progressive_jpeg(SIDE, MAX_JPEG_SCANS)),
             f"progressive JPEG {SIDE}^2, {MAX_JPEG_SCANS + 1} scans (over)": ("y.jpg",
                                                                              progressive_jpeg(SIDE, MAX_JPEG_SCANS + 1)),
             f"animated WebP, {SIDE}^2 canvas": ("x.webp", animated_webp(SIDE)),
             f"TIFF, {rows_per_tiff:,} one-row strips": ("x.tif", many_strip_tiff(rows_per_tiff))}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (file_name, data) in files.items():
            path = Path(tmp) / file_name
            path.write_bytes(data)
            runs = [json.loads(subprocess.run([sys.executable, "-c", DECODE, str(path)], check=True, capture_output=True,
                                              text=True, cwd=Path(__file__).resolve().parents[1]).stdout)
                    for _ in range(args.repeats)]
            row = {"file": name, "bytes": len(data), "outcome": runs[0]["outcome"],
                   "seconds_median": round(statistics.median(r["seconds"] for r in runs), 2),
                   "rss_above_imports_mib_median": round(statistics.median(r["rss_above_imports_mib"] for r in runs))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    path = write_result("decode_limits", {"command": "python " + shlex.join(sys.argv), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
