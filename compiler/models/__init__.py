"""Model families, offline loading of diffusers folders and single files, the layer registry.

Entry points:

- ``compiler.models.load.load_model(path_or_toy, dtype=None, device="cpu", prediction_type=None)``
  -> ``LoadedModel`` (family, pipeline, source_path, source_format, model_hash, registry, ...)
- ``compiler.models.load.inspect_source(path_or_toy)`` -> ``ModelSource``: validation and
  family detection from headers and configs, without reading weights
- ``compiler.models.load.build_registry(model_or_folder)`` -> ``Registry``
- ``compiler.models.families``: the family table, ``detect_family``, ``known_location``
- ``compiler.models.layout``: diffusers <-> original single-file tensor names and tensors
- ``compiler.models.configs.config_metadata``: configs to store in a single file editc writes
"""
