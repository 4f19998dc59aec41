"""Bad input is refused, by name, before any work: generated release configurations and command
lines (hypothesis, 1,000 of each), and corrupt or hostile image files in an imagefolder dataset.

The command-line property runs `flows.cli.main` with the release flow replaced by a tripwire: an
invalid value that got past validation would fail the test at once instead of starting a release.
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import re
import struct
import tempfile
import zlib
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

import flows.custodian_release
from flows import cli
from mepf_core.encoders import available_encoders
from storage.datasets import CorruptImageError, open_dataset
from storage.params import ReleaseParams

EXAMPLES = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- generated values: (value, is_valid) per field -------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=1e-6, max_value=1e6)
non_positive_or_odd = st.one_of(st.floats(max_value=0.0), st.sampled_from([math.nan, math.inf, -math.inf]))
outside_unit = st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0), st.just(math.nan))
junk_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
unknown_encoder = junk_text.filter(lambda s: s not in available_encoders())
bad_suffix = st.sampled_from(["out", "out.h6", "out.H5", "out.h5.tmp", "out.hdf", "out.json", ".h5", "out.h5 "])


def _field(valid, invalid):
    return st.one_of(valid.map(lambda v: (v, True)), invalid.map(lambda v: (v, False)))


FIELDS = {
    "target_epsilon": _field(positive, st.one_of(non_positive_or_odd, st.sampled_from(["abc", "", "1e", "eps"]))),
    "target_delta": _field(st.floats(min_value=1e-12, max_value=1e-3),  # per-release cap: mepf_core.privacy.calibration
                           st.one_of(outside_unit, st.floats(min_value=1.01e-3, max_value=0.99))),
    "moments": _field(st.sampled_from([1, 2]), st.sampled_from([0, 3, -1, 1.5, "two"])),
    "encoder": _field(st.sampled_from(available_encoders()), unknown_encoder),
    "norm_bound": _field(positive, non_positive_or_odd),
    "second_moment_bound": _field(positive, non_positive_or_odd),
    "count_share": _field(st.floats(min_value=0.01, max_value=0.99), st.one_of(outside_unit, st.just(math.inf))),
    "limit": _field(st.integers(1, 10**6), st.integers(max_value=0)),
    "out": _field(st.sampled_from(["r.h5", "dir/r.hdf5"]), bad_suffix),
    "neighbouring": _field(st.sampled_from(["add-remove", "replace-one"]), st.sampled_from(["add_remove", "", "x"])),
}


def _forms(value) -> set[str]:
    """Ways a message may name `value`."""
    if isinstance(value, float):
        return {str(value), repr(value), f"{value:g}"}
    return {str(value), repr(value)}


@EXAMPLES
@given(st.fixed_dictionaries({}, optional=FIELDS), st.sampled_from(["none", "valid", "invalid", "no-ledger"]))
def test_release_params_refuse_every_invalid_value_by_name(fields, budget_case):
    values = {name: v for name, (v, _) in fields.items()}
    bad = [v for v, ok in fields.values() if not ok]
    values.setdefault("target_epsilon", 1.0)
    if budget_case != "none":
        values["budget"] = {"valid": 2.0, "invalid": -1.5, "no-ledger": 2.0}[budget_case]
        if budget_case != "no-ledger":
            values["ledger"] = "ledger.jsonl"
        if budget_case == "invalid":
            bad.append(-1.5)
        if budget_case == "no-ledger":
            bad.append("--ledger")
    limit, limit_ok = fields.get("limit", (None, True))
    neighbouring = fields.get("neighbouring", ("add-remove", True))[0]
    if limit is not None and limit_ok and neighbouring != "replace-one":
        bad.append(f"limit={limit}")  # the first N is not a per-record selection under add-remove: refused by name
    event("invalid: refused" if bad else "valid: accepted unchanged")
    if not bad:
        params = ReleaseParams(**values)  # valid: accepted, and nothing was "corrected"
        for name, value in values.items():
            got = getattr(params, name)
            assert (got.value if name == "neighbouring" else got) == value
        return
    with pytest.raises(ValidationError) as info:
        ReleaseParams(**values)
    message = str(info.value)
    assert any(form in message for v in bad for form in _forms(v)), message


# --- the command line --------------------------------------------------------------------------

def _arg_float(value: float) -> tuple[str, str]:
    return repr(value), str(float(repr(value)))


CLI_BAD = {  # option -> strategy of (argument text, text the error message must contain)
    "--target-epsilon": st.one_of(non_positive_or_odd.map(_arg_float),
                                  st.sampled_from([("abc", "abc"), ("", "''"), ("1e-400", "0.0")])),
    "--target-delta": outside_unit.map(_arg_float),
    "--moments": st.sampled_from([("0", "0"), ("3", "3"), ("two", "two"), ("1.5", "1.5")]),
    "--encoder": unknown_encoder.map(lambda s: (s, repr(s))),
    "--norm-bound": non_positive_or_odd.map(_arg_float),
    "--second-moment-bound": non_positive_or_odd.map(_arg_float),
    "--neighbouring": st.sampled_from([("add_remove", "add_remove"), ("replace", "replace")]),
    "--limit": st.integers(-10**6, 0).map(lambda i: (str(i), f"got {i}")),
    "--split": st.sampled_from([("val", "val"), ("TRAIN", "TRAIN")]),
    "--batch-size": st.sampled_from([("0", "batch_size"), ("65537", "batch_size")]),  # pydantic names the field
    "--shards": st.sampled_from([("0", "shards"), ("2000", "shards")]),
}
DATASET_BAD = st.one_of(
    junk_text.filter(lambda s: s and not s.startswith("imagefolder:") and s not in
                     ("fashion-mnist", "mnist", "cifar10", "celeba")).map(lambda s: (s, repr(s))),
    st.text("abcxyz", min_size=1, max_size=8).map(lambda s: (f"imagefolder:/nonexistent/{s}", f"/nonexistent/{s}")),
)


@pytest.fixture(scope="module")
def out_dir():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def _tripwire(*args, **kwargs):
    raise AssertionError(f"an invalid release reached the flow: {args} {kwargs}")


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            mock.patch.object(flows.custodian_release, "custodian_release", _tripwire):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse refuses malformed values itself
            code = exc.code
    return code, out.getvalue(), err.getvalue()


@EXAMPLES
@given(data=st.data())
def test_cli_release_refuses_every_invalid_command_line(out_dir, data):
    chosen = data.draw(st.lists(st.sampled_from(sorted(CLI_BAD)), min_size=0, max_size=3, unique=True))
    case = data.draw(st.sampled_from(["options", "suffix", "budget-without-ledger", "dataset"]) if chosen
                     else st.sampled_from(["suffix", "budget-without-ledger", "dataset"]))
    out = out_dir / ("r.json" if case == "suffix" else "r.h5")
    argv = ["release", "--target-epsilon=1", f"--out={out}"]
    expected = []
    for option in chosen:
        text, form = data.draw(CLI_BAD[option])
        argv[1:] = [a for a in argv[1:] if not a.startswith(option + "=")]
        argv.append(f"{option}={text}")
        expected.append(form)
    if case == "suffix":
        expected.append(repr(str(out)))
    elif case == "budget-without-ledger":
        argv.append("--budget=3")
        expected.append("--ledger")
    elif case == "dataset":
        text, form = data.draw(DATASET_BAD)
        argv.append(f"--dataset={text}")
        expected.append(form)
    code, stdout, stderr = _run_cli(argv)
    event("refused by argparse" if "usage:" in stderr else "refused by validation")
    assert code == 2, (argv, stderr)
    assert stdout == ""
    assert any(form in stderr for form in expected), (argv, expected, stderr)
    assert not any(out_dir.iterdir()), "a refused release left a file behind"


def test_cli_refuses_an_existing_output_and_a_missing_folder(tmp_path):
    taken = tmp_path / "taken.h5"
    taken.write_bytes(b"old")
    code, _, err = _run_cli(["release", "--target-epsilon=1", f"--out={taken}"])
    assert code == 2 and "already exists" in err and taken.read_bytes() == b"old"
    missing = tmp_path / "no" / "such" / "r.h5"
    code, _, err = _run_cli(["release", "--target-epsilon=1", f"--out={missing}"])
    assert code == 2 and str(missing.parent) in err and not (tmp_path / "no").exists()


# --- corrupt and hostile image files ---------------------------------------------------------------

def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk (valid CRC) claiming width x height, and no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def _noise_png(path: Path) -> bytes:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


def _folder(tmp_path: Path, name: str, write) -> tuple[str, Path]:
    """An imagefolder dataset: class "a" holds the hostile file, class "b" a valid image."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("L", (28, 28), 40).save(tmp_path / "b" / "ok.png")
    target = tmp_path / "a" / name
    write(target)
    return f"imagefolder:{tmp_path}", target


