"""The runtime lazymoe runs on: what it has (``machine``), whether a plan fits it (``fit``), installing an extra
into Colab (``install``) and loading a merged model the way it can afford (``load``). Used by the CLI, the
notebook and the evaluations alike."""
