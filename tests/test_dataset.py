import pytest

from asectl.domain.dataset import load_dataset, load_inputs, stratified_split
from asectl.domain.synth import generate
from asectl.errors import DataError


def _write(root, text, images=("a.png", "b.png", "c.png")):
    root.mkdir(parents=True, exist_ok=True)
    for name in images:
        (root / name).write_bytes(b"x")
    (root / "labels.csv").write_text(text)
    return root


def test_labels_csv_roundtrip(small_dataset):
    ds = load_dataset(small_dataset)
    assert ds.source == "labels.csv" and len(ds) == 10
    assert ds.labels == ["normal", "type1", "type2", "type3", "type4"]
    assert len(ds.fingerprint()) == 64


@pytest.mark.parametrize(
    "text,needle",
    [
        ("image,label\na.png,normal\n", "missing column"),
        ("image,label,split\n../x.png,normal,train\n", "leaves the dataset folder"),
        ("image,label,split\n/etc/passwd,normal,train\n", "leaves the dataset folder"),
        ("image,label,split\na.png,normal,train\na.png,normal,train\n", "duplicate row"),
        ("image,label,split\na.png,normal,validation\n", "not train or test"),
        ("image,label,split\nzz.png,normal,train\n", "not found"),
        ("image,label,split\na.png,normal,train\nb.png,weird,test\n", "never appear in the train split"),
        ("image,label,split\na.png,,train\n", "empty label"),
        ("image,label,split\n", "no rows"),
    ],
)
def test_bad_labels_csv(tmp_path, text, needle):
    root = _write(tmp_path / "ds", text)
    with pytest.raises(DataError) as err:
        load_dataset(root)
    assert needle in str(err.value) and "labels.csv" in str(err.value)


def test_non_utf8_labels(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "labels.csv").write_bytes(b"image,label,split\n\xff\xfe.png,normal,train\n")
    with pytest.raises(DataError, match="UTF-8"):
        load_dataset(root)


def test_symlink_escaping_the_folder_is_rejected(tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"x")
    root = _write(tmp_path / "ds", "image,label,split\nlink.png,normal,train\n", images=())
    (root / "link.png").symlink_to(outside)
    with pytest.raises(DataError, match="outside"):
        load_dataset(root)


def test_image_folder_layout_split_is_stratified_and_seeded(tmp_path):
    src = tmp_path / "gen"
    generate(src, seed=0, counts="10,5,5,5,5")
    folder = tmp_path / "if"
    for line in (src / "labels.csv").read_text().splitlines()[1:]:
        image, label, _ = line.split(",")
        (folder / label).mkdir(parents=True, exist_ok=True)
        (folder / label / image.split("/")[-1]).write_bytes((src / image).read_bytes())
    a, b, c = load_dataset(folder, split_seed=1), load_dataset(folder, split_seed=1), load_dataset(folder, split_seed=2)
    assert a.source == "imagefolder"
    assert [s.split for s in a.samples] == [s.split for s in b.samples]
    assert [s.split for s in a.samples] != [s.split for s in c.samples]
    for label in a.labels:
        assert a.class_counts("test")[label] >= 1 and a.class_counts("train")[label] >= 1


def test_stratified_split_counts():
    labels = ["a"] * 225 + ["b"] * 92 + ["c"] * 44 + ["d"] * 50 + ["e"] * 44
    split = stratified_split(labels, 130, seed=0)
    assert split.count("test") == 130


def test_load_inputs_files_and_globs(small_dataset):
    files = sorted(str(p) for p in (small_dataset / "images").glob("*.png"))
    ds = load_inputs(files[:2])
    assert len(ds) == 2 and not ds.labelled
    ds = load_inputs([str(small_dataset / "images" / "*.png")])
    assert len(ds) == 10
    with pytest.raises(DataError, match="no such file"):
        load_inputs([str(small_dataset / "nothing-*.png")])
