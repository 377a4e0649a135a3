"""The content index: duplicates found through quick then full fingerprints, kept between runs."""

import os

from finetune.data import content_index as I
from finetune.data import dataset as D


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def test_groups_identical_files_only(tmp_path):
    body = os.urandom(20_000)
    a = _write(tmp_path / "a" / "1.jpg", body)
    b = _write(tmp_path / "b" / "2.jpg", body)
    # Same size, same first and last 4 KiB, one byte different in the middle: only the full hash tells them apart.
    c = _write(tmp_path / "a" / "3.jpg", body[:10_000] + bytes([body[10_000] ^ 1]) + body[10_001:])
    d = _write(tmp_path / "a" / "4.jpg", os.urandom(20_000))
    groups = I.content_groups([a, b, c, d], tmp_path)
    assert groups == {a: a, b: a, c: c}


def test_index_is_reused_and_refreshed_for_changed_files(tmp_path, monkeypatch):
    body = os.urandom(9_000)
    paths = [_write(tmp_path / "x" / f"{i}.jpg", body) for i in range(3)]
    assert I.content_groups(paths, tmp_path) == dict.fromkeys(paths, paths[0])
    assert I.index_path(tmp_path).is_file()

    calls = []
    real_quick, real_full = I.quick_fingerprint, I.full_hash
    monkeypatch.setattr(I, "quick_fingerprint", lambda p, n: calls.append(p) or real_quick(p, n))
    monkeypatch.setattr(I, "full_hash", lambda p: calls.append(p) or real_full(p))
    assert I.content_groups(paths, tmp_path) == dict.fromkeys(paths, paths[0])
    assert calls == []  # nothing re-read

    _write(tmp_path / "x" / "2.jpg", os.urandom(9_000))  # same size, new content and time
    os.utime(paths[2], ns=(1, 1))
    assert I.content_groups(paths, tmp_path) == dict.fromkeys(paths[:2], paths[0])
    assert set(calls) == {paths[2]}  # only the changed file was fingerprinted again


def test_damaged_index_is_ignored(tmp_path):
    body = os.urandom(5_000)
    paths = [_write(tmp_path / "x" / f"{i}.jpg", body) for i in range(2)]
    I.index_path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
    I.index_path(tmp_path).write_text("{not json")
    assert I.content_groups(paths, tmp_path) == dict.fromkeys(paths, paths[0])


def test_split_keeps_duplicates_together_through_the_index(flat_data, tmp_path):
    import shutil

    root = tmp_path / "photos"
    shutil.copytree(flat_data, root)
    ants = sorted((root / "ants").iterdir())
    for i in range(3):  # three copies of one ant photo under other names
        shutil.copy(ants[0], root / "ants" / f"copy{i}.jpg")
    copies = {str(ants[0])} | {str(root / "ants" / f"copy{i}.jpg") for i in range(3)}
    for _ in range(2):  # the second run reads the groups from the index
        split = D.find_dataset(root, val_fraction=1 / 3, seed=3)
        groups = D.content_groups(root, split.train + split.val)
        assert set(groups) == copies and len(set(groups.values())) == 1
        in_train = {s.path for s in split.train} & copies
        assert in_train in (set(), copies)


def test_images_under_lists_in_walk_order_and_follows_links_once(tmp_path):
    for rel in ("b/2.jpg", "b/1.jpg", "a/c/3.png", "a/0.JPG", ".hidden/9.jpg", "a/notes.txt"):
        _write(tmp_path / rel, b"x")
    os.symlink(tmp_path / "a", tmp_path / "b" / "link")  # a second way into a/
    os.symlink(tmp_path / "b" / "1.jpg", tmp_path / "b" / "alias.jpg")
    skipped = []
    found = [os.path.relpath(p, tmp_path) for p in D.images_under(tmp_path, skipped)]
    assert found == ["a/0.JPG", "a/c/3.png", "b/1.jpg", "b/2.jpg"]
    reasons = {os.path.relpath(p, tmp_path): r for p, r in skipped}
    assert set(reasons) == {"a/notes.txt", "b/alias.jpg"}
    assert "same file as 1.jpg" in reasons["b/alias.jpg"]
