"""Run editc's ONNX exports in optimum's ORT pipelines (inside the side venv `make interop` builds).

    .venv-interop/bin/python tools/interop/clients.py JOBS.json

JOBS.json (written by tools/interop/check.py): a list of {"client", "folder", "prompts",
"latents" (a .npy file), "steps", "guidance", "height", "width", "out" (a .npy file to write)}.
Each client loads the folder exactly as its documentation says, unmodified, and writes its
images (float in [0, 1], N×H×W×3). This file imports nothing from editc: it runs beside
transformers 4, which editc does not support.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

# Written out, not compiler.OFFLINE_ENV: this runs in the side venv, which has no editc.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def load(client: str, folder: str):
    import optimum.onnxruntime as ort_pipelines

    cls = getattr(ort_pipelines, client)
    return cls.from_pretrained(folder, provider="CPUExecutionProvider")


def main(jobs_file: str) -> None:
    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    for job in json.loads(open(jobs_file).read()):
        started = time.perf_counter()
        pipeline = load(job["client"], job["folder"])
        pipeline.set_progress_bar_config(disable=True)
        latents = torch.from_numpy(np.load(job["latents"]))
        images = pipeline(prompt=job["prompts"], latents=latents, num_inference_steps=job["steps"],
                          guidance_scale=job["guidance"], height=job["height"], width=job["width"],
                          output_type="np").images
        np.save(job["out"], np.asarray(images, dtype=np.float32))
        print(f"{job['client']}: loaded {job['folder']} as {type(pipeline).__name__}, "
              f"{len(images)} images in {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
