"""mnistbench: which choices make a small MNIST classifier train reliably, and by how much.

A matrix file declares factors and levels. ``mnistbench ablate`` trains every cell with
many seeds, ``mnistbench report`` turns the store into findings, and
``mnistbench check`` gates CI on them.
"""

__version__ = "0.1.0"
