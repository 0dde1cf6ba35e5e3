"""Model weights: checkpoint.py reads a block's tensors from a local directory or a hub repository;
store.py is the host's store of downloaded hub files (huggingface_hub's cache under --cache_dir, shared by
every node on the host, with its locks, retries and disk-space policy)."""
