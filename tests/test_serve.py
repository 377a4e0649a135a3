"""finetune serve, for real: a server process on 127.0.0.1 (a free port), the API spoken to with httpx, every kind
of bad input answered with a 4xx JSON error and the next request still served, a bounded load test with zero
errors, the token, a graceful SIGTERM; and the page and /docs in headless Debian chromium through Playwright."""

import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.inference.predictor import load_predictor

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
BEE = SAMPLE / "val" / "bees" / "10870992_eebeeb3a12.jpg"
ANT = sorted((SAMPLE / "val" / "ants").iterdir())[0]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]


class Server:
    """`finetune serve` in a subprocess on a free port of 127.0.0.1; .url once it listens."""

    def __init__(self, model, *args, env=None):
        self.proc = subprocess.Popen([sys.executable, "-m", "finetune", "serve", "-m", str(model), "--port", "0",
                                      *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=180):
            self.stop()
            pytest.fail("the server did not start within 180 s")
        self.url = self.proc.stdout.readline().strip().rstrip("/")
        if not self.url.startswith("http://127.0.0.1:"):
            pytest.fail(f"the server did not start: {self.proc.stderr.read()}")
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


@pytest.fixture(scope="module")
def server(trained_model):
    s = Server(trained_model, "--max-upload", "0.5", "--max-files", "3")
    yield s
    code, err = s.stop()
    assert code == 0, err
    assert "stopped by SIGTERM" in err


def _served(s: Server) -> None:
    """The server still answers a good request correctly."""
    r = s.client.post("/predict", files={"file": (BEE.name, BEE.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    assert r.json()[0]["file"] == BEE.name and len(r.json()[0]["predictions"]) == 2


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height 1-bit pixels: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.slow
def test_predict_answers_like_predict_json_for_files_and_raw_bodies(server, trained_model):
    expected = {r.path: r.top for r in load_predictor([str(trained_model)], "cpu").predict([str(BEE), str(ANT)])}
    r = server.client.post("/predict", files=[("file", (BEE.name, BEE.read_bytes(), "image/jpeg")),
                                              ("file", (ANT.name, ANT.read_bytes(), "image/jpeg"))])
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    for got, path in zip(r.json(), (BEE, ANT)):
        assert got["file"] == path.name
        assert [p["class"] for p in got["predictions"]] == [c for c, _ in expected[str(path)]]
        assert [p["probability"] for p in got["predictions"]] == pytest.approx([p for _, p in expected[str(path)]],
                                                                              abs=1e-5)
    raw = server.client.post("/predict?top_k=1", content=BEE.read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert raw.status_code == 200
    assert raw.json() == [{"file": "body", "predictions": r.json()[0]["predictions"][:1]}]


@pytest.mark.slow
def test_model_health_docs_and_page_are_served(server, trained_model):
    card = server.client.get("/model").json()
    assert card["arch"] == "resnet18" and card["classes"] == ["ants", "bees"] and card["name"] == "best.pt"
    assert card["preprocessing"]["crop_size"] == 224 and card["runtime"] == "torch" and "val_acc" in card["metrics"]
    assert card["max_files"] == 3 and card["max_upload_mb"] == 0.5
    health = server.client.get("/health").json()
    assert health["status"] == "ok"
    schema = server.client.get("/openapi.json").json()
    assert {"/predict", "/model", "/health"} <= set(schema["paths"])
    docs = server.client.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert server.client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    page = server.client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert server.client.get(asset).status_code == 200


BAD_INPUTS = {
    "non-image bytes": (422, "not an image", dict(content=b"hello, I am text", headers={"Content-Type": "image/jpeg"})),
    "empty body": (400, "empty request body", dict(content=b"", headers={"Content-Type": "image/jpeg"})),
    "truncated JPEG": (422, "truncated", dict(content=BEE.read_bytes()[:6000], headers={"Content-Type": "image/jpeg"})),
    "decompression bomb": (413, "decompression bomb", dict(content=_png_header_only(40000, 40000),
                                                          headers={"Content-Type": "image/png"})),
    "over --max-pixels (81 MP: a phone photo has 12-50)": (413, "over the server's limit of 64 megapixels", dict(
        content=_png_header_only(9000, 9000), headers={"Content-Type": "image/png"})),
    "over --max-upload": (413, "--max-upload", dict(content=os.urandom(600_000), headers={"Content-Type": "image/jpeg"})),
    "wrong content type": (415, "text/plain", dict(content=b"x", headers={"Content-Type": "text/plain"})),
    "form-encoded (curl's default)": (415, "application/x-www-form-urlencoded", dict(
        content=BEE.read_bytes(), headers={"Content-Type": "application/x-www-form-urlencoded"})),
    "too many files": (400, "too many files", dict(files=[("file", (f"{i}.jpg", BEE.read_bytes(), "image/jpeg"))
                                                         for i in range(4)])),
    "a form without files": (400, "no files", dict(
        content=b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nno image\r\n--b--\r\n',
        headers={"Content-Type": "multipart/form-data; boundary=b"})),
    "an empty file": (422, "empty file", dict(files={"file": ("empty.jpg", b"", "image/jpeg")})),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_4xx_json_error_naming_it_and_the_next_request_is_served(server, case):
    status, words, request = BAD_INPUTS[case]
    r = server.client.post("/predict", **request)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert words in r.json()["error"]
    _served(server)


@pytest.mark.slow
def test_one_bad_file_among_good_ones_is_named_the_rest_predicted(server):
    r = server.client.post("/predict", files=[("file", ("notes.jpg", b"not a photo", "image/jpeg")),
                                              ("file", (BEE.name, BEE.read_bytes(), "image/jpeg"))])
    assert r.status_code == 200
    bad, good = r.json()
    assert bad["file"] == "notes.jpg" and "not an image" in bad["error"] and "predictions" not in bad
    assert good["file"] == BEE.name and good["predictions"]


@pytest.mark.slow
def test_requests_never_name_server_files_and_bad_parameters_are_json(server):
    r = server.client.post("/predict", content=str(BEE).encode(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 422 and "not an image" in r.json()["error"]  # a path is just bytes that are no image
    assert server.client.post("/predict?top_k=0", content=BEE.read_bytes(),
                              headers={"Content-Type": "image/jpeg"}).json()["error"].startswith("top_k")
    assert server.client.get("/nothing-here").status_code == 404
    assert "error" in server.client.get("/predict").json()  # GET on a POST endpoint: 405, still JSON


@pytest.mark.slow
def test_load_of_32_concurrent_clients_has_zero_errors_and_is_batched(server):
    photo = BEE.read_bytes()

    def client(_):
        with httpx.Client(base_url=server.url, timeout=120) as c:
            return [c.post("/predict", content=photo, headers={"Content-Type": "image/jpeg"}).status_code
                    for _ in range(3)]

    before = server.client.get("/health").json()
    with ThreadPoolExecutor(32) as pool:
        codes = [c for result in pool.map(client, range(32)) for c in result]
    assert codes == [200] * 96
    after = server.client.get("/health").json()
    assert after["images_served"] - before["images_served"] == 96
    assert after["batches"] - before["batches"] < 96 and after["largest_batch"] > 1  # requests shared passes


@pytest.mark.slow
def test_token_is_required_when_set_and_health_and_page_stay_open(trained_model):
    s = Server(trained_model, env={"FINETUNE_TOKEN": "s3cret"})
    try:
        body = dict(content=BEE.read_bytes(), headers={"Content-Type": "image/jpeg"})
        r = s.client.post("/predict", **body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "token" in r.json()["error"]
        wrong = s.client.post("/predict", content=body["content"],
                              headers=body["headers"] | {"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert s.client.get("/model").status_code == 401
        ok = s.client.post("/predict", content=body["content"],
                           headers=body["headers"] | {"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert s.client.get("/health").status_code == 200 and s.client.get("/").status_code == 200
    finally:
        assert s.stop()[0] == 0


@pytest.mark.slow
def test_sigterm_finishes_requests_in_flight_then_exits_0(trained_model):
    s = Server(trained_model, "--batch-wait", "1500")  # requests wait 1.5 s in the batcher: surely in flight
    photo = BEE.read_bytes()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(httpx.post, s.url + "/predict", content=photo, headers={"Content-Type": "image/jpeg"},
                               timeout=60) for _ in range(4)]
        deadline = time.time() + 30
        while s.client.get("/health").json()["in_flight"] < 4 and time.time() < deadline:
            time.sleep(0.05)
        s.proc.send_signal(signal.SIGTERM)
        codes = [f.result().status_code for f in futures]
    _, err = s.proc.communicate(timeout=60)
    code = s.proc.returncode
    assert codes == [200] * 4
    assert code == 0 and "stopped by SIGTERM after finishing the requests in flight" in err


def test_model_load_failure_is_one_line_and_exit_4(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"<html>not a model</html>")
    r = CliRunner().invoke(app, ["serve", "-m", str(bad), "--port", "0"])
    assert r.exit_code == 4
    assert r.output.strip().count("\n") == 0 and "not a finetune model file" in r.output


def test_a_taken_port_is_exit_5_naming_it(trained_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = CliRunner().invoke(app, ["serve", "-m", str(trained_model), "--port", str(port), "-q"])
    assert r.exit_code == 5 and f"--port {port}: cannot listen" in r.output


def test_missing_serve_extra_is_named(monkeypatch, trained_model):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    r = CliRunner().invoke(app, ["serve", "-m", str(trained_model)])
    assert r.exit_code == 2 and "pip install 'finetune[serve]'" in r.output


def test_runtime_that_cannot_run_the_file_is_a_usage_error(trained_model):
    r = CliRunner().invoke(app, ["serve", "-m", str(trained_model), "--runtime", "onnx"])
    assert r.exit_code == 2 and "--runtime onnx: cannot run best.pt" in r.output


@pytest.mark.parametrize("option, value", [("--max-memory", "0"), ("--max-wait", "-1"), ("--max-pixels", "0")])
def test_bad_memory_options_are_one_line_usage_errors_before_the_model_loads(option, value, tmp_path):
    r = CliRunner().invoke(app, ["serve", "-m", str(tmp_path / "no-model.pt"), option, value])
    assert r.exit_code == 2 and option in r.output and r.output.strip().count("\n") == 0, r.output


def _browser(playwright):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium; .ci/run does)")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)


def _offline_page(browser, url, **context):
    """A page that may reach only the server: anything else is aborted and recorded."""
    page = browser.new_context(**context).new_page()
    outside = []

    def route(r):
        if r.request.url.startswith(url):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    return page, outside


@pytest.mark.slow
def test_page_in_a_real_browser_classifies_a_dropped_photo_offline_at_phone_width(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    expected = server.client.post("/predict", content=BEE.read_bytes(),
                                  headers={"Content-Type": "image/jpeg"}).json()[0]["predictions"][0]["class"]
    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        page, outside = _offline_page(browser, server.url, viewport={"width": 375, "height": 740})
        page.goto(server.url + "/")
        page.locator("#model", has_text="resnet18").wait_for()  # (the page's CSP forbids wait_for_function's eval)
        assert "2 classes" in page.inner_text("#model") and "runtime torch" in page.inner_text("#model")
        assert not page.is_visible("#token-form")  # no token set: no token asked for
        page.set_input_files("#files", [str(BEE), str(ANT)])
        page.wait_for_selector(f".card[data-file='{BEE.name}'] .top-class", timeout=60_000)
        shown = page.inner_text(f".card[data-file='{BEE.name}'] .top-class")
        bars = page.locator(f".card[data-file='{BEE.name}'] .bar").count()
        page.wait_for_selector(f".card[data-file='{ANT.name}'] .top-class", timeout=60_000)
        width = page.evaluate("document.documentElement.scrollWidth")
        browser.close()
    assert shown == expected and bars == 2
    assert width <= 375  # nothing wider than a phone's screen
    assert outside == []


@pytest.mark.slow
def test_the_page_sends_a_photo_again_after_a_503s_retry_after(server):
    """The server's first two answers to the page are 503 (Retry-After: 1, as a busy server sends them): the page
    says it is trying again, and the third try shows the photo's classes."""
    sync_api = pytest.importorskip("playwright.sync_api")
    busy = []

    def predict(route):
        if len(busy) < 2:
            busy.append(route.request.url)
            route.fulfill(status=503, headers={"Retry-After": "1"}, content_type="application/json",
                          body='{"error": "the server is busy: ...; retry after 1 s (Retry-After)"}')
        else:
            route.continue_()

    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        page, outside = _offline_page(browser, server.url)
        page.route("**/predict*", predict)
        page.goto(server.url + "/")
        page.locator("#model", has_text="resnet18").wait_for()
        page.set_input_files("#files", [str(BEE)])
        page.locator(f".card[data-file='{BEE.name}'] .state", has_text="trying again").wait_for(timeout=30_000)
        page.wait_for_selector(f".card[data-file='{BEE.name}'] .top-class", timeout=60_000)
        failed = page.locator(".card.failed").count()
        browser.close()
    assert len(busy) == 2 and failed == 0 and outside == []


@pytest.mark.slow
def test_docs_page_renders_offline_in_a_real_browser(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        page, outside = _offline_page(browser, server.url)
        page.goto(server.url + "/docs")
        page.wait_for_selector(".swagger-ui .opblock-summary-path[data-path='/predict']", timeout=60_000)
        title = page.inner_text(".swagger-ui .info .title")
        browser.close()
    assert "finetune" in title and outside == []


def test_bad_page_text_is_never_parsed_as_html():
    script = (Path(__file__).resolve().parents[1] / "src" / "finetune" / "serving" / "static" / "app.js").read_text()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "textContent" in script



def test_ensemble_with_tta_and_two_preprocessings_answers_as_predict_does(trained_model, tmp_path):
    from fastapi.testclient import TestClient

    from finetune.data.preprocessing import Preprocessing
    from finetune.models.model_file import update_model_file
    from finetune.serving.app import create_app
    from finetune.serving.model import ServedModel

    other = tmp_path / "other.pt"
    other.write_bytes(Path(trained_model).read_bytes())
    update_model_file(other, temperature=2.5, preprocessing=Preprocessing(200, 176, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                                                                           "bicubic"))
    paths = [str(trained_model), str(other)]
    predictor = load_predictor(paths, "cpu", tta=True)
    expected = {r.path: r.top for r in predictor.predict([str(BEE), str(ANT)])}
    with TestClient(create_app(ServedModel(predictor), paths)) as client:
        r = client.post("/predict", files=[("file", (p.name, p.read_bytes(), "image/jpeg")) for p in (BEE, ANT)])
        card = client.get("/model").json()
    assert r.status_code == 200
    for got, path in zip(r.json(), (BEE, ANT)):
        assert [(p["class"], p["probability"]) for p in got["predictions"]] == [
            (c, pytest.approx(p, abs=1e-5)) for c, p in expected[str(path)]]
    assert [m["file"] for m in card["members"]] == ["best.pt", "other.pt"] and card["tta"] is True


def test_a_multi_label_model_answers_with_its_labels_as_predict_json_does(trained_model, tiny_data, tmp_path):
    import shutil

    from finetune.inference.predictor import load_predictor
    from finetune.models.model_file import update_model_file
    from finetune.serving.model import ServedModel

    model = tmp_path / "multi.pt"
    shutil.copy(trained_model, model)
    update_model_file(model, multi_label=True, thresholds=[0.5, 0.3])  # the same weights read as two sigmoids
    predictor = load_predictor([model], "cpu")
    served = ServedModel(predictor)
    photos = sorted((tiny_data / "val").rglob("*.jpg"))
    answers = [served.answer(p, 2) for p in served.probabilities([served.prepare(f.read_bytes()) for f in photos])]
    for photo, answer, expected in zip(photos, answers, predictor.predict([str(f) for f in photos], 2)):
        assert [c["class"] for c in answer["labels"]] == [c for c, _ in expected.labels], photo
        assert [c["probability"] for c in answer["predictions"]] == pytest.approx([p for _, p in expected.top],
                                                                                  abs=1e-5)


# The 503 paths, the pixel limit and the decode-memory budget, in-process (fast): the app under starlette's
# TestClient, the model a real one whose steps are held at a gate where a test needs a request to stay put.

@pytest.fixture
def served(trained_model):
    """A factory of (TestClient, ServedModel) for settings; the process's decode budget and Pillow's PNG text limit
    are restored afterwards."""
    from fastapi.testclient import TestClient
    from PIL import PngImagePlugin

    from finetune.data.memory import set_decode_memory
    from finetune.serving.app import create_app
    from finetune.serving.handling import ServeSettings
    from finetune.serving.model import ServedModel

    clients, text_limit = [], PngImagePlugin.MAX_TEXT_MEMORY

    def make(**settings):
        model = ServedModel(load_predictor([str(trained_model)], "cpu"))
        client = TestClient(create_app(model, [str(trained_model)], ServeSettings(**settings)))
        clients.append(client.__enter__())
        return client, model

    yield make
    for client in clients:
        client.__exit__(None, None, None)
    set_decode_memory(None)
    PngImagePlugin.MAX_TEXT_MEMORY = text_limit


def _post_bee(client, **kw):
    return client.post("/predict", content=BEE.read_bytes(), headers={"Content-Type": "image/jpeg"}, **kw)


def _until(condition, seconds=30.0):
    """Wait for condition() (a state the test drives the server into), failing if it never comes."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the server never reached the state the test waits for"
        time.sleep(0.01)


def _busy_answer(r, words):
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/json" and int(r.headers["retry-after"]) >= 1
    assert words in r.json()["error"] and "retry after" in r.json()["error"]


def test_a_full_queue_answers_503_with_retry_after_and_the_next_request_is_served(served):
    client, model = served(max_queue=1, max_batch=1)
    gate, real = threading.Event(), model.probabilities
    model.probabilities = lambda items: gate.wait(60) and real(items)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_post_bee, client)  # computing (held at the gate)
        _until(lambda: client.get("/health").json()["in_flight"] == 1)
        second = pool.submit(_post_bee, client)  # queued: the queue is full
        _until(lambda: client.get("/health").json()["in_flight"] == 2)
        _busy_answer(_post_bee(client), "--max-queue")
        gate.set()
        assert first.result().status_code == second.result().status_code == 200
    assert _post_bee(client).status_code == 200


def test_no_room_in_the_decode_memory_within_max_wait_is_503_then_served(served):
    from finetune.data.memory import decode_budget

    client, _ = served(max_wait_s=0.2)
    budget = decode_budget()
    with budget.reserve(budget.limit):  # another decode holds all the decode memory
        _busy_answer(_post_bee(client), "decode memory")
        assert client.get("/health").json()["decode_memory_mb"]["in_use"] == round(budget.limit / 2**20)
    r = _post_bee(client)
    assert r.status_code == 200 and r.json()[0]["predictions"][0]["class"] in ("ants", "bees")


def test_a_request_that_gets_no_turn_to_be_read_within_max_wait_is_503(served):
    client, model = served(max_intake=1, max_wait_s=0.3)
    gate, real = threading.Event(), model.prepare
    model.prepare = lambda data, deadline=None: gate.wait(60) and real(data, deadline)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(_post_bee, client)  # holds the only turn, decoding at the gate
        _until(lambda: client.app.state.intake.locked())
        _busy_answer(_post_bee(client), "--max-wait")
        health = client.get("/health")  # the event loop answers while requests wait
        assert health.status_code == 200 and health.json()["requests_waiting"] == 0
        gate.set()
        assert first.result().status_code == 200
    assert _post_bee(client).status_code == 200


def test_over_the_pixel_limit_is_413_naming_the_limit_even_among_good_files(served):
    client, _ = served(max_pixels=100_000)  # the bee photo has 500x375 = 0.19 MP
    r = _post_bee(client)
    assert r.status_code == 413 and r.headers["content-type"] == "application/json"
    assert r.json()["error"] == ("500x464 is 0.232 megapixels, over the server's limit of 0.1 megapixels "
                                 "(--max-pixels); send a smaller image")
    small = _image_bytes((300, 200))
    r = client.post("/predict", files=[("file", ("big.jpg", BEE.read_bytes(), "image/jpeg")),
                                       ("file", ("small.png", small, "image/png"))])
    assert r.status_code == 200
    big, ok = r.json()
    assert "over the server's limit" in big["error"] and ok["predictions"]
    assert client.get("/model").json()["max_pixels"] == 100_000


def _image_bytes(size, fmt="PNG") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (120, 160, 40)).save(buf, fmt)
    return buf.getvalue()


def test_a_tiny_decode_budget_decodes_medium_images_one_at_a_time_and_answers_all(served, monkeypatch):
    """Four concurrent 1600x1200 PNGs (7.7 MB each decoded) with decode memory for one: the first is held inside its
    reservation until the others that have a decoding thread wait for room; at no time do two decode at once, and
    all four are answered."""
    import io

    from PIL import Image

    from finetune.data import images as D
    from finetune.data.memory import decode_budget

    photo = _image_bytes((1600, 1200))
    client, model = served(max_memory=int(1.5 * (1600 * 1200 * 4 + D._DECODER_STATE)), max_intake=4, max_wait_s=60)
    budget, threads = decode_budget(), client.app.state.decoders._max_workers  # one a core
    if threads < 2:
        pytest.skip("one decoding thread on a one-core machine: decodes never overlap, budget or not")
    now, most, held, real = [0], [0], [], D._reduced_rgb
    lock = threading.Lock()

    def watched(img, factor):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
            first = not held
            held.append(True)
        if first:
            _until(lambda: budget.waiting == min(3, threads - 1))
        try:
            return real(img, factor)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(D, "_reduced_rgb", watched)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: client.post("/predict", content=photo,
                                                      headers={"Content-Type": "image/png"}), range(4)))
    assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
    assert most[0] == 1 and budget.in_use == 0
    with Image.open(io.BytesIO(photo)) as img:  # the premise: one decode fits, two do not
        one = D.decode_estimate(img, 1200 // model.preprocessings[0].resize_size)
    assert budget.peak == one <= budget.limit < 2 * one


def test_a_png_whose_text_chunks_inflate_to_60_mb_is_refused_without_holding_them(served):
    """60 KB of zTXt chunks that Pillow would inflate to 60 MB when opening the file (outside any pixel budget):
    the server allows 1 MB of text an image, so the upload gets 422 and the next request is served."""
    import io

    from PIL import Image, PngImagePlugin

    client, _ = served()
    info = PngImagePlugin.PngInfo()
    for i in range(60):
        info.add_text(f"note{i}", "A" * 1_000_000, zip=True)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 140, 30)).save(buf, "PNG", pnginfo=info)
    assert len(buf.getvalue()) < 100_000
    r = client.post("/predict", content=buf.getvalue(), headers={"Content-Type": "image/png"})
    assert r.status_code == 422 and "text chunks" in r.json()["error"]
    assert PngImagePlugin.MAX_TEXT_MEMORY <= 2**20
    assert _post_bee(client).status_code == 200


def test_memory_options_become_the_servers_settings():
    from finetune.cli.serve import _settings
    from finetune.serving.handling import ServeSettings

    s = _settings(3, 20.0, 16, 16, 0.0, 256, None, 1000, 64.0, 2.5)
    assert (s.max_pixels, s.max_memory, s.max_wait_s) == (1000, 64 * 2**20, 2.5)
    default = _settings(3, 20.0, 16, 16, 0.0, 256, None, ServeSettings().max_pixels, None, 10.0)
    assert default.max_memory is None and default.max_pixels == 64_000_000  # None: 1/16 of the machine's memory
