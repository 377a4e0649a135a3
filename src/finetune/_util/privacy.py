"""Nothing leaves the machine unless the user asks: the telemetry of the libraries finetune drives is switched off
before any of them is imported (docs/data.md, "Nothing leaves your machine"). The standard library only, so that
`import finetune` stays fast."""

import os
import sys

# Each library's own off switch, as its source reads it. Set only where the variable is unset: a user who sets one
# (HF_HUB_DISABLE_TELEMETRY=0, MLFLOW_DISABLE_TELEMETRY=false, ORT_DISABLE_TELEMETRY=0) keeps their choice.
OFF_SWITCHES = {
    # onnxruntime (Linux, macOS): native events to mobile.events.data.microsoft.com and a device id in
    # ~/.cache/Microsoft; 1/true turn it off, 0/false leave it on.
    "ORT_DISABLE_TELEMETRY": "1",
    # mlflow >= 3 (--log mlflow): `import mlflow` starts a client that sends usage events (mlflow/telemetry/utils.py).
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # huggingface_hub (timm's weights) and hf_xet: library versions in request headers, usage events
    # (huggingface_hub/constants.py).
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def openvino_consent_file() -> str:
    """Where openvino_telemetry keeps the user's answer ("1": opted in, "0": opted out), as its opt_in_checker.py
    places it (os.path, not pathlib: pathlib's import would slow `import finetune` down)."""
    if sys.platform == "win32":
        return os.path.join(os.path.expandvars("$LOCALAPPDATA"), "Intel Corporation", "openvino_telemetry")
    return os.path.join(os.path.expanduser("~"), "intel", "openvino_telemetry")


def _opted_in_to_openvino() -> bool:
    try:
        with open(openvino_consent_file(), encoding="utf-8") as f:
            return f.readline().strip() == "1"
    except (OSError, UnicodeDecodeError):  # no file (the usual case), no home folder, not text
        return False


def keep_telemetry_off() -> None:
    """Switch off every dependency's telemetry that the user has not explicitly switched on."""
    for name, value in OFF_SWITCHES.items():
        os.environ.setdefault(name, value)
    # OpenVINO's model conversion and NNCF send to Google Analytics when the consent file is missing (they call
    # openvino_telemetry with enable_opt_in_dialog=False, which counts no file as consent) and have no variable to
    # stop it; both fall back to a silent stub when openvino_telemetry cannot be imported. `opt_in_out --opt_in`
    # writes "1", the one explicit yes, which is kept.
    if not _opted_in_to_openvino():
        sys.modules.setdefault("openvino_telemetry", None)
