"""flaxseed: a JAX/Flax research codebase and model zoo.

The repository root is the package (``setup.py`` maps ``flaxseed`` to ``.``), so the top-level
folders import as ``flaxseed.models``, ``flaxseed.data``, ``flaxseed.training``,
``flaxseed.kernels`` and ``flaxseed.configs``.
Importing ``flaxseed`` itself is cheap: submodules load when first imported.
"""

__version__ = "0.1.0"
