"""What every benchmark records about the machine it ran on (imported by the scripts beside it)."""

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (where there is none, what the platform module reports)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor())


def provenance(command: list[str] | None = None) -> dict:
    """What a results file records about the code and machine measured: commit (dirty when src/ has uncommitted
    changes), CPU, torch build, and the command (defaults to this process's own, from the repository root)."""
    import shlex
    import subprocess
    import sys

    import torch

    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False).stdout.strip()

    argv = command if command is not None else [Path(sys.executable).name, *sys.argv]
    return {"commit": git("rev-parse", "HEAD") or "unknown",
            "dirty": bool(git("status", "--porcelain", "--", "src")),
            "cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_cuda_build": torch.version.cuda is not None,
            "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "command": shlex.join(argv).replace(str(root) + "/", "")
                                       .replace(str(root.parent / "shared") + "/", "../shared/")}


def begun(command: list[str] | None = None) -> dict:
    """`provenance()` and the 1-minute load average as a measurement starts (the code it measures, what shares the
    cores); `finished` adds the load at its end. Together: the fields benchmarks/README.md asks of every figure's file."""
    return provenance(command) | {"load_before": round(os.getloadavg()[0], 2)}


def finished(start: dict) -> dict:
    """`begun`'s record with the load average at the end."""
    return start | {"load_after": round(os.getloadavg()[0], 2)}
