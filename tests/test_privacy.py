"""Nothing leaves the machine unless the user asks (docs/data.md, "Nothing leaves your machine").

train (its weights present), export (every format, int8 too), predict, check and serve run as a user runs them,
each in its own process, with a sitecustomize.py on PYTHONPATH that records and refuses every attempt to reach an
address outside the loopback range through Python's sockets (name look-ups, connects, datagrams). Native code
resolves names without Python: the one native sender found (onnxruntime's events) first writes a device id into the
home folder, so the home folder is checked for the ids telemetry keeps. A user's explicit yes is kept, and is seen."""

import hashlib
import os
import selectors
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from finetune._util import privacy

HOOK = textwrap.dedent('''
    """Written by tests/test_privacy.py: attempts to reach a non-loopback address are logged and refused."""
    import ipaddress
    import os
    import socket

    LOG = os.environ.get("FINETUNE_NET_LOG")


    def local(host):
        if host is None:
            return True
        host = host.decode() if isinstance(host, bytes) else str(host)
        if host in ("", "localhost") or host.endswith(".localhost"):
            return True
        try:
            ip = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return False  # any other name: resolving it asks a name server
        return ip.is_loopback or ip.is_unspecified  # 0.0.0.0 and :: are this machine too


    def refuse(what, host, port, error):
        with open(LOG, "a", encoding="utf-8") as f:
            f.write(f"{what} {host} {port}\\n")
        raise error(f"refused by tests/test_privacy.py: {host}")


    def checked(original, what, address_at):
        def call(self, *args):
            address = args[address_at]
            if self.family in (socket.AF_INET, socket.AF_INET6) and not local(address[0]):
                refuse(what, address[0], address[1], PermissionError)
            return original(self, *args)
        return call


    if LOG:
        resolve = socket.getaddrinfo

        def getaddrinfo(host, port, *args, **kwargs):  # create_connection, urllib, requests, asyncio all come here
            if not local(host):
                refuse("getaddrinfo", host, port, socket.gaierror)
            return resolve(host, port, *args, **kwargs)

        socket.getaddrinfo = getaddrinfo
        socket.socket.connect = checked(socket.socket.connect, "connect", 0)
        socket.socket.connect_ex = checked(socket.socket.connect_ex, "connect", 0)
        socket.socket.sendto = checked(socket.socket.sendto, "sendto", -1)
''')
# Markers with which a library decides it runs in CI or a test and stays silent by itself (mlflow reads
# PYTEST_CURRENT_TEST, which pytest sets for these processes; openvino_telemetry CI, TF_BUILD, JENKINS_URL; NNCF
# NNCF_CI; onnxruntime the CI services' own): removed, so that each library behaves as on a user's machine.
CI_MARKERS = {"PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "JENKINS_URL", "TRAVIS",
              "TF_BUILD", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "CODEBUILD_BUILD_ID", "BUILDKITE",
              "TEAMCITY_VERSION", "APPVEYOR", "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME",
              "RUNBOT_WORKER_ID", "NNCF_CI", "NNCF_DEV", "ORT_RUNNING_UNIT_TESTS"}
# The runner's own choices, removed so that finetune's defaults are what is measured (the torch-free predict path
# included: FINETUNE_LITE unset, as a user has it).
OWN_CHOICES = {"DO_NOT_TRACK", "DISABLE_TELEMETRY", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME",
               "MLFLOW_TRACKING_URI", "FINETUNE_LITE", *privacy.OFF_SWITCHES}
# What telemetry leaves in a home folder: OpenVINO's client id and usage count, onnxruntime's device id and queue.
TELEMETRY_IDS = ("intel", ".cache/Microsoft")
HUB_FILE = "resnet18-f37072fd.pth"  # torchvision's file of resnet18's DEFAULT weights, as the torch hub caches it
# `finetune train` with one change: our locally made weights file is pinned as the real one is (test_models.py's
# _pin), so that DEFAULT finds its weights present, as after a first download.
TRAIN = ("import sys; from finetune.models import weights; name, pin = sys.argv.pop(1), sys.argv.pop(1); "
         "weights.PINNED_SHA256[name] = pin; from finetune.cli import app; app(prog_name='finetune')")
WORKERS = max(1, min(4, (os.cpu_count() or 1) // 2))  # commands at once: each takes about a core and 1-2 GB
EXPORTS = {"model.pt": (), "model.safetensors": (), "model.pt2": (), "model.onnx": (), "model.xml": (),
           "int8.onnx": ("--int8", "--force"), "int8.xml": ("--int8", "--force")}  # --force: a tiny model's accuracy


class User:
    """A user's machine in a temp folder: their home, torch's cache with the weights present, a working folder."""

    def __init__(self, root: Path, data: Path):
        self.root, self.data, self.home, self.work = root, data, root / "home", root / "work"
        for folder in (self.home, self.work, root / "hook", root / "logs"):
            folder.mkdir()
        (root / "hook" / "sitecustomize.py").write_text(HOOK, encoding="utf-8")

    def env(self, name: str, home: Path | None = None, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in CI_MARKERS | OWN_CHOICES}
        env.update(HOME=str(home or self.home), TORCH_HOME=str(self.root / "torch"),
                   FINETUNE_CACHE=str(self.root / "cache"), FINETUNE_NET_LOG=str(self.log(name)),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(self.root / "hook"), os.environ.get("PYTHONPATH")])),
                   **extra)
        return env

    def log(self, name: str) -> Path:
        return self.root / "logs" / name.replace("/", "_").replace(" ", "_")

    def attempts(self, name: str) -> dict[str, int]:
        """How often the command tried each address (name look-ups, connects, datagrams together)."""
        log = self.log(name)
        return dict(Counter(line.split()[1] for line in log.read_text(encoding="utf-8").splitlines())) \
            if log.exists() else {}

    def run(self, name: str, argv: list[str], home: Path | None = None, **extra: str) -> None:
        """Run one command as a user does, in the working folder; it must succeed."""
        p = subprocess.run(argv, cwd=self.work, env=self.env(name, home, **extra), capture_output=True, text=True,
                           timeout=900)
        assert p.returncode == 0, f"{name}: exit {p.returncode}\n{p.stderr[-3000:]}"


