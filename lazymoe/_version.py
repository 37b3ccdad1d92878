"""The package version: read by ``lazymoe.__version__``, the notebook's setup report and the build (pyproject)."""

__version__ = "0.1.0"
