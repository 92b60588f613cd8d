"""The OCR stage with the real CnOCR / RapidOCR engines on generated cards."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from asectl.backends.ocr import TextLine
from asectl.cli import cli
from asectl.domain.card import GEOMETRY, _font, default_spec, load_spec
from asectl.domain.synth import read_truth
from asectl.stages.ocr import group_rows, parse_record


@pytest.fixture(scope="module")
def ocr_run(small_dataset, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("ocr-cache")
    out = cache_dir / "ocr.jsonl"
    res = CliRunner().invoke(cli, ["--cache-dir", str(cache_dir), "ocr", str(small_dataset), "--out", str(out)])
    return res, out, cache_dir


def test_cnocr_reads_every_number(ocr_run, small_dataset):
    res, out, _ = ocr_run
    assert res.exit_code == 0, res.output
    truth = read_truth(small_dataset)
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 10
    for r in records:
        assert r["fields"] == truth[r["image"]]["printed"], r["image"]
        assert r["missing"] == [] and r["warnings"] == []
        assert all(0 <= t["score"] <= 1 for t in r["text"])


def test_rerun_is_a_cache_hit_and_parameters_recompute(ocr_run, small_dataset):
    _, _, cache_dir = ocr_run
    runner = CliRunner()
    res = runner.invoke(cli, ["--cache-dir", str(cache_dir), "ocr", str(small_dataset)])
    assert res.exit_code == 0 and "10 from cache, 0 computed" in res.output
    # A different card spec (same patterns, other name) is another key: recomputed.
    spec = default_spec().source
    other = cache_dir / "spec.toml"
    other.write_text(open(spec).read().replace('name = "asectl-default"', 'name = "copy"'))
    one = str(small_dataset / "images" / "0000.png")
    res = runner.invoke(cli, ["--cache-dir", str(cache_dir), "ocr", one, "--spec", str(other)])
    assert res.exit_code == 0 and "0 from cache, 1 computed" in res.output
    res = runner.invoke(cli, ["--cache-dir", str(cache_dir), "ocr", one, "--force"])
    assert "0 from cache, 1 computed" in res.output


def test_corrupt_cache_entry_is_rebuilt(small_dataset, tmp_path):
    runner = CliRunner()
    one = str(small_dataset / "images" / "0001.png")
    args = ["--cache-dir", str(tmp_path), "ocr", one, "--json"]
    first = runner.invoke(cli, args)
    entry = next((tmp_path / "entries" / "ocr").glob("*/*"))
    record = entry / "record.json"
    record.write_text(record.read_text().replace('"N": ', '"N": 1'))
    second = runner.invoke(cli, args)
    assert second.exit_code == 0
    assert "corrupt" in second.output and "1 corrupt entries rebuilt" in second.output
    assert (
        json.loads(first.stdout.splitlines()[0])["fields"]
        == json.loads([x for x in second.stdout.splitlines() if x.startswith("{")][0])["fields"]
    )


def test_rapidocr_engine_reads_cards(small_dataset, tmp_path):
    truth = read_truth(small_dataset)
    names = ["images/0002.png", "images/0003.png"]
    res = CliRunner().invoke(
        cli,
        [
            "--cache-dir",
            str(tmp_path),
            "ocr",
            "--engine",
            "rapidocr",
            "--json",
            *[str(small_dataset / n) for n in names],
        ],
    )
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    for r, n in zip(recs, names):
        assert r["fields"] == truth[n]["printed"]


def test_a_recogniser_cut_to_ascii_reads_the_same_records_under_keys_of_its_own(small_dataset, tmp_path):
    """``--recogniser`` (here the wheel's cut to printable ASCII, as an export reads with) gives every card the
    full recogniser's fields, with the text scores barely moved; its records have keys of their own, and the
    default engine's identity (and so every earlier key) does not change."""
    from asectl.backends.ocr import REC_MODEL, RapidOcrEngine, ascii_recogniser, bundled_model_dir, engine_identity
    from asectl.stages.ocr import OcrSettings, ocr_identity

    cut = tmp_path / "rec-ascii.onnx"
    assert ascii_recogniser(bundled_model_dir() / REC_MODEL, cut)["kept"] == 96
    runner = CliRunner()

    def read(*more):
        res = runner.invoke(
            cli,
            ["--cache-dir", str(tmp_path / "c"), "ocr", "--engine", "rapidocr", "--json", str(small_dataset), *more],
        )
        assert res.exit_code == 0, res.output
        return [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")], " ".join(res.output.split())

    (full, _), (ascii_, said) = read(), read("--recogniser", str(cut))
    assert "0 from cache, 10 computed" in said  # its own keys: the full recogniser's records are not reused
    assert [r["fields"] for r in full] == [r["fields"] for r in ascii_] and len(full) == 10
    scores = [(a["score"], b["score"]) for f, c in zip(full, ascii_) for a, b in zip(f["text"], c["text"])]
    assert max(abs(a - b) for a, b in scores) < 0.01 and all(b >= a for a, b in scores)
    assert (
        engine_identity("rapidocr")
        == RapidOcrEngine.static_identity()
        == engine_identity(OcrSettings(engine="rapidocr").engine_choice())
    )
    with_cut = ocr_identity(OcrSettings(engine="rapidocr", recogniser=str(cut)))
    assert engine_identity("rapidocr")["rec_model"]["file"] == REC_MODEL
    assert with_cut["engine"]["rec_model"]["file"] == "rec-ascii.onnx"
    assert with_cut != ocr_identity(OcrSettings(engine="rapidocr"))
    assert "recogniser" not in OcrSettings(engine="rapidocr").as_dict()  # earlier models' stored settings


@pytest.mark.parametrize(
    "engine, file, needle",
    [
        ("rapidocr", "missing.onnx", "missing.onnx: no such text recogniser"),
        ("cnocr", "present.onnx", "the cnocr engine reads with its own recogniser; pass --engine rapidocr"),
        ("rapidocr", "present.onnx", "present.onnx: not an ONNX PP-OCR text recogniser with its character list"),
    ],
)
def test_a_recogniser_that_cannot_be_used_is_one_line(small_dataset, tmp_path, engine, file, needle):
    (tmp_path / "present.onnx").write_bytes(b"onnx")
    res = CliRunner().invoke(
        cli,
        [
            "--cache-dir",
            str(tmp_path / "c"),
            "ocr",
            str(small_dataset),
            "--engine",
            engine,
            "--recogniser",
            str(tmp_path / file),
        ],
    )
    assert res.exit_code == 2 and needle in " ".join(res.output.split()), res.output
    assert len(res.output.strip().splitlines()) == 1


def test_unknown_engine_is_a_usage_error(small_dataset):
    res = CliRunner().invoke(cli, ["ocr", str(small_dataset), "--engine", "tesseract"])
    assert res.exit_code == 2 and "choose one of: cnocr, rapidocr" in res.output


def test_parse_tolerates_spacing_and_split_boxes():
    lines = [
        TextLine("N = 12", 0.9, (0, 0, 50, 20)),
        TextLine("MEANX =", 0.9, (0, 30, 60, 50)),
        TextLine("\u22120.50", 0.9, (70, 31, 120, 49)),
        TextLine("MEAN Y = 1.25", 0.9, (0, 60, 100, 80)),
        TextLine("STD X = 2.00", 0.9, (0, 90, 100, 110)),
        TextLine("STD Y = 1.00", 0.9, (0, 120, 100, 140)),
    ]
    counts = [1, 2, 3, 6, 0, 0, 0, 0, 0]
    for i, (lo, hi) in enumerate([(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 8), (8, 10), (10, 20)]):
        lines.append(TextLine(f"R{lo} TO{hi} = {counts[i]}", 0.9, (0, 150 + 30 * i, 100, 170 + 30 * i)))
    fields, missing, warnings, unparsed = parse_record(group_rows(lines), default_spec())
    assert fields == {"N": 12, "mu_x": -0.5, "mu_y": 1.25, "sd_x": 2.0, "sd_y": 1.0, "bins": counts}
    assert missing == [] and warnings == [] and unparsed == []


def test_consistency_checks_are_warnings():
    rows = ["N = 10", "MEAN X = 0.00", "MEAN Y = 0.00", "STD X = -1.00", "STD Y = 1.00"] + [
        f"R {lo} TO {hi} = 1" for lo, hi in [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 8), (8, 10), (10, 20)]
    ]
    fields, missing, warnings, _ = parse_record(rows, default_spec())
    assert missing == []
    assert any("add to 9, not N = 10" in w for w in warnings)
    assert any("negative" in w for w in warnings)


def test_custom_spec(tmp_path):
    spec_file = tmp_path / "mine.toml"
    spec_file.write_text('[card]\nname = "mine"\n[fields.count]\npattern = \'^TOTAL:(?P<value>\\d+)$\'\ntype = "int"\n')
    spec = load_spec(spec_file)
    fields, missing, _, unparsed = parse_record(["TOTAL: 42", "other text"], spec)
    assert fields == {"count": 42} and missing == [] and unparsed == ["other text"]


@pytest.mark.parametrize(
    "body,needle",
    [
        ("[fields.x]\npattern = '('\n", "invalid regular expression"),
        ("[fields.x]\npattern = 'abc'\n", "(?P<value>"),
        ("not toml ===", "not a valid TOML"),
    ],
)
def test_bad_spec_is_a_config_error(tmp_path, small_dataset, body, needle):
    f = tmp_path / "bad.toml"
    f.write_text(body)
    res = CliRunner().invoke(cli, ["ocr", str(small_dataset / "images" / "0000.png"), "--spec", str(f)])
    assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output


def test_ocr_on_augmented_cards(small_dataset, tmp_path):
    out = tmp_path / "aug"
    CliRunner().invoke(
        cli, ["synth", "--augment", str(small_dataset), "--out", str(out), "--stats", "printed", "--factor", "1.3"]
    )
    truth = read_truth(out)
    tda = sorted(n for n in truth if "tda-" in n)[:2]
    res = CliRunner().invoke(cli, ["ocr", "--json", *[str(out / n) for n in tda]])
    recs = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert [r["fields"] for r in recs] == [truth[n]["printed"] for n in tda]


def render_text_card(path, lines):
    img = Image.new("RGB", (GEOMETRY.width, GEOMETRY.height), "white")
    d = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        d.text(
            (GEOMETRY.text_x, GEOMETRY.text_top + i * GEOMETRY.line_step),
            line,
            fill="black",
            font=_font(GEOMETRY.font_size),
        )
    img.save(path)
    return path


def test_workers_give_the_same_records_and_keys(small_dataset, tmp_path, monkeypatch):
    """Several processes read exactly what one does, error records included, under the same cache keys.
    rapidocr: the same models as cnocr, but workers load it in a second (cnocr imports torch)."""
    import asectl.stages.ocr as ocr_stage
    from asectl.cache import Cache
    from asectl.domain.dataset import load_inputs

    (tmp_path / "empty.png").write_bytes(b"")
    partly = render_text_card(tmp_path / "partly.png", ["N = 12", "MEAN X = n/a"])
    good = [small_dataset / "images" / f"000{i}.png" for i in range(4)]
    # Chunks of two: one clean, one with a card that raises, one with a partly read record.
    inputs = [good[0], good[1], tmp_path / "empty.png", good[2], partly, good[3]]
    monkeypatch.setattr(ocr_stage, "CHUNK_PER_WORKER", 1)
    monkeypatch.setattr(ocr_stage, "SMALL_RUN", 1)
    runs = {}
    for workers in (1, 2):
        cache = Cache(tmp_path / f"cache{workers}")
        recs = ocr_stage.run_ocr(
            load_inputs([str(p) for p in inputs]), cache=cache, engine="rapidocr", workers=workers
        ).records
        keys = sorted(e.name for e in cache.iter_entries("ocr"))
        runs[workers] = [{**r, "seconds": "?"} if "seconds" in r else r for r in recs], keys
    assert runs[2] == runs[1]
    recs, keys = runs[1]
    assert len(recs) == 6 and len(keys) == 4
    assert "empty file" in recs[2]["error"] and "could not read" in recs[4]["error"]


@pytest.mark.parametrize("engine", ["cnocr", "rapidocr"])
def test_cut_lines_read_what_the_detector_reads(small_dataset, engine):
    """The detector-free path (clean lines cut out of the binarised card) gives the record the engine's own
    detector gives, on generated field cards, and cuts one box per printed line."""
    from asectl.imageio import load_image
    from asectl.stages.ocr import binarise, cut_lines, read_card

    truth = read_truth(small_dataset)
    for name in ("images/0000.png", "images/0007.png"):
        path = small_dataset / name
        assert len(cut_lines(binarise(load_image(path)))) == len(default_spec().lines(truth[name]["printed"]))
        cut, detected = (read_card(path, engine, default_spec(), d) for d in ("auto", "model"))
        assert cut["fields"] == detected["fields"] == truth[name]["printed"]
        assert cut["missing"] == detected["missing"] == []


def ruled_card(path):
    """A card printed on a ruled form: a thin rule just under each line of the record, which the line cutter
    keeps inside the lines' boxes and which spoils some of them for the recogniser."""
    import numpy as np

    from asectl.domain.card import record_from_points, render_card

    g = GEOMETRY
    img = render_card(
        np.random.default_rng(0).normal(0, 3, size=(300, 2)),
        record_from_points(np.random.default_rng(0).normal(0, 3, size=(300, 2))),
    )
    draw = ImageDraw.Draw(img)
    for i in range(14):
        y = g.text_top + i * g.line_step + 19
        draw.line([(g.text_x - 6, y), (710, y)], fill=(0, 0, 0), width=1)
    img.save(path)
    return path


def test_incomplete_cut_record_falls_back_to_the_detector(tmp_path):
    """`auto-checked`: when the cut lines miss a field, the engine's detector reads the card again and its
    reading is kept when it misses fewer fields; here it does, so the record is exactly the detector's.
    `auto` keeps the cut lines' reading (its cached records stay valid)."""
    from asectl.imageio import load_image
    from asectl.stages.ocr import binarise, cut_lines, read_card

    path = ruled_card(tmp_path / "ruled.png")
    assert cut_lines(binarise(load_image(path))) is not None  # the cutter accepts the card
    cut, checked, detected = (read_card(path, "rapidocr", default_spec(), d) for d in ("auto", "auto-checked", "model"))
    assert len(detected["missing"]) < len(cut["missing"])
    assert checked == detected and "error" in checked  # still a partly read card, reported as one
