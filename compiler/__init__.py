"""editc: a training-free checkpoint compiler for text-to-image diffusion models.

The pipeline is the package layout:
recipe -> resolve -> locate -> solve -> fuse -> export -> verify
"""

__version__ = "0.1.0"
