"""Model weights: checkpoint.py reads a block's tensors from a local directory or a hub repository;
mapped.py serves a CPU block's unchanged weights from the file's memory map; store.py is the host's store
of downloaded hub files (huggingface_hub's cache under --cache_dir, shared by every node on the host, with
its locks, retries and disk-space policy)."""

import os


def default_cache_dir() -> str:
    """Where hub files are kept without --cache_dir: Petals' place, so that both share one download."""
    return os.environ.get("PETALS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "petals")