def finetune(*args) -> list[str]:
    return [sys.executable, "-m", "finetune", *map(str, args)]


def run_all(user: User, commands: dict[str, list[str]], **kw) -> None:
    with ThreadPoolExecutor(WORKERS) as pool:
        for future in [pool.submit(user.run, name, argv, **kw) for name, argv in commands.items()]:
            future.result()


@pytest.fixture(scope="module")
def user(tmp_path_factory, tiny_data) -> User:
    """Trained with DEFAULT weights present in the torch hub cache, then exported to every format."""
    import torch
    import torchvision

    u = User(tmp_path_factory.mktemp("privacy"), tiny_data)
    hub = u.root / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), hub / HUB_FILE)
    pin = hashlib.sha256((hub / HUB_FILE).read_bytes()).hexdigest()
    u.run("train", [sys.executable, "-c", TRAIN, HUB_FILE, pin, "train", tiny_data, "--weights", "DEFAULT",
                    "--epochs", "1", "-b", "8", "-j", "1", "--log", "mlflow", "-o", "run", "-q"])
    run_all(u, {f"export {out}": finetune("export", out, "-m", "run/best.pt", "-q", *extra)
                for out, extra in EXPORTS.items()})
    return u


def _serve(user: User, model: str, image: Path) -> None:
    """`finetune serve` on a free port: the page, the API's documentation and a prediction, then SIGTERM."""
    httpx = pytest.importorskip("httpx")
    proc = subprocess.Popen(finetune("serve", "-m", model, "--port", "0", "-q"), cwd=user.work, text=True,
                            env=user.env("serve"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        url = proc.stdout.readline().strip() if selector.select(timeout=600) else ""
        assert url.startswith("http://127.0.0.1:"), f"serve did not start: {url}"
        with httpx.Client(base_url=url, timeout=300, trust_env=False) as client:
            assert [client.get(path).status_code for path in ("/", "/docs", "/health", "/model")] == [200] * 4
            r = client.post("/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")})
            assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_no_command_reaches_beyond_loopback_nor_leaves_a_telemetry_id(user):
    val = user.data / "val"
    run_all(user, {
        "predict best.pt": finetune("predict", val, "-m", "run/best.pt", "--json"),
        "predict model.xml": finetune("predict", val, "-m", "model.xml", "--json"),
        "predict model.onnx": finetune("predict", val, "-m", "model.onnx", "--json"),
        "predict model.onnx --runtime onnx": finetune("predict", val, "-m", "model.onnx", "--runtime", "onnx"),
        "check": finetune("check", user.data),
    })
    _serve(user, "model.xml", sorted((val / "bees").iterdir())[0])
    commands = ["train", *(f"export {out}" for out in EXPORTS), "predict best.pt", "predict model.xml",
                "predict model.onnx", "predict model.onnx --runtime onnx", "check", "serve"]
    reached = {name: user.attempts(name) for name in commands if user.attempts(name)}
    ids_left = [p for p in TELEMETRY_IDS if (user.home / p).exists()]
    assert (reached, ids_left) == ({}, [])


@pytest.mark.slow
def test_an_explicit_yes_is_kept_and_the_test_sees_what_it_sends(user, tmp_path):
    """OpenVINO's consent file saying 1 (what `opt_in_out --opt_in` writes) and ORT_DISABLE_TELEMETRY=0 are a
    user's choice: their telemetry runs, and the checks above would have caught it."""
    home = tmp_path / "home"
    (home / "intel").mkdir(parents=True)
    (home / "intel" / "openvino_telemetry").write_text("1", encoding="utf-8")
    run_all(user, {"yes: predict model.xml": finetune("predict", user.data / "val", "-m", "model.xml"),
                   "yes: predict model.onnx": finetune("predict", user.data / "val", "-m", "model.onnx", "--runtime",
                                                       "onnx")}, home=home, ORT_DISABLE_TELEMETRY="0")
    assert user.attempts("yes: predict model.xml").get("www.google-analytics.com", 0) >= 1
    assert (home / ".cache" / "Microsoft" / "DeveloperTools" / ".onnxruntime" / "deviceid").is_file()


def test_switches_are_set_only_where_the_user_has_not_chosen(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in privacy.OFF_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")  # an explicit yes
    monkeypatch.delitem(sys.modules, "openvino_telemetry", raising=False)
    privacy.keep_telemetry_off()
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "1" and os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"
    assert "openvino_telemetry" in sys.modules and sys.modules["openvino_telemetry"] is None  # import now fails

    monkeypatch.delitem(sys.modules, "openvino_telemetry")
    Path(privacy.openvino_consent_file()).parent.mkdir()
    Path(privacy.openvino_consent_file()).write_text("1\n", encoding="utf-8")  # `opt_in_out --opt_in`
    privacy.keep_telemetry_off()
    assert "openvino_telemetry" not in sys.modules
