"""Decoding within a memory budget: every decoder (training's decode, predict, check, serve) reserves its image's
estimate from the header before any pixel exists and waits its turn; images are reduced right after decoding with
no full-size copy; the estimate is what a decode really takes (measured in a fresh process)."""

import io
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from finetune.data import images as D
from finetune.data import memory as M

W, H = 1600, 1200  # "medium" images: 7.7 MB decoded


@pytest.fixture(autouse=True)
def _default_budget():
    yield
    M.set_decode_memory(None)


def _until(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "never reached the state the test waits for"
        time.sleep(0.005)


def _gradient(mode: str, size=(W, H)) -> Image.Image:
    """A smooth picture with structure (so that reducing and resizing can be compared) in any mode."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h) + 64], -1).astype(np.uint8)
    img = Image.fromarray(rgb)
    if mode == "RGBA":
        alpha = np.where(x < w // 3, 0, 255).astype(np.uint8)  # a transparent third: must come out white
        return Image.fromarray(np.dstack([rgb, alpha]))
    if mode == "I;16":
        return Image.fromarray((y * 65535 // h).astype(np.uint16))
    if mode == "P+transparency":
        p = img.quantize(64)
        p.info["transparency"] = 0
        return p
    return img.convert(mode)


def test_a_reservation_waits_for_room_and_gives_up_after_its_wait():
    budget = M.DecodeBudget(100)
    with budget.reserve(60):
        with pytest.raises(M.DecodeBusy, match="no room for"), budget.reserve(60, wait=0.05):
            pass
        with budget.reserve(40, wait=0):
            assert budget.in_use == 100
    assert budget.in_use == 0 and budget.peak == 100 and budget.waiting == 0


def test_first_come_first_served_and_one_larger_than_the_budget_runs_alone():
    budget, order = M.DecodeBudget(100), []
    holder = budget.reserve(30)
    holder.__enter__()

    def take(name, nbytes):
        with budget.reserve(nbytes) as n:
            order.append((name, n, budget.in_use))

    big = threading.Thread(target=take, args=("big", 10**9))
    big.start()
    _until(lambda: budget.waiting == 1)
    small = threading.Thread(target=take, args=("small", 10))  # would fit now, but comes after big
    small.start()
    _until(lambda: budget.waiting == 2)
    holder.__exit__(None, None, None)
    big.join(30)
    small.join(30)
    assert order == [("big", 100, 100), ("small", 10, 10)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_loader_worker_starts_with_an_empty_budget_of_the_same_size():
    budget = M.set_decode_memory(123 * 2**20)
    with budget.reserve(100 * 2**20):
        pid = os.fork()
        if pid == 0:
            child = M.decode_budget()
            os._exit(0 if child is not budget and child.in_use == 0 and child.limit == 123 * 2**20 else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P+transparency", "I;16", "CMYK"])
def test_a_reduced_decode_matches_a_full_decode_resized(tmp_path, mode):
    """PNG (TIFF for CMYK) box-reduced right after decoding, other modes converted strip by strip: the picture is
    the one a whole-image conversion and resize give, within 2 levels on average."""
    from torchvision.transforms.v2 import functional as F

    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    _gradient(mode).save(path)
    got = D.decode_to_tensor(str(path), 224)
    with Image.open(path) as img:
        img.load()
        whole = D._to_rgb(img)
    expected = F.pil_to_tensor(F.resize(whole, 224, antialias=True))
    assert got.shape == expected.shape == (3, 224, 298)
    assert (got.float() - expected.float()).abs().mean() < 2.0
    if mode == "RGBA":
        assert got[:, 100, :60].min() >= 250  # the transparent third, composited on white


def test_exif_orientation_turns_a_reduced_png_and_a_tiff_upright(tmp_path):
    img = Image.new("RGB", (1200, 600), (220, 20, 20))
    img.paste((20, 20, 220), (600, 0, 1200, 600))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: red on top
    img.save(tmp_path / "r.png", exif=exif)
    img.save(tmp_path / "r.tif", exif=exif)
    for name in ("r.png", "r.tif"):
        out = D.load_image(tmp_path / name, min_side=100)
        assert out.size == (100, 200), name
        assert out.getpixel((50, 20))[0] > 200 and out.getpixel((50, 180))[2] > 200, name


def test_jpeg_coefficients_are_reserved_only_where_libjpeg_buffers_the_whole_image(tmp_path):
    img = _gradient("RGB")
    for name, kwargs in (("base.jpg", {}), ("prog.jpg", {"progressive": True}), ("grey.jpg", {})):
        (img.convert("L") if name == "grey.jpg" else img).save(tmp_path / name, quality=80, **kwargs)
    sizes = {}
    for name in ("base.jpg", "prog.jpg", "grey.jpg"):
        with Image.open(tmp_path / name) as probed, Image.open(tmp_path / name) as fresh:
            sizes[name] = D._jpeg_coefficient_bytes(probed)
            assert probed.tobytes() == fresh.tobytes()  # the probe left the file where the decoder expects it
    assert sizes == {"base.jpg": 0, "prog.jpg": 2 * 3 * W * H, "grey.jpg": 0}


MEASURE = """
import io, json, sys
from PIL import Image
from finetune.data import images as D

def high_water():  # this process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))

D.decode_bytes(open(sys.argv[2], "rb").read(), 64)  # warm: plugins loaded
data = open(sys.argv[1], "rb").read()
with Image.open(io.BytesIO(data)) as img:
    estimate = D.decode_estimate(img, min(img.size) // 224)
before = high_water()
D.decode_bytes(data, 224)
print(json.dumps({"estimate": estimate, "peak": high_water() - before}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="measures resident memory from /proc")
@pytest.mark.parametrize("mode, fmt", [("RGB", "PNG"), ("RGBA", "PNG"), ("P+transparency", "PNG"), ("I;16", "PNG"),
                                       ("RGB", "WEBP")])
def test_the_estimate_is_what_a_decode_takes_with_no_full_size_copy(tmp_path, mode, fmt):
    """A 4000x3000 image decoded to 224 px in a fresh process: the rise of its peak resident memory is within
    [0.5, 1.2] x the estimate reserved for it (a full-size copy would be 2x and more: the decode path before the
    budget, with exif_transpose's copy and the alpha compositing at full size, took 2-5x)."""
    path, warm = tmp_path / f"big.{fmt.lower()}", tmp_path / "warm.png"
    _gradient(mode, (4000, 3000)).save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {"compress_level": 1}))
    _gradient("RGB", (64, 48)).save(warm)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(warm)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)
    assert 0.5 * m["estimate"] <= m["peak"] <= 1.2 * m["estimate"], m


