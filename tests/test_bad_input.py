"""Bad input: one clear line naming the file, an error record, the run goes on, exit code 1."""

import json
import struct
import zlib

import pytest
from click.testing import CliRunner
from PIL import Image

from asectl.cli import cli
from asectl.errors import DataError
from asectl.imageio import load_image

from .test_ocr import render_text_card


def _png_header_only(path, w, h):
    """A PNG that declares w x h pixels (a decompression bomb needs no real pixel data to claim that)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def make_bad_inputs(folder, good_card):
    folder.mkdir(parents=True, exist_ok=True)
    bad = {}
    bad["text.png"] = folder / "text.png"
    bad["text.png"].write_text("this is not an image")
    bad["empty.png"] = folder / "empty.png"
    bad["empty.png"].write_bytes(b"")
    data = good_card.read_bytes()
    bad["truncated.png"] = folder / "truncated.png"
    bad["truncated.png"].write_bytes(data[: len(data) // 2])
    bad["bomb.png"] = _png_header_only(folder / "bomb.png", 30000, 30000)
    bad["blank.png"] = folder / "blank.png"
    Image.new("RGB", (720, 480), "white").save(bad["blank.png"])
    lines = ["N = 12", "MEAN X = n/a", "MEAN Y = 0.10", "STD X = 1.00", "STD Y = 1.00"]
    bad["unreadable.png"] = render_text_card(folder / "unreadable.png", lines)
    return bad


def test_each_bad_input_gets_an_error_record_and_the_run_goes_on(small_dataset, tmp_path):
    good = small_dataset / "images" / "0000.png"
    bad = make_bad_inputs(tmp_path / "in", good)
    out = tmp_path / "records.jsonl"
    res = CliRunner().invoke(cli, ["ocr", str(good), *map(str, bad.values()), "--out", str(out)])
    assert res.exit_code == 1
    assert "Traceback" not in res.output
    records = {r["image"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert "error" not in records["0000.png"] and records["0000.png"]["fields"]["N"] > 0
    expect = {
        "text.png": "not an image",
        "empty.png": "empty file",
        "truncated.png": "truncated",
        "bomb.png": "decompression bomb",
        "blank.png": "no printed record",
        "unreadable.png": "could not read mu_x",
    }
    for name, needle in expect.items():
        err = records[name]["error"]
        assert needle in err and name in err and "\n" not in err, (name, err)
    # The partly read card keeps what was read.
    assert records["unreadable.png"]["fields"]["N"] == 12


def test_strict_stops_at_the_first_bad_image(small_dataset, tmp_path):
    bad = make_bad_inputs(tmp_path / "in", small_dataset / "images" / "0000.png")
    res = CliRunner().invoke(
        cli, ["ocr", str(bad["empty.png"]), str(small_dataset / "images" / "0001.png"), "--strict"]
    )
    assert res.exit_code == 1 and "empty.png: empty file" in res.output
    assert "0001.png" not in res.output


def test_debug_shows_a_traceback(small_dataset, tmp_path):
    bad = make_bad_inputs(tmp_path / "in", small_dataset / "images" / "0000.png")
    res = CliRunner().invoke(cli, ["--debug", "ocr", str(bad["empty.png"]), "--strict"])
    assert res.exit_code != 0 and res.exception is not None


def test_missing_input_is_one_line(tmp_path):
    res = CliRunner().invoke(cli, ["ocr", str(tmp_path / "nope.png")])
    assert res.exit_code == 1 and "no such file" in res.output and "Traceback" not in res.output


def test_a_folder_without_images_says_what_it_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("not a card")
    res = CliRunner().invoke(cli, ["ocr", str(tmp_path)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    line = res.output.strip()
    assert len(line.splitlines()) == 1 and str(tmp_path) in line
    assert "no images found" in line and "png" in line and "labels.csv" in line


def test_image_modes_are_converted(tmp_path, small_dataset):
    src = Image.open(small_dataset / "images" / "0000.png").convert("RGB")
    variants = {
        "grey.png": src.convert("L"),
        "palette.png": src.convert("P"),
        "rgba.png": src.convert("RGBA"),
        "i16.png": src.convert("L").point(lambda v: v * 256, "I").convert("I;16"),
        "card.jpg": src,
    }
    for name, im in variants.items():
        im.save(tmp_path / name)
        rgb = load_image(tmp_path / name)
        assert rgb.mode == "RGB" and rgb.size == src.size, name
    res = CliRunner().invoke(cli, ["ocr", "--json", *[str(tmp_path / n) for n in variants]])
    assert res.exit_code == 0, res.output
    truth_n = json.loads((small_dataset / "truth.jsonl").read_text().splitlines()[0])["printed"]["N"]
    recs = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert all(r["fields"]["N"] == truth_n for r in recs)


def test_a_card_decoded_once_is_kept_per_file_version(tmp_path, small_dataset, monkeypatch):
    """OCR, the describer and the image encoder each load a new card: it is decoded once per process, each
    caller gets an image of its own, and a rewritten or truncated file is read afresh."""
    from asectl import imageio

    decoded = []
    real = imageio._decode
    monkeypatch.setattr(imageio, "_decode", lambda p: decoded.append(p) or real(p))
    card = tmp_path / "card.png"
    card.write_bytes((small_dataset / "images" / "0000.png").read_bytes())
    first = load_image(card)
    first.paste((0, 0, 0), (0, 0, 50, 50))  # a caller that draws on its image changes no one else's
    second = load_image(card)
    assert decoded == [card] and second is not first and second.getpixel((10, 10)) != (0, 0, 0)
    assert second.tobytes() == Image.open(small_dataset / "images" / "0000.png").convert("RGB").tobytes()
    card.write_bytes((small_dataset / "images" / "0001.png").read_bytes())  # the same name, another card
    third = load_image(card)
    assert len(decoded) == 2 and third.tobytes() != second.tobytes()
    data = card.read_bytes()
    card.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated"):
        load_image(card)


def test_nan_and_inf_in_records_are_not_used_as_numbers(small_dataset, tmp_path):
    """A record with NaN/inf (e.g. from a user's own export) is reported, never computed with."""
    import math

    import pytest

    from asectl.domain.card import default_spec
    from asectl.domain.dataset import load_dataset
    from asectl.domain.synth import augment, read_truth
    from asectl.errors import DataError
    from asectl.stages.ocr import consistency_warnings
    from asectl.stages.reason import record_sentence

    fields = {"N": 10, "mu_x": math.nan, "mu_y": math.inf, "sd_x": 1.0, "sd_y": -1.0, "bins": [10] + [0] * 8}
    warnings = consistency_warnings(fields)
    assert any("mu_x" in w and "not finite" in w for w in warnings)
    assert any("mu_y" in w and "not finite" in w for w in warnings)
    text = record_sentence(fields, list(default_spec().bin_edges))
    assert "nan" not in text.lower() and "inf" not in text.lower() and "not read" in text

    ds = load_dataset(small_dataset)
    truth = read_truth(small_dataset)
    records = [dict(truth[s.name]["printed"]) for s in ds.samples]
    bad = next(i for i, s in enumerate(ds.samples) if s.split == "train")
    records[bad]["sd_x"] = math.nan
    with pytest.raises(DataError, match="record lacks sd_x"):
        augment(ds, records, tmp_path / "aug", stats_source="printed")
    assert not (tmp_path / "aug").exists()