HOSTILE = {
    "truncated.png": lambda p: p.write_bytes(_noise_png(p)[:1500]),
    "truncated.jpg": lambda p: (Image.new("RGB", (64, 64), (9, 99, 199)).save(p, quality=95),
                                p.write_bytes(p.read_bytes()[:300])),
    "zero-bytes.png": lambda p: p.write_bytes(b""),
    "huge-100000x100000.png": lambda p: p.write_bytes(_png_header(100_000, 100_000)),
    "huge-10000x10000.png": lambda p: p.write_bytes(_png_header(10_000, 10_000)),
    "zero-width.png": lambda p: p.write_bytes(_png_header(0, 28)),
    "text.png": lambda p: p.write_text("this is not an image\n"),
    "flipped-idat.png": lambda p: p.write_bytes(bytes(b ^ 0xFF if i == 200 else b for i, b in enumerate(_noise_png(p)))),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_corrupt_image_raises_a_named_error(tmp_path, name):
    spec, target = _folder(tmp_path, name, HOSTILE[name])
    source = open_dataset(spec)
    with pytest.raises(CorruptImageError, match=re.escape(str(target))):
        source.load_all()
    with pytest.raises(CorruptImageError, match=re.escape(str(target))):
        list(source.iter_batches(8))


ODD_MODES = {  # name -> (writer, expected RGB of every pixel)
    "cmyk.jpg": (lambda p: Image.new("CMYK", (16, 16), (0, 255, 0, 0)).save(p, quality=100), (255, 0, 255)),
    "palette.png": (lambda p: _palette(p), (10, 200, 30)),
    "gray-alpha.png": (lambda p: Image.new("LA", (16, 16), (90, 0)).save(p), (90, 90, 90)),
    "bilevel.png": (lambda p: Image.new("1", (16, 16), 1).save(p), (255, 255, 255)),
    "animated.gif": (lambda p: _animated(p), (10, 200, 30)),
}


def _palette(path: Path) -> None:
    img = Image.new("P", (16, 16), 0)
    img.putpalette([10, 200, 30] + [0] * 765)
    img.save(path)


def _animated(path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((10, 200, 30), (250, 0, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:])


@pytest.mark.parametrize("name", sorted(ODD_MODES))
def test_unusual_modes_decode_to_the_right_rgb(tmp_path, name):
    write, rgb = ODD_MODES[name]
    spec, _ = _folder(tmp_path, name, write)
    images, labels = open_dataset(spec, channels=3).load_all()  # RGB asked for (grey folders default to 1 channel)
    assert images.shape == (2, 3, 32, 32) and images.dtype == np.uint8 and list(labels) == [0, 1]
    assert np.abs(images[0].reshape(3, -1).astype(int) - np.array(rgb)[:, None]).max() <= 2


@pytest.mark.parametrize("mode,value,expected", [("I;16", 32768, 128), ("I;16", 1000, 4)])
def test_sixteen_bit_images_are_scaled_or_refused(tmp_path, mode, value, expected):
    """A 16-bit grayscale PNG must decode to its 8-bit equivalent (value / 257) or be refused by
    name; saturating it to white would silently feed the encoder a different image."""
    spec, target = _folder(tmp_path, "deep.png",
                           lambda p: Image.fromarray(np.full((16, 16), value, np.uint16)).save(p))
    assert Image.open(target).mode == mode
    try:
        images, _ = open_dataset(spec).load_all()
    except CorruptImageError as exc:
        assert str(target) in str(exc)
        return
    assert abs(int(images[0, 0, 0, 0]) - expected) <= 1


def test_a_failed_download_leaves_no_folders_behind(tmp_path, monkeypatch):
    """Offline, with no Fashion-MNIST under --data-root: a named error, and the folder as it was."""
    import torchvision

    from storage.datasets import DatasetNotFoundError, open_dataset

    def offline(root, train, download):  # what torchvision does offline: make its folders, then fail
        (Path(root) / "FashionMNIST" / "raw").mkdir(parents=True)
        (Path(root) / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz.part").write_bytes(b"partial")
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    root = tmp_path / "data"
    with pytest.raises(DatasetNotFoundError, match="could not be downloaded"):
        open_dataset("fashion-mnist", "train", str(root))
    assert not root.exists()
    root.mkdir()
    with pytest.raises(DatasetNotFoundError):
        open_dataset("fashion-mnist", "train", str(root))
    assert list(root.iterdir()) == []  # an existing folder stays, emptied of the attempt


def _assert_zero_feature_record(tmp_path: Path, spec: str, target: Path) -> None:
    """A release of `spec` treats `target` as one record with zero features: against the folder without
    it, the sums are the same and one count moves by 1 (the add-remove sensitivities); the release is
    made either way."""
    from storage.params import ReleaseParams
    from tasks.custodian import shard_sums

    (tmp_path / "b" / "ok2.png").write_bytes((tmp_path / "b" / "ok.png").read_bytes())
    params = ReleaseParams(dataset=spec, target_epsilon=1.0, labelled=True, batch_size=16, channels=1)
    with_record = shard_sums(params, 0)
    target.unlink()
    without = shard_sums(params, 0)
    assert np.array_equal(with_record.moment1, without.moment1)
    assert np.abs(with_record.counts - without.counts).sum() == 1.0


def test_a_corrupt_image_in_a_release_is_a_record_with_zero_features(tmp_path):
    """Refusing a release over one undecodable file made whether a release is made (charged) or refused
    (free) depend on one record's bytes (the fifth DP review). Now such a record has zero features and
    keeps its count; nothing names the file (`open_dataset` used locally, above, and `mepf check-data`
    still do)."""
    spec, target = _folder(tmp_path, "secret-name-7.png", HOSTILE["truncated.png"])
    _assert_zero_feature_record(tmp_path, spec, target)


# --- sixth DP review: every failure a file's bytes or its own attributes can cause is the record's ----

def _dds(fourcc: bytes) -> bytes:
    """A DirectDraw Surface header (16 x 16) whose pixel format is the FourCC `fourcc`."""
    header = struct.pack("<7I", 124, 0x1007, 16, 16, 0, 0, 0) + bytes(44)
    pixel_format = struct.pack("<2I4s5I", 32, 0x4, fourcc, 0, 0, 0, 0, 0)
    return b"DDS " + header + pixel_format + struct.pack("<5I", 0x1000, 0, 0, 0, 0) + bytes(1024)


# Files named .png whose content another Pillow plugin claims, each raising an error class that the
# decoder's old `except (OSError, ValueError, SyntaxError)` let escape: the release was refused, free.
ESCAPING = {
    "dds-unknown-fourcc.png": _dds(b"ZZZZ"),  # DdsImagePlugin: NotImplementedError
    "im-fractional-size.png": b"Image type: L image\r\nName: x\r\nImage size (x*y): 1.5*16\r\n\x1a".ljust(1024, b"\0"),
}


@pytest.mark.parametrize("name", sorted(ESCAPING))
def test_a_file_another_decoder_claims_is_an_undecodable_record(tmp_path, name):
    data = ESCAPING[name]
    with pytest.raises(Exception) as pillow_alone:  # what Pillow raises when it may pick any decoder
        Image.open(io.BytesIO(data)).load()
    assert not isinstance(pillow_alone.value, (OSError, ValueError, SyntaxError))
    spec, target = _folder(tmp_path, name, lambda p: p.write_bytes(data))
    with pytest.raises(CorruptImageError, match=re.escape(str(target))):
        open_dataset(spec, channels=1).load_all()
    from flows.cli_check_data import check_data

    assert [u["file"] for u in check_data(spec)["undecodable"]] == [str(target)]
    _assert_zero_feature_record(tmp_path, spec, target)


@pytest.mark.parametrize("error", [NotImplementedError("x"), TypeError("x"), struct.error("x"), IndexError("x"),
                                   KeyError("x"), ZeroDivisionError("x"), AttributeError("x"), MemoryError(),
                                   RecursionError("x"), OSError("decoder error -2")])
def test_any_error_a_decoder_raises_is_an_undecodable_record(tmp_path, monkeypatch, error):
    """The kind, not the two examples: whatever a decoder raises on a file's bytes is CorruptImageError."""
    from PIL import PngImagePlugin

    spec, target = _folder(tmp_path, "x.png", lambda p: Image.new("L", (16, 16), 7).save(p))

    def load(self):
        if Path(self.filename) == target:
            raise error
        return Image.Image.load(self)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load)
    with pytest.raises(CorruptImageError, match=re.escape(str(target))):
        open_dataset(spec, channels=1).load_all()


def test_an_image_over_the_pixel_cap_is_refused_from_its_header(tmp_path):
    """A small file that decodes to a large image (a 170 KB 16-bit PNG of 9,400 x 9,500 pixels took 684 MiB,
    so a memory limit made the release fail) is undecodable from its header, before any pixel is decoded."""
    from storage.datasets import MAX_DECODE_PIXELS

    side = int(MAX_DECODE_PIXELS ** 0.5) + 1  # 5,793 x 5,793: one over the cap
    spec, target = _folder(tmp_path, "wide.png", lambda p: Image.new("1", (side, side)).save(p))
    assert target.stat().st_size < 100_000
    with mock.patch.object(Image.Image, "load", side_effect=AssertionError("pixels decoded")):
        with pytest.raises(CorruptImageError, match=f"{side} x {side} pixels is more than"):
            open_dataset(spec, channels=1).load_all()


def _reading_fails_on(monkeypatch, target: Path, code: int) -> None:
    """Opening `target` raises the OSError `code` where a release or `mepf check-data` reads it (as the
    OS would; tests run as root, whom file modes do not stop)."""
    import builtins

    import flows.cli_check_data
    import storage.datasets

    def fake_open(file, *args, **kwargs):
        if isinstance(file, (str, Path)) and Path(file) == target:
            raise OSError(code, errno.errorcode[code], str(file))
        return builtins.open(file, *args, **kwargs)

    for module in (storage.datasets, flows.cli_check_data):
        monkeypatch.setattr(module, "open", fake_open, raising=False)


# Permission denied on ONE file passed the folder scan (lstat only) and then failed the release (sixth
# DP review); an I/O error still did (seventh): each decided whether a release was made. Any error
# reading one file is now that record's: EACCES ... ETIMEDOUT, whatever the errno.
READ_ERRORS = ("EACCES", "EPERM", "ENOENT", "ENAMETOOLONG", "ELOOP", "EIO", "ESTALE", "EFBIG", "ETXTBSY",
               "ENOTCONN", "EOVERFLOW", "EINVAL", "ENODEV", "ETIMEDOUT", "EMFILE")


@pytest.mark.parametrize("name", READ_ERRORS)
def test_a_file_that_cannot_be_read_is_an_undecodable_record(tmp_path, monkeypatch, name):
    from flows.cli_check_data import check_data
    from storage.datasets import UnreadableImageError

    spec, target = _folder(tmp_path, "locked.png", lambda p: Image.new("L", (16, 16), 7).save(p))
    _reading_fails_on(monkeypatch, target, getattr(errno, name))
    with pytest.raises(UnreadableImageError, match=re.escape(str(target))):
        open_dataset(spec, channels=1).load_all()
    report = check_data(spec)  # the custodian sees it, by name, with the reason
    assert [u["file"] for u in report["undecodable"]] == [str(target)] and report["unreadable"] == []
    assert errno.errorcode[getattr(errno, name)] in report["undecodable"][0]["error"]
    _assert_zero_feature_record(tmp_path, spec, target)


def test_a_jpeg_with_too_many_scans_is_undecodable_before_decoding(tmp_path):
    """A progressive JPEG's decoding time is scans x pixels and a scan can take a few bytes: 1,000 scans in
    119 KB took 28 s, 1 MB would take minutes (seventh DP review). More than MAX_JPEG_SCANS is refused
    from the file's bytes; as many is decoded."""
    from bench.bench_decode_limits import progressive_jpeg
    from storage.datasets import MAX_JPEG_SCANS

    spec, target = _folder(tmp_path, "scans.jpg", lambda p: p.write_bytes(progressive_jpeg(64, MAX_JPEG_SCANS)))
    assert Image.open(target).info.get("progressive")
    assert open_dataset(spec, channels=1).load_all()[0].shape == (2, 1, 28, 28)  # at the limit: decoded
    target.write_bytes(progressive_jpeg(64, MAX_JPEG_SCANS + 1))  # one scan more than the limit
    Image.open(target).load()  # Pillow alone decodes it
    with mock.patch.object(Image.Image, "load", side_effect=AssertionError("pixels decoded")):
        with pytest.raises(CorruptImageError, match=f"{MAX_JPEG_SCANS + 1} JPEG scans"):
            open_dataset(spec, channels=1).load_all()
    _assert_zero_feature_record(tmp_path, spec, target)


def _tiff_one_strip_per_row(rows: int, width: int = 1, compression: int = 1, compression_type: int = 3,
                            count_type: int = 4) -> bytes:
    """A grey TIFF of width x `rows` pixels with one strip per row, every strip at the same offset (the
    file holds one row of pixels, whatever `rows` is); its Compression and StripByteCounts stored as the
    TIFF types given (3 SHORT, 4 LONG, 9 SLONG, ...)."""
    def tag(code: int, kind: int, count: int, value: int) -> bytes:
        return struct.pack("<HHII", code, kind, count, value)

    directory_end = 8 + 2 + 9 * 12 + 4
    offsets = directory_end + width
    counts = offsets + 4 * rows
    entries = [tag(256, 4, 1, width), tag(257, 4, 1, rows), tag(258, 3, 1, 8),
               tag(259, compression_type, 1, compression), tag(262, 3, 1, 1), tag(273, 4, rows, offsets),
               tag(277, 3, 1, 1), tag(278, 4, 1, 1), tag(279, count_type, rows, counts)]
    return (b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", 9) + b"".join(entries) + bytes(4) + b"\x64" * width
            + struct.pack("<I", directory_end) * rows + struct.pack("<I", width) * rows)


def _bigtiff_declaring(strip_bytes: int) -> bytes:
    """A BigTIFF (Pillow's, 64 x 300 grey, one strip) whose StripByteCounts entry is set to `strip_bytes`."""
    out = io.BytesIO()
    Image.new("L", (64, 300), 9).save(out, "TIFF", big_tiff=True)
    data = bytearray(out.getvalue())
    (ifd,) = struct.unpack_from("<Q", data, 8)
    (entries,) = struct.unpack_from("<Q", data, ifd)
    for pos in range(ifd + 8, ifd + 8 + 20 * entries, 20):
        tag, kind, count = struct.unpack_from("<HHQ", data, pos)
        if tag == 279:
            assert count == 1
            struct.pack_into("<I" if kind == 4 else "<Q", data, pos + 12, strip_bytes)
    return bytes(data)


def test_a_costly_tiff_is_undecodable_before_opening(tmp_path):
    """`Image.open` of a TIFF with 2^22 one-row strips (34 MB) took 56 s and 1.3 GiB (seventh DP review);
    131,000 strips sharing one 1 MiB LZW run took 186 s to decode in a 2 MB file (eighth; 168 s again
    with the byte counts stored as SLONG, ninth): libtiff decodes
    a strip from the bytes its byte count declares, wherever it points. The first directory is read from
    the bytes first: its values counted, its byte counts summed against the file's size."""
    from storage.datasets import MAX_TIFF_VALUES, _tiff_cost_problem

    assert _tiff_cost_problem(_tiff_one_strip_per_row(64)) is None  # 64 strips of 1 byte: shared, but 64 bytes
    assert _tiff_cost_problem(_bigtiff_declaring(64 * 300)) is None  # BigTIFF, its own byte count
    spec, target = _folder(tmp_path, "strips.tif", lambda p: p.write_bytes(_tiff_one_strip_per_row(64)))
    assert open_dataset(spec, channels=1).load_all()[0].shape == (2, 1, 28, 28)
    costly = {"TIFF directory values": _tiff_one_strip_per_row(MAX_TIFF_VALUES // 2),  # 2^18 + 16 values
              "more than the file's": _tiff_one_strip_per_row(64, width=1000),  # 64,000 bytes declared in 2 KB
              "old-style JPEG": _tiff_one_strip_per_row(4, compression=6),
              # ninth DP review: libtiff reads these tags from other integer types too
              "old-style JPEG compression": _tiff_one_strip_per_row(4, compression=6, compression_type=4),
              "tag 279 stored as type 9": _tiff_one_strip_per_row(64, width=1000, count_type=9),
              "declaring 1,000,000 bytes": _bigtiff_declaring(10 ** 6)}  # a BigTIFF's counts are checked too
    for why, data in costly.items():
        target.write_bytes(data)
        with mock.patch.object(Image, "open", side_effect=AssertionError("opened")):
            with pytest.raises(CorruptImageError, match=why):
                open_dataset(spec, channels=1).load_all()
    _assert_zero_feature_record(tmp_path, spec, target)


def test_large_exif_and_large_files_are_undecodable(tmp_path, monkeypatch):
    """EXIF is parsed for its orientation (a PNG eXIf chunk can be as large as the file): over
    MAX_EXIF_BYTES it is refused. A file over MAX_RECORD_BYTES is not read past the limit."""
    import storage.datasets
    from storage.datasets import MAX_EXIF_BYTES

    exif = Image.Exif()
    exif[0x010E] = "x" * (MAX_EXIF_BYTES + 1)  # ImageDescription
    spec, target = _folder(tmp_path, "exif.png", lambda p: Image.new("L", (16, 16), 7).save(p, exif=exif))
    with pytest.raises(CorruptImageError, match="EXIF data over"):
        open_dataset(spec, channels=1).load_all()
    Image.new("L", (16, 16), 7).save(target)
    monkeypatch.setattr(storage.datasets, "MAX_RECORD_BYTES", target.stat().st_size - 1)
    with pytest.raises(CorruptImageError, match="larger than"):
        open_dataset(spec, channels=1).load_all()


def test_pillow_prints_nothing_about_a_record(tmp_path):
    """Pillow's warnings name what is wrong with a file ("Tag data larger than file. Skipping tag 270"):
    a line per record on the custodian's stderr. Decoding prints nothing."""
    import subprocess
    import sys

    tiff = (b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", 2) + struct.pack("<HHII", 270, 2, 123456, 4000)
            + struct.pack("<HHII", 0x0112, 3, 1, 6) + bytes(4))
    path = tmp_path / "damaged-exif.jpg"
    Image.new("L", (16, 16), 77).save(path, "JPEG", exif=b"Exif\0\0" + tiff)
    code = ("import sys; from pathlib import Path; from storage.datasets import _decode_image; "
            f"print(_decode_image(Path({str(path)!r}), 32, 1).shape)")
    run = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0 and run.stdout.strip() == "(1, 32, 32)", run.stderr
    assert run.stderr == ""
    bare = subprocess.run([sys.executable, "-W", "default", "-c",
                           f"from PIL import Image, ImageOps; ImageOps.exif_transpose(Image.open({str(path)!r}))"],
                          capture_output=True, text=True)
    assert "Skipping tag 270" in bare.stderr  # what Pillow alone prints


def test_check_data_prints_a_name_that_is_not_utf8(tmp_path):
    """A record whose name is not valid UTF-8 crashed `mepf check-data`'s report (seventh DP review)."""
    import os
    import subprocess
    import sys

    spec, _ = _folder(tmp_path, "ok.png", lambda p: Image.new("L", (16, 16), 7).save(p))
    with open(os.path.join(os.fsencode(tmp_path / "b"), b"bad\xff\xfe.png"), "wb") as f:
        f.write(b"\x89PNG garbage")
    run = subprocess.run([sys.executable, "-m", "flows.cli", "check-data", "--dataset", spec], capture_output=True,
                         env={**os.environ, "PYTHONIOENCODING": "utf-8"}, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 1, run.stderr  # the undecodable file is a problem to fix, not a crash
    assert b"bad\\udcff\\udcfe.png" in run.stdout and b"Traceback" not in run.stderr


def test_a_cell_reference_needs_a_declared_image_mode(tmp_path):
    """Tabulated cell offsets exist for one image shape; an image folder's inferred shape (one colour
    image makes it 3 x 32 x 32) decided whether the table had an entry, after the budget check (sixth DP
    review). Now the mode must be declared, and a missing entry is refused by the preflight."""
    from flows.custodian_release import preflight
    from mepf_core.errors import InvalidArgumentError

    spec = f"imagefolder:{tmp_path}"
    settings_ = dict(dataset=spec, target_epsilon=1.0, cells_per_class=8, cell_reference="fashion-mnist:test-select",
                     out=str(tmp_path / "r.h5"))
    with pytest.raises(ValidationError, match="--channels"):
        ReleaseParams(**settings_)
    preflight(ReleaseParams(**settings_, channels=1))  # 1 x 28 x 28: tabulated
    with pytest.raises(InvalidArgumentError, match=r"no tabulated centroids .* shape \[3, 32, 32\]"):
        preflight(ReleaseParams(**settings_, channels=3))
    ReleaseParams(**{**settings_, "cell_reference": "none"})  # offsets 0: no shape needed


def _idx_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> str:
    """A Fashion-MNIST-format train split (uncompressed idx files) of uint8 N x 28 x 28 images and labels."""
    root.mkdir(parents=True)
    n = len(images)
    (root / "train-images-idx3-ubyte").write_bytes(
        b"".join(v.to_bytes(4, "big") for v in (2051, n, 28, 28)) + images.astype(np.uint8).tobytes())
    (root / "train-labels-idx1-ubyte").write_bytes(
        b"".join(v.to_bytes(4, "big") for v in (2049, n)) + labels.astype(np.uint8).tobytes())
    return str(root)


@pytest.mark.parametrize("cells", [8, 1])
@pytest.mark.parametrize("bad_label", [10, 255])
def test_a_label_outside_the_classes_is_a_zero_feature_record_of_the_first_class(tmp_path, cells, bad_label):
    """A DP review: one record's idx label byte set to 10 made the release fail (an IndexError in the cells,
    a refused label without them), uncharged, and `mepf check-data` crashed. The record now counts in
    class 0 with zero features: the release is the add-remove neighbour's plus one count of class 0."""
    from flows.cli_check_data import check_data
    from tasks.custodian import shard_sums
    from tests.helpers import fmnist_subset, frob

    images, labels = fmnist_subset(40)
    pixels = (images[:, 0] * 255).round().numpy().astype(np.uint8)
    forged = labels.numpy().copy()
    forged[17] = bad_label
    keep = np.arange(40) != 17
    settings_ = dict(dataset="fashion-mnist", target_epsilon=10.0, cells_per_class=cells, batch_size=16,
                     out=str(tmp_path / "r.h5"))
    with_bad = shard_sums(ReleaseParams(**settings_, data_root=_idx_folder(tmp_path / "bad", pixels, forged)), 0)
    without = shard_sums(ReleaseParams(**settings_, data_root=_idx_folder(tmp_path / "without", pixels[keep],
                                                                          labels.numpy()[keep])), 0)
    assert with_bad.counts.sum() == 40 and frob(with_bad.moment1, without.moment1) < 1e-9
    moved = np.flatnonzero(with_bad.counts != without.counts)
    assert len(moved) == 1 and moved[0] < cells and with_bad.counts[moved[0]] - without.counts[moved[0]] == 1
    report = check_data("fashion-mnist", "train", str(tmp_path / "bad"), labelled=True)
    assert report["unknown_labels"] == ["record 17"] and sum(report["class_counts"].values()) == 39
    assert any("1 record(s) with a label outside the 10 classes" in p for p in report["problems"])
    assert check_data("fashion-mnist", "train", str(tmp_path / "bad"))["problems"] == []  # unlabelled: no label