@pytest.fixture
def one_decode_at_a_time(monkeypatch):
    """A decode budget with room for one medium PNG; counts the decodes inside it at once, and holds the first
    until three others wait for room (so that decodes outside the budget would show as overlap)."""
    with Image.open(io.BytesIO(_png_bytes())) as img:
        one = D.decode_estimate(img, 1)
    budget = M.set_decode_memory(int(1.5 * one))
    state = {"now": 0, "most": 0, "held": False}
    lock, real = threading.Lock(), D._reduced_rgb

    def watched(img, factor):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            first, state["held"] = not state["held"], True
        if first:
            _until(lambda: budget.waiting >= 3)
        try:
            return real(img, factor)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(D, "_reduced_rgb", watched)
    return state


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    _gradient("RGB").save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _medium_pngs(root, names) -> list[str]:
    data, paths = _png_bytes(), []
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths.append(str(path))
    return paths


def test_trainings_decode_holds_one_decode_at_a_time_within_the_budget(tmp_path, one_decode_at_a_time):
    paths = _medium_pngs(tmp_path, [f"{i}.png" for i in range(4)])
    cache, failed = D.decode_all(paths, 224, workers=4)
    assert failed == [] and all(cache[p].shape == (3, 224, 298) for p in paths)
    assert one_decode_at_a_time["most"] == 1


def test_predict_holds_one_decode_at_a_time_within_the_budget(tmp_path, trained_model, one_decode_at_a_time):
    from finetune.inference.predictor import load_predictor

    paths = _medium_pngs(tmp_path, [f"{i}.png" for i in range(4)])
    results = list(load_predictor([str(trained_model)], "cpu").predict(paths, workers=4))
    assert [type(r).__name__ for r in results] == ["Prediction"] * 4
    assert one_decode_at_a_time["most"] == 1


def test_check_holds_one_decode_at_a_time_within_the_budget(tmp_path, one_decode_at_a_time):
    from finetune.quality.doctor import check_dataset

    _medium_pngs(tmp_path / "data", [f"{split}/{cls}/{i}.png" for split in ("train", "val") for cls in ("a", "b")
                                     for i in range(2 if split == "train" else 1)])
    report = check_dataset(str(tmp_path / "data"), workers=4)
    assert report["usable"] == 6 and report["skipped"] == []
    assert one_decode_at_a_time["most"] == 1


def test_an_image_a_caller_holds_is_converted_within_the_budget_and_left_usable(tmp_path):
    """decode_image on PIL images the Python API's callers hold (loaded or not, JPEG or not): reduced as files are,
    and never closed under them."""
    _gradient("RGB").save(tmp_path / "x.jpg", quality=80)
    held = [_gradient("RGBA"), Image.open(tmp_path / "x.jpg")]
    held.append(Image.open(tmp_path / "x.jpg"))
    held[-1].load()  # a loaded JPEG: no file left to probe
    for img in held:
        out = D.decode_image(img, 224, D.MAX_PIXELS)
        assert out.mode == "RGB" and min(out.size) >= 224 and max(out.size) < W
        assert img.getpixel((W - 1, H - 1)) is not None  # still the caller's, still usable
