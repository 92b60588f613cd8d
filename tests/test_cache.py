import json
import os

from asectl.cache import Cache, make_key


def test_put_get_roundtrip_and_metadata(cache):
    key = make_key("demo", input="abc", params={"x": 1})
    cache.put_json("demo", key, {"value": 42}, {"params": {"x": 1}, "seed": 3})
    entry = cache.get("demo", key)
    assert entry.read_json() == {"value": 42}
    assert entry.meta["seed"] == 3 and entry.meta["params"] == {"x": 1}
    assert entry.meta["files"]["record.json"]["size"] == len(json.dumps({"value": 42}))
    assert cache.stats["hit"] == 1 and cache.stats["put"] == 1


def test_keys_change_with_parameters():
    assert make_key("ocr", input="a", engine="cnocr") != make_key("ocr", input="a", engine="rapidocr")
    assert make_key("ocr", input="a", engine="cnocr") == make_key("ocr", engine="cnocr", input="a")
    assert make_key("ocr", input="a") != make_key("describe", input="a")


def test_corrupt_entry_is_detected_and_discarded(cache, caplog):
    key = make_key("demo", input="x")
    entry = cache.put_json("demo", key, {"value": [1, 2, 3]})
    (entry.path / "record.json").write_text('{"value": [1, 2, 4]}')  # same size, other bytes
    assert cache.get("demo", key) is None
    assert cache.stats["rebuilt"] == 1
    assert not entry.path.exists()
    assert "corrupt" in caplog.text


def test_truncated_and_missing_files_are_misses(cache):
    for damage in ("truncate", "delete_meta", "delete_payload", "garbage_meta"):
        key = make_key("demo", damage=damage)
        entry = cache.put_json("demo", key, {"value": "x" * 100})
        if damage == "truncate":
            with open(entry.path / "record.json", "r+b") as f:
                f.truncate(10)
        elif damage == "delete_meta":
            os.remove(entry.path / "meta.json")
        elif damage == "delete_payload":
            os.remove(entry.path / "record.json")
        else:
            (entry.path / "meta.json").write_text("{not json")
        assert cache.get("demo", key) is None, damage
        # A rebuilt entry is served again afterwards.
        cache.put_json("demo", key, {"value": "y"})
        assert cache.get_json("demo", key) == {"value": "y"}


def test_concurrent_put_of_same_key_keeps_one_valid_entry(cache):
    key = make_key("demo", input="same")
    cache.put_json("demo", key, {"v": 1})
    cache.put_json("demo", key, {"v": 1})  # second writer loses the rename race gracefully
    assert cache.get_json("demo", key) == {"v": 1}
    assert not any(cache.tmp_dir.iterdir())


def test_put_tree_failure_leaves_nothing(cache):
    key = make_key("bundle", x=1)

    def build(d):
        (d / "weights.bin").write_bytes(b"123")
        raise RuntimeError("killed half way")

    try:
        cache.put_tree("bundle", key, build)
    except RuntimeError:
        pass
    assert cache.get("bundle", key) is None
    assert not cache.entry_dir("bundle", key).exists()


def test_info_and_clear(cache):
    for i in range(3):
        cache.put_json("a", make_key("a", i=i), {"i": i})
    cache.put_json("b", make_key("b"), {})
    info = cache.info()
    assert info["stages"]["a"]["entries"] == 3 and info["stages"]["b"]["entries"] == 1
    assert cache.clear("a") == 3
    assert "a" not in cache.info()["stages"] or cache.info()["stages"]["a"]["entries"] == 0
    assert cache.clear() == 1


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ASECTL_CACHE_DIR", str(tmp_path / "here"))
    assert Cache().root == tmp_path / "here"


