"""Export: edited checkpoints as original single files, delta files and ONNX, with provenance.

- ``single_file``: the original checkpoint copied and patched tensor by tensor, or a diffusers
  folder written in its family's original layout.
- ``delta``: only the edited tensors (names in both layouts) and ``apply_delta``.
- ``onnx``: per-component ONNX graphs checked against PyTorch with onnxruntime.
- ``onnx_pipeline``: text-to-image on onnxruntime alone (numpy DDIM, classifier-free guidance).
- ``provenance``: the ``editc.*`` metadata every artifact carries.

Every file is written through ``compiler.io`` (atomic, locked, never onto an input).
"""
