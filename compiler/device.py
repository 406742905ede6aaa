"""One device and dtype policy for every command that computes.

Made once per command from ``--device`` (else ``$EDITC_DEVICE``, else CUDA when torch sees a
GPU, else the CPU) and passed whole, as nanoGPT passes its one config and as diffusers lets a
device follow the modules. What each stage computes in:

- **embedding** prompts for a solve: float32, TF32 off (``torch.backends.cuda.matmul``), on
  the device; a text encoder is the only model component a compile moves there;
- **Grams and solves**: float64 on the device (the GPU too: an H200 does float64 at ~60
  TFLOP/s, and the edit is a few d × d products and one Cholesky factorisation);
- **image generation** (LocoGen, tracing, verify, generate, the baselines): on a GPU, the
  checkpoint's half precision as stored (float16 or bfloat16; a float32 checkpoint stays
  float32), with PyTorch's SDPA attention kernels; on the CPU float32, bit for bit as before.

CPU results are unchanged by this module: on the CPU every stage computes exactly what it
computed before there was a policy. cuBLAS is asked for its deterministic workspace, so one GPU
gives the same edited tensors run after run. Caches whose content depends on where it was
computed name :func:`compute_tag` in their keys, so a cache filled on one machine never changes
what another writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from compiler.errors import UserError

ENV_DEVICE = "EDITC_DEVICE"
HALF_DTYPES = (torch.float16, torch.bfloat16)

# cuBLAS picks reduction strategies per call unless given a fixed workspace; this must be set
# before CUDA initialises (https://docs.nvidia.com/cuda/cublas/#results-reproducibility).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@dataclass(frozen=True)
class DevicePolicy:
    """Where and in what precision each stage computes (see the module docstring)."""

    device: torch.device
    embed_dtype: torch.dtype = torch.float32
    solve_dtype: torch.dtype = torch.float64

    def generation_dtype(self, stored_dtype: torch.dtype | None) -> torch.dtype:
        """What images are generated in: the stored half precision on a GPU, else float32."""
        if self.device.type != "cpu" and stored_dtype in HALF_DTYPES:
            return stored_dtype
        return torch.float32

    def generation_batch(self, default: int) -> int:
        """Samples per pipeline call: ``default`` on the CPU; on a GPU, about one per free GiB
        (SD-1.5 at 512 px in half precision with SDPA and CFG needs well under 1 GiB a sample,
        the VAE decode included), at least ``default`` and at most 256."""
        if self.device.type != "cuda":
            return default
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(min(256, max(default, free // 2**30)))

    def initialize_async(self) -> None:
        """Start the device's context in a background thread (CUDA's takes ~0.5-1 s): work
        queued on the device later waits for it (torch guards its lazy init with a lock)."""
        if self.device.type != "cuda" or torch.cuda.is_initialized():
            return
        import threading

        threading.Thread(target=torch.cuda.init, name="editc-cuda-init", daemon=True).start()

    def describe(self, stored_dtype: torch.dtype | None = None) -> dict:
        """For manifests and reports: device, GPU name and the dtype of each stage."""
        return {
            "device": str(self.device),
            "gpu": gpu_name(self.device),
            "embed_dtype": _name(self.embed_dtype),
            "solve_dtype": _name(self.solve_dtype),
            "generation_dtype": _name(self.generation_dtype(stored_dtype)),
            "torch": torch.__version__,
        }


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def gpu_name(device: torch.device | str) -> str | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_name(device)


def compute_tag(device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """What names the arithmetic a cached result came from: ``cpu``, or ``cuda/<GPU name>``
    (rounding differs between a CPU and a GPU, and between GPU models), plus the dtype."""
    device = torch.device(device)
    tag = "cpu" if device.type == "cpu" else f"{device.type}/{gpu_name(device) or device.type}"
    return tag if dtype is None else f"{tag}/{_name(dtype)}"


def resolve_device(requested: str | torch.device | None = None) -> torch.device:
    """``--device`` as given, else ``$EDITC_DEVICE``, else cuda when available, else cpu.

    A device that does not exist here is bad input (:class:`UserError`, exit 2) naming where it
    came from and what this machine has."""
    if isinstance(requested, torch.device):
        return requested
    source = "--device"
    if not requested:
        requested, source = os.environ.get(ENV_DEVICE) or None, ENV_DEVICE
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(requested).strip()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"{source}: {text[:40]!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"{source}: {text} asked, but torch sees no CUDA GPU here (torch "
                            f"{torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= count:
            raise UserError(f"{source}: {text} asked, but torch sees {count} GPU(s) (cuda:0…cuda:{count - 1})")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"{source}: mps asked, but this torch has no MPS backend; use --device cpu")
    elif device.type != "cpu":
        raise UserError(f"{source}: {text!r} is not supported; use cpu, cuda or cuda:N")
    return device


def device_policy(requested: str | torch.device | DevicePolicy | None = None) -> DevicePolicy:
    """The policy for ``--device`` (see :func:`resolve_device`); embedding matmuls in true float32."""
    if isinstance(requested, DevicePolicy):
        return requested
    device = resolve_device(requested)
    if device.type == "cuda":
        # Embeddings feed a float64 solve: TF32 (10-bit mantissa) would lose what float32 keeps.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return DevicePolicy(device)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (timings on a GPU mean nothing without it)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["DevicePolicy", "ENV_DEVICE", "compute_tag", "device_policy", "gpu_name", "resolve_device", "synchronize"]