def test_file_memos_skip_a_file_changed_in_the_last_seconds(tmp_path, monkeypatch):
    """A memo about a file is kept per file state, and not at all while the file is seconds old: with
    coarse timestamps it could change again without its state moving."""
    from types import SimpleNamespace

    from asectl.cache import file_state, read_memo, write_memo

    monkeypatch.setenv("ASECTL_CACHE_DIR", str(tmp_path / "memos"))
    f = tmp_path / "model.bin"
    f.write_bytes(b"weights")
    key, st = file_state(f)
    write_memo("facts", key, {"n": 1}, st)
    assert read_memo("facts", key) is None  # too new
    ten_s = 10 * 10**9
    old = SimpleNamespace(st_mtime_ns=st.st_mtime_ns - ten_s, st_ctime_ns=st.st_ctime_ns - ten_s)
    write_memo("facts", key, {"n": 1}, old)  # the same file, as if it had not changed for ten seconds
    assert read_memo("facts", key) == {"n": 1}
    f.write_bytes(b"other weights")
    assert file_state(f)[0] != key and read_memo("facts", file_state(f)[0]) is None


def test_a_kept_checksum_is_the_files_and_a_change_is_hashed_again(tmp_path, monkeypatch):
    """``sha256_file_kept`` (what a bundle's and an export's checks use): a new process reads the kept
    checksum, and a file rewritten in place, even to the same size and mtime, is hashed again."""
    from asectl import cache as cache_module
    from asectl.cache import file_state, forget_file_hashes, read_memo, sha256_bytes, sha256_file_kept

    monkeypatch.setenv("ASECTL_CACHE_DIR", str(tmp_path / "memos"))
    monkeypatch.setattr(cache_module, "_RACY_NS", 0)  # the file is seconds old: keep its checksum all the same
    f = tmp_path / "graph.onnx"
    f.write_bytes(b"graph one")
    assert sha256_file_kept(f) == sha256_bytes(b"graph one")
    assert read_memo("sha256", file_state(f)[0]) == sha256_bytes(b"graph one")
    st = f.stat()
    f.write_bytes(b"graph two")  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime: the ctime and contents moved
    forget_file_hashes()  # as in a new process
    assert sha256_file_kept(f) == sha256_bytes(b"graph two")


def test_a_folders_card_checksums_are_kept_as_one_list_and_a_changed_card_is_hashed_again(tmp_path, monkeypatch):
    """``remember_file_hashes`` (what every per-image stage calls on its cards): a new process takes the
    cards' checksums from one kept list without reading a card, and a card rewritten in place, even to the
    same size and mtime, is hashed again, as are the others, with the list."""
    from asectl import cache as cache_module
    from asectl.cache import forget_file_hashes, remember_file_hashes, sha256_bytes, sha256_file, sha256_files

    monkeypatch.setenv("ASECTL_CACHE_DIR", str(tmp_path / "memos"))
    monkeypatch.setattr(cache_module, "_RACY_NS", 0)  # the cards are seconds old: keep the list all the same
    cards = [tmp_path / f"{i}.png" for i in range(3)]
    for i, p in enumerate(cards):
        p.write_bytes(b"card %d" % i)
    remember_file_hashes(cards)
    assert [sha256_file(p) for p in cards] == [sha256_bytes(b"card %d" % i) for i in range(3)]
    assert len(list((tmp_path / "memos" / "sha256-lists").iterdir())) == 1

    read = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: read.append(str(f)) or real_open(f, *a, **k))
    forget_file_hashes()  # as in a new process
    remember_file_hashes(cards)
    assert [sha256_file(p) for p in cards] == [sha256_bytes(b"card %d" % i) for i in range(3)]
    assert not set(read) & {str(p) for p in cards}  # taken from the kept list
    monkeypatch.setattr("builtins.open", real_open)

    st = cards[1].stat()
    cards[1].write_bytes(b"card X")  # same size
    os.utime(cards[1], ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime: the ctime and contents moved
    forget_file_hashes()
    remember_file_hashes(cards)
    assert sha256_file(cards[1]) == sha256_bytes(b"card X")
    assert sha256_files(cards) == [sha256_bytes(b) for b in (b"card 0", b"card X", b"card 2")]
    assert len(list((tmp_path / "memos" / "sha256-lists").iterdir())) == 2
    remember_file_hashes([*cards, tmp_path / "missing.png"])  # a card that cannot be read: left to sha256_file
