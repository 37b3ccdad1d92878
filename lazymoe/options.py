"""The merge options a front end passes beside the config, and their defaults (one place for each)."""

from __future__ import annotations

#: 2 GB: a free Colab (12.7 GB RAM) never holds more than one tensor anyway
DEFAULT_MAX_SHARD_BYTES = 2 * 1000**3
#: the merged model's licence on its card and the Hub when neither the recipe nor the caller names one
DEFAULT_LICENSE = "apache-2.0"
