"""Reading models and writing files: safetensors at the byte level, model references, the user's text files,
the output folder.

The bottom of the stack: imports nothing from lazymoe but ``errors``.
"""
