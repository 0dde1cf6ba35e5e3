"""Where a model's files live (a local directory or a Hugging Face Hub repository) and how to read
just the tensors one block needs (PROTOCOL 5.11).

Only safetensors checkpoints are supported: they let us read single tensors without loading (or, for
sharded checkpoints, downloading) the rest of the model.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Union

import huggingface_hub
import safetensors
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from transformers import AutoConfig, PretrainedConfig

from node.weights import mapped
from node.weights.store import DEFAULT_ATTEMPTS, WeightStore

if TYPE_CHECKING:  # the supervisor reads configs with this module and must not pay for torch
    import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# What becomes of a tensor that is already in its final dtype on the CPU, still the pages of safetensors' map
# of the file (a map of the whole file, which lives as long as one tensor taken from it, and keeps every page
# read through it resident):
COPY = "copy"  # memory of our own (the default: embeddings and heads, tests)
MAPPED = "mapped"  # served from the map, every page read and mapped now (node/weights/mapped.py)
BORROWED = "borrowed"  # left as it is, for a caller that quantizes or cuts the block on the host and then moves
# every tensor to the GPU, or copies out what is left in the map (mapped.take_out): a copy first would be
# one more read and write of every weight


class Checkpoint:
    def __init__(
        self,
        name: str,
        *,
        path: Optional[str] = None,
        repo_id: Optional[str] = None,
        revision: Optional[str] = None,
        token: Union[str, bool, None] = None,
        cache_dir: Optional[str] = None,
        weight_store: Optional[WeightStore] = None,
    ):
        self.name = name
        self.is_local = path is not None
        self.repository = None if self.is_local else f"https://huggingface.co/{repo_id}"
        self._path = path
        self._repo_id = repo_id
        self._revision = revision
        self._token = token
        self._cache_dir = cache_dir
        if weight_store is None and not self.is_local:
            from node.weights import default_cache_dir

            weight_store = WeightStore(cache_dir or default_cache_dir())
            self._cache_dir = weight_store.cache_dir
        self._cache = weight_store  # hub repositories only: downloads, locking and eviction
        self._weight_map: Optional[dict[str, str]] = None  # tensor name -> file name inside the checkpoint

    @classmethod
    def open(
        cls,
        name_or_path: str,
        *,
        revision: Optional[str] = None,
        token: Union[str, bool, None] = None,
        cache_dir: Optional[str] = None,
        max_disk_space: Optional[int] = None,
        download_attempts: int = DEFAULT_ATTEMPTS,
        weight_store: Optional[WeightStore] = None,
    ) -> "Checkpoint":
        """A local directory, or a hub repository cached in `cache_dir` (default $PETALS_CACHE or
        ~/.cache/petals) under the policy of node.weights.store; `weight_store` replaces that policy's
        settings (cache_dir, max_disk_space, download_attempts) with a ready one."""
        if os.path.isdir(name_or_path):
            return cls(name_or_path, path=name_or_path)
        repo_id = name_or_path
        # Legacy alias kept for old clients and scripts (PROTOCOL 2.1).
        if repo_id.startswith("bigscience/") and repo_id.endswith("-petals"):
            repo_id = repo_id[: -len("-petals")]
        if weight_store is None:
            from node.weights import default_cache_dir

            weight_store = WeightStore(
                cache_dir or default_cache_dir(), max_disk_space=max_disk_space, attempts=download_attempts
            )
        return cls(
            name_or_path,
            repo_id=repo_id,
            revision=revision,
            token=token,
            cache_dir=weight_store.cache_dir,
            weight_store=weight_store,
        )

    @classmethod
    def of(cls, settings) -> "Checkpoint":
        """The checkpoint a node's settings name: a NodeConfig's or a NodePlan's model, revision, token,
        cache_dir, max_disk_space and download_attempts (the one place they are read for it)."""
        return cls.open(
            settings.model,
            revision=settings.revision,
            token=settings.token,
            cache_dir=settings.cache_dir,
            max_disk_space=settings.max_disk_space,
            download_attempts=settings.download_attempts,
        )

    def __repr__(self) -> str:
        return f"Checkpoint({self.name!r}, local={self.is_local})"

    # --- files ---------------------------------------------------------------------------------

    def _file(self, filename: str) -> str:
        """Local path of one checkpoint file, downloading it if needed. Raises FileNotFoundError."""
        if self.is_local:
            path = os.path.join(self._path, filename)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} does not exist")
            return path
        return self._cache.fetch(self._repo_id, filename, revision=self._revision, token=self._token)

    @contextmanager
    def _local(self, filename: str) -> Iterator[str]:
        """A local path of the file that stays valid inside the context: for a hub file, the weight
        cache's shared lock is held, so that no node evicts it while it is read."""
        if self.is_local:
            yield self._file(filename)
            return
        for _ in range(3):
            path = self._file(filename)  # may take the exclusive lock: not under the shared one
            with self._cache.reading():
                if os.path.exists(path):
                    yield path
                    return
        raise FileNotFoundError(
            f"{filename} of {self.name} keeps being evicted from {self._cache_dir} by other nodes: "
            "is --max_disk_space too small for the blocks of all the nodes that share this cache?"
        )

    def _find_weights(self) -> str:
        """The file name of the index or of the single weights file, in PROTOCOL 5.11 order."""
        candidates = (INDEX_FILE, SINGLE_FILE)
        if self.is_local:
            for filename in candidates:
                if os.path.isfile(os.path.join(self._path, filename)):
                    return filename
        else:
            # A file already in the cache wins even if an earlier candidate exists on the Hub.
            with self._cache.reading():
                for filename in candidates:
                    cached = huggingface_hub.try_to_load_from_cache(
                        self._repo_id, filename, cache_dir=self._cache_dir, revision=self._revision
                    )
                    if isinstance(cached, str):
                        return filename
            for filename in candidates:
                try:
                    self._file(filename)
                    return filename
                except LocalEntryNotFoundError:
                    raise  # offline and not cached: "not on the Hub" would be a lie
                except EntryNotFoundError:
                    continue
        raise FileNotFoundError(
            f"{self.name}: no safetensors weights found ({INDEX_FILE} or {SINGLE_FILE}). "
            "This node requires safetensors checkpoints; pytorch .bin files are not supported "
            "(convert them with transformers' save_pretrained(..., safe_serialization=True))."
        )

    def weight_map(self) -> dict[str, str]:
        """Tensor name -> file holding it. Reads only the index (or the single file's header)."""
        if self._weight_map is None:
            filename = self._find_weights()
            if filename == INDEX_FILE:
                with self._local(INDEX_FILE) as path, open(path) as f:
                    self._weight_map = dict(json.load(f)["weight_map"])
            else:
                with self._local(SINGLE_FILE) as path, safetensors.safe_open(path, framework="pt") as f:
                    self._weight_map = {name: SINGLE_FILE for name in f.keys()}
        return self._weight_map

    def config(self) -> PretrainedConfig:
        with self._local("config.json") as config_path:
            return AutoConfig.from_pretrained(os.path.dirname(config_path))

    # --- tensors -------------------------------------------------------------------------------

    def _read(self, names: Iterable[str], dtype: torch.dtype, device, host: str = COPY) -> dict[str, torch.Tensor]:
        """Reads the named tensors, opening each file that holds any of them once. Each tensor's bytes
        are read once, into a tensor of the final dtype on the final device; nothing else of the file.
        `host` says what becomes of a tensor already in its final dtype on the CPU (see COPY, MAPPED,
        BORROWED)."""
        if host not in (COPY, MAPPED, BORROWED):
            raise ValueError(f"host must be one of {COPY!r}, {MAPPED!r}, {BORROWED!r}, not {host!r}")
        weight_map = self.weight_map()
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(weight_map[name], []).append(name)
        out = {}
        for filename, file_names in by_file.items():
            with self._local(filename) as path, safetensors.safe_open(path, framework="pt") as f:
                for name in file_names:
                    stored = f.get_tensor(name)  # a view of the file's memory map: nothing read yet
                    tensor = stored
                    # Integer tensors (e.g. quantization metadata) must keep their exact values.
                    if tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    tensor = tensor.to(device)
                    if tensor is stored and host == MAPPED:
                        mapped.fault_in(tensor)  # or the first request would wait on the disk
                    elif tensor is stored and host == COPY:
                        tensor = tensor.clone()
                    out[name] = tensor
        return out

    def block_state(
        self, index_prefix: str, *, dtype: torch.dtype, device="cpu", host: str = COPY
    ) -> dict[str, torch.Tensor]:
        """The tensors of one block, named relative to `index_prefix` (e.g. "model.layers.3."); `host`: what
        becomes of those already in `dtype` on the CPU (see _read)."""
        weight_map = self.weight_map()
        candidates = [index_prefix]
        if index_prefix.rstrip(".").count(".") >= 2:
            # Checkpoints saved from the bare model (LlamaModel rather than LlamaForCausalLM) lack "model.".
            candidates.append(index_prefix.split(".", 1)[1])
        # A family that names its layers as in the bare model (BLOOM: "h.3.") reads a causal-LM checkpoint
        # too, where they sit under one more component ("transformer.h.3.").
        candidates += sorted(
            {
                n.split(".", 1)[0] + "." + index_prefix
                for n in weight_map
                if n.partition(".")[2].startswith(index_prefix)
            }
        )
        for prefix in candidates:
            names = [n for n in weight_map if n.startswith(prefix)]
            if names:
                break
        else:
            raise ValueError(
                f"{self.name}: no tensors start with {' or '.join(map(repr, candidates))}"
                "; is the block index within num_hidden_layers and the model family right?"
            )
        tensors = self._read(names, dtype, device, host)
        return {name[len(prefix) :]: tensor for name, tensor in tensors.items()}

    def tensors(self, names: list[str], *, dtype: torch.dtype, device="cpu") -> dict[str, torch.Tensor]:
        """Named non-block tensors (embeddings, final norm, lm_head). Names not in the checkpoint are left out."""
        weight_map = self.weight_map()
        found = {}  # requested name -> name in the checkpoint
        for name in names:
            if name in weight_map:
                found[name] = name
            elif "." in name and name.split(".", 1)[1] in weight_map:
                found[name] = name.split(".", 1)[1]  # bare-model checkpoint, as in block_state
        tensors = self._read(found.values(), dtype, device)
        return {name: tensors[stored] for name, stored in found.items()}
