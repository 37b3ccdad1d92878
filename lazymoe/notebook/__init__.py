"""The notebook front end: ``ui`` (one call per cell), the form, its widgets, the runtime report, presets.

Thin on purpose: every step calls the same library function as the CLI. Needs the ``notebook`` extra
(ipywidgets); nothing outside this package imports it.
"""
