"""The cache folder stays within its bound: the least recently used files go first, never the one just written,
never another process's temp file; a run with a full cache still works."""

import os

import pytest

from finetune._util.files import CACHE_LIMIT_ENV, TEMP_PREFIX, cache_dir, cache_limit, mark_used, trim_cache
from finetune.errors import UsageError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _file(path, kb: int, age_s: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * kb * 1000)
    t = 1_700_000_000 - age_s
    os.utime(path, (t, t))
    return path


def test_least_recently_used_go_first_until_it_fits(cache, monkeypatch):
    monkeypatch.setenv(CACHE_LIMIT_ENV, "0.000003")  # 3 KB
    assert cache_limit() == 3000
    just_written = _file(cache / "a.safetensors", 1, age_s=400)  # oldest, but the file trim_cache is called for
    b = _file(cache / "photo-features" / "b.safetensors", 1, age_s=300)
    c = _file(cache / "onnx" / "c.onnx", 1, age_s=200)
    d = _file(cache / "index" / "d.json", 1, age_s=100)
    temp = _file(cache / f"{TEMP_PREFIX}e.safetensors", 1, age_s=500)  # another process is writing it
    mark_used(b)  # read just now: the most recently used
    trim_cache(just_written)
    left = {p for p in (just_written, b, c, d, temp) if p.exists()}
    assert left == {just_written, b, temp}  # c and d, the least recently used, went: 3 KB left
    monkeypatch.setenv(CACHE_LIMIT_ENV, "1")
    trim_cache(just_written)
    assert b.exists()  # within the bound nothing is removed


@pytest.mark.parametrize("value", ["ten", "-1", "nan"])
def test_a_bad_limit_is_refused_naming_the_variable(cache, monkeypatch, value):
    monkeypatch.setenv(CACHE_LIMIT_ENV, value)
    with pytest.raises(UsageError, match=f"^{CACHE_LIMIT_ENV}={value}: not a size in gigabytes"):
        cache_limit()


def test_runs_keep_the_cache_within_the_bound(cache, monkeypatch, tiny_data, flat_data, local_weights):
    """Probe runs write training's features and the per-photo features; with no room, each write keeps only
    itself, and the next run recomputes what it needs and still trains."""
    from finetune.config import TrainConfig
    from finetune.training import run_training

    def probe(data, out):
        return run_training(TrainConfig(data=str(data), weights=str(local_weights), workers=0,
                                        output=str(cache.parent / out)))

    probe(tiny_data, "r1")
    first = sorted(p for p in cache.rglob("*") if p.is_file())
    assert len(first) >= 2  # the run's features and its photos' features
    monkeypatch.setenv(CACHE_LIMIT_ENV, "0")
    result = probe(flat_data, "r2")
    assert result.model_path.is_file()
    left = [p for p in cache_dir().rglob("*") if p.is_file()]
    assert len(left) == 1  # only the last file written: the per-photo features, rewritten with flat_data's photos
    assert not any(p.exists() for p in first if p.parent == cache)  # the first run's training features went
