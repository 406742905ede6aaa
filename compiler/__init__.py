"""editc: a training-free checkpoint compiler for text-to-image diffusion models.

The pipeline is the package layout:
recipe -> resolve -> locate -> solve -> fuse -> export -> verify

The Python API (see the README's "Python API")::

    import compiler as editc
    recipe = editc.Recipe(edits=[editc.Edit(concept="van gogh", replacement="a painting",
                                            attribute="style")])
    editc.compile_to_disk(recipe, out="out/van_gogh")      # as `editc compile`
    report = editc.apply_recipe(pipe, recipe)              # a diffusers pipeline, in place

Names are imported on first use, so ``import compiler`` stays light.
"""

import os as _os
import time as _time

IMPORT_STARTED = _time.perf_counter()  # compile's manifest counts imports from here

# Nothing may ever be downloaded from a model hub. Set here, the one place, before any module of
# editc can import huggingface_hub, transformers or diffusers; child processes that editc starts
# get the same variables (``{**os.environ, **OFFLINE_ENV}``).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_OFFLINE": "1"}
for _name, _value in OFFLINE_ENV.items():
    _os.environ.setdefault(_name, _value)
__version__ = "0.1.0"

_API = {
    "Recipe": "compiler.recipe", "Edit": "compiler.recipe", "Outputs": "compiler.recipe",
    "VerifyGates": "compiler.recipe", "load_recipe": "compiler.recipe", "loads_recipe": "compiler.recipe",
    "UserError": "compiler.errors",
    "compile_to_disk": "compiler.api", "apply_recipe": "compiler.api", "EditReport": "compiler.api",
    "METHODS": "compiler.methods", "FORMATS": "compiler.export.formats", "FAMILIES": "compiler.models.families",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        module = importlib.import_module(_API[name])
        return getattr(module, "REGISTRY" if name == "METHODS" else name)
    raise AttributeError(f"module 'compiler' has no attribute {name!r}")
