"""`zerotrain env`: what a bug report needs to know about this machine, like DeepSpeed's ds_report.

Versions of Python and the libraries a run imports (torch with its CUDA/NCCL builds), the
accelerator DeepSpeed picks and the devices torch sees, whether DeepSpeed can JIT-build its ops
(ninja, a C++ compiler, CUDA_HOME), and the free disk where data is cached and runs are written.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "deepspeed", "transformers", "peft", "trl", "datasets", "tokenizers", "safetensors")
ENV_VARS = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "ZEROTRAIN_CACHE", "ZEROTRAIN_DS_LOG", "TORCH_EXTENSIONS_DIR")
GIB = 1024 ** 3


def collect(output_dir: str = ".") -> dict[str, Any]:
    """The report as one flat mapping of JSON values, in the order it is printed; None where a
    thing is absent (a package not installed, no CUDA build, no compiler found)."""
    report: dict[str, Any] = {
        "zerotrain": _distribution_version("zerotrain"),
        "zerotrain_commit": _git_commit(),
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gib": _memory_gib(),
    }
    # Imports log to stdout (DeepSpeed's "Setting accelerator to CPU"); keep stdout for the report.
    with contextlib.redirect_stdout(sys.stderr):
        report.update({name: _module_version(name) for name in PACKAGES})
        report.update(_torch_builds())
        report.update(_accelerator())
    report.update(_jit_tools())
    from engine.config.sections import DataConfig

    report.update(_free_disk("data_cache", DataConfig().cache_dir))
    report.update(_free_disk("output", Path(output_dir)))
    report["env"] = {name: os.environ[name] for name in ENV_VARS if name in os.environ}
    return report


def format_report(report: dict[str, Any]) -> str:
    """Aligned `name  value` lines."""
    width = max(map(len, report))
    return "\n".join(f"{name:<{width}}  {_text(value)}" for name, value in report.items())


def _text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return "; ".join(map(str, value)) if value else "none"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) if value else "none"
    return str(value)


def _distribution_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The checkout's commit (with `+changes` when the tree differs), or None outside one."""
    root = Path(__file__).resolve().parent.parent
    head = _run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    if head is None:
        return None
    dirty = _run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
    return head + ("+changes" if dirty else "")


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)
    except (ValueError, OSError, AttributeError):  # not on this OS
        return None


def _module_version(name: str) -> str | None:
    """The imported module's own version (what a run gets, even where a stale copy shadows the
    installed one); a failed import is reported, since it is often the bug."""
    try:
        return str(importlib.import_module(name).__version__)
    except ModuleNotFoundError as e:
        if e.name != name:
            return f"import failed: {e}"
        return None
    except Exception as e:  # noqa: BLE001 - any import failure belongs in the report
        return f"import failed: {type(e).__name__}: {e}"


def _torch_builds() -> dict[str, Any]:
    import torch

    nccl = None
    if torch.version.cuda and torch.distributed.is_nccl_available():
        version = torch.cuda.nccl.version()  # a tuple on recent torch, an int on older ones
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    return {"torch_cuda": torch.version.cuda, "torch_hip": torch.version.hip, "torch_nccl": nccl,
            "torch_cudnn": torch.backends.cudnn.version() if torch.version.cuda else None}


def _accelerator() -> dict[str, Any]:
    """DeepSpeed's accelerator and backend, and every GPU torch sees (name, memory, capability)."""
    import torch

    try:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        name, backend = accelerator.device_name(), accelerator.communication_backend_name()
    except Exception as e:  # noqa: BLE001 - a broken DeepSpeed is what the report is for
        name, backend = f"unknown ({type(e).__name__}: {e})", None
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append(f"{i}: {props.name} ({props.total_memory / GIB:.1f} GiB, sm_{props.major}{props.minor})")
    return {"accelerator": name, "comm_backend": backend, "cuda_available": torch.cuda.is_available(),
            "device_count": len(devices), "devices": devices, **_deepspeed_ops()}


def _deepspeed_ops() -> dict[str, Any]:
    """Ops compiled into the DeepSpeed install, and those it could build here on first use."""
    try:
        import deepspeed.ops
        from deepspeed.git_version_info import installed_ops
    except Exception:  # noqa: BLE001 - already reported as DeepSpeed's version
        return {"ds_ops_prebuilt": None, "ds_ops_compatible": None}
    return {"ds_ops_prebuilt": sorted(op for op, built in installed_ops.items() if built),
            "ds_ops_compatible": sorted(op for op, ok in deepspeed.ops.__compatible_ops__.items() if ok)}


def _jit_tools() -> dict[str, Any]:
    """What DeepSpeed's JIT build of its ops needs: ninja, a C++ compiler and, for GPU ops, CUDA_HOME."""
    from torch.utils.cpp_extension import CUDA_HOME

    ninja = shutil.which("ninja")
    cxx = os.environ.get("CXX") or next(filter(None, map(shutil.which, ("c++", "g++", "clang++"))), None)
    nvcc = str(Path(CUDA_HOME) / "bin" / "nvcc") if CUDA_HOME else None
    return {
        "ninja": ninja and f"{_run([ninja, '--version']) or 'does not run'} ({ninja})",
        "cxx": cxx and f"{_run([cxx, '--version']) or 'does not run'} ({cxx})",
        "cuda_home": CUDA_HOME,
        "nvcc": nvcc and _run([nvcc, "--version"], last_line=True),
        "torch_extensions_dir": os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions (default)"),
    }


def _run(cmd: list[str], last_line: bool = False) -> str | None:
    """First (or last) line a tool prints, None if it cannot run."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.splitlines() or [""]
    return lines[-1] if last_line else lines[0]


def _free_disk(label: str, path: Path) -> dict[str, Any]:
    """Free space where `path` is or will be created (its nearest existing parent)."""
    existing = path.expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return {f"{label}_dir": str(path), f"{label}_free_gib": round(shutil.disk_usage(existing).free / GIB, 1)}
