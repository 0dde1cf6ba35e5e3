"""The disk cache of hub weights (PROTOCOL 5.11): huggingface_hub's cache under `cache_dir`, shared by
every node on the host, with the policy that decides what to download and what to delete.

- Files already in the cache win: they are found without any network request.
- Processes agree through `flock` on `<cache_dir>/blocks.lock` (the file Petals servers use too): shared
  while a file is read, exclusive while one is downloaded or files are evicted. A process that waited
  for the exclusive lock first looks again: another node may have downloaded the file meanwhile.
- Before downloading `size` bytes: available = free disk - 1 GiB, and with `max_disk_space`,
  min(available, max_disk_space - the cache's current size). If that is not enough, cached files are
  deleted least recently used first (blob access time, which this module also sets whenever it hands
  a file out, since many disks are mounted relatime or noatime) until it is; if deleting every cached
  file would not be enough, nothing is deleted and NotEnoughDiskSpace is raised.
- Network failures (connection errors, cut downloads, 5xx, 429) are retried with exponential backoff,
  `attempts` times in all; a cut download resumes where it stopped (huggingface_hub keeps the partial
  file). Missing files, repositories and revisions and refused tokens are not retried.
- huggingface_hub's progress bars are shown only when stderr is a terminal.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import huggingface_hub
import requests
import structlog
from huggingface_hub import constants
from huggingface_hub.errors import (
    DisabledRepoError,
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

LOCK_FILE = "blocks.lock"
DISK_RESERVE = 1 << 30  # always leave this much of the disk free
DEFAULT_ATTEMPTS = 5
DEFAULT_BACKOFF = 2.0  # seconds before the second attempt; doubles each time
MAX_BACKOFF = 60.0

# stdlib logging underneath: in a node, logs.setup renders it like every other event; in a script,
# warnings go to stderr (never to stdout, which a script may use for its output)
_log = structlog.wrap_logger(logging.getLogger("node.weights"))


class WeightStoreError(OSError):
    """A weight file cannot be had; the message says why and which setting to look at."""


class HubAccessError(WeightStoreError):
    """The hub refused: no such repository or revision, a gated repository, or a missing or bad token."""


class DownloadFailed(WeightStoreError):
    """Network failures outlasted every attempt."""


class NotEnoughDiskSpace(WeightStoreError):
    pass


@dataclass(frozen=True)
class CachedBlob:
    path: str  # the blob
    links: tuple[str, ...]  # snapshot entries (symlinks) that point at it
    size: int
    last_accessed: float


# Which lock each thread holds, per lock file: flock is per open file, so a nested exclusive request
# under a shared lock of the same process would wait for itself forever; refuse it instead.
_held = threading.local()


class WeightStore:
    def __init__(
        self,
        cache_dir: str,
        *,
        max_disk_space: Optional[int] = None,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff: float = DEFAULT_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        reserve: int = DISK_RESERVE,
        endpoint: Optional[str] = None,
        progress: Optional[bool] = None,
        log=None,
    ):
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
        self.lock_path = os.path.join(self.cache_dir, LOCK_FILE)
        self.max_disk_space = max_disk_space
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.reserve = reserve
        self.endpoint = endpoint  # None: huggingface_hub's (HF_ENDPOINT when it was imported)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.log = log or _log

    # --- locking -----------------------------------------------------------------------------

    @contextmanager
    def _lock(self, exclusive: bool) -> Iterator[None]:
        held = getattr(_held, "modes", None)
        if held is None:
            held = _held.modes = {}
        mode = held.get(self.lock_path)
        if mode == "exclusive" or (mode == "shared" and not exclusive):
            yield  # already covered by the lock this thread holds
            return
        if mode == "shared":
            raise RuntimeError("the weight cache's exclusive lock was requested under its shared lock")
        os.makedirs(self.cache_dir, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            try:
                fcntl.flock(fd, op | fcntl.LOCK_NB)
            except BlockingIOError:
                self.log.info("waiting for the weight cache lock", lock=self.lock_path, exclusive=exclusive)
                fcntl.flock(fd, op)
            held[self.lock_path] = "exclusive" if exclusive else "shared"
            try:
                yield
            finally:
                del held[self.lock_path]
        finally:
            os.close(fd)  # releases the lock

    def reading(self):
        """Hold while reading cached files: no other node evicts anything meanwhile."""
        return self._lock(exclusive=False)

    def writing(self):
        return self._lock(exclusive=True)

    # --- files -------------------------------------------------------------------------------

    def cached(
        self, repo_id: str, filename: str, *, revision: Optional[str] = None, token: Union[str, bool, None] = None
    ) -> Optional[str]:
        """The cached file's path, or None; never touches the network."""
        with self.reading():
            return self._cached(repo_id, filename, revision, token)

    def _cached(
        self, repo_id: str, filename: str, revision: Optional[str], token: Union[str, bool, None]
    ) -> Optional[str]:
        try:
            path = huggingface_hub.hf_hub_download(
                # no request is made, so no token is needed (token=True would fail here when none is saved)
                repo_id,
                filename,
                revision=revision,
                token=False,
                cache_dir=self.cache_dir,
                local_files_only=True,
            )
        except LocalEntryNotFoundError:
            return None
        self.touch(path)
        return path

    def fetch(
        self, repo_id: str, filename: str, *, revision: Optional[str] = None, token: Union[str, bool, None] = None
    ) -> str:
        """The local path of one repository file, downloaded if not cached. EntryNotFoundError if the
        file is not in the repository; WeightStoreError subclasses for everything else."""
        path = self.cached(repo_id, filename, revision=revision, token=token)
        if path is not None:
            return path
        for attempt in range(1, self.attempts + 1):
            try:
                return self._download(repo_id, filename, revision, token)
            except Exception as e:
                if not _retryable(e):
                    explained = _explain(e, repo_id, filename, revision)
                    if explained is e:
                        raise
                    raise explained from e
                if attempt == self.attempts:
                    raise DownloadFailed(
                        f"cannot download {filename} of {repo_id} from {self._endpoint()}: {_describe(e)} "
                        f"({self.attempts} attempts)"
                    ) from e
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                self.log.warning(
                    "download failed, retrying",
                    repo=repo_id,
                    file=filename,
                    attempt=attempt,
                    attempts=self.attempts,
                    retry_in=delay,
                    error=_describe(e),
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _download(self, repo_id: str, filename: str, revision: Optional[str], token: Union[str, bool, None]) -> str:
        with self.writing():
            path = self._cached(repo_id, filename, revision, token)  # another node may have got it while we waited
            if path is not None:
                return path
            url = huggingface_hub.hf_hub_url(repo_id, filename, revision=revision, endpoint=self.endpoint)
            size = huggingface_hub.get_hf_file_metadata(url, token=token, endpoint=self.endpoint).size
            if size is not None:
                self.make_room(size)
            self._set_progress_bars()
            began = time.perf_counter()
            self.log.info("downloading", repo=repo_id, file=filename, revision=revision, bytes=size)
            path = huggingface_hub.hf_hub_download(
                repo_id, filename, revision=revision, token=token, cache_dir=self.cache_dir, endpoint=self.endpoint
            )
            self.log.info(
                "downloaded", repo=repo_id, file=filename, bytes=size, seconds=round(time.perf_counter() - began, 2)
            )
            self.touch(path)
            return path

    def _set_progress_bars(self) -> None:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

        if not self.progress and not are_progress_bars_disabled("huggingface_hub.http_get"):
            disable_progress_bars("huggingface_hub.http_get")

    def _endpoint(self) -> str:
        return self.endpoint or constants.ENDPOINT

    @staticmethod
    def touch(path: str) -> None:
        """Record a use of the file's blob (its access time), for least-recently-used eviction."""
        try:
            blob = os.path.realpath(path)
            os.utime(blob, (time.time(), os.stat(blob).st_mtime))
        except OSError:
            pass  # someone else's file in a shared cache: its access time stays as the kernel keeps it

    # --- space -------------------------------------------------------------------------------

    def blobs(self) -> list[CachedBlob]:
        """Every cached blob of every repository in the cache, least recently used first."""
        if not os.path.isdir(self.cache_dir):
            return []
        info = huggingface_hub.scan_cache_dir(self.cache_dir)
        links: dict[str, list[str]] = {}
        stats: dict[str, tuple[int, float]] = {}
        for repo in info.repos:
            for rev in repo.revisions:
                for f in rev.files:
                    links.setdefault(str(f.blob_path), []).append(str(f.file_path))
                    stats[str(f.blob_path)] = (f.size_on_disk, f.blob_last_accessed)
        blobs = [CachedBlob(p, tuple(links[p]), *stats[p]) for p in links]
        return sorted(blobs, key=lambda b: b.last_accessed)

    def size(self) -> int:
        return sum(b.size for b in self.blobs())

    def available(self, blobs: Optional[list[CachedBlob]] = None) -> int:
        """Bytes that may be written now, before any eviction."""
        os.makedirs(self.cache_dir, exist_ok=True)
        free = shutil.disk_usage(self.cache_dir).free - self.reserve
        if self.max_disk_space is not None:
            used = sum(b.size for b in (self.blobs() if blobs is None else blobs))
            free = min(free, self.max_disk_space - used)
        return free

    def make_room(self, size: int) -> None:
        """Evict least recently used files until `size` more bytes fit (under the exclusive lock)."""
        with self.writing():
            blobs = self.blobs()
            available = self.available(blobs)
            if size <= available:
                return
            if size > available + sum(b.size for b in blobs):
                limit = "" if self.max_disk_space is None else f", --max_disk_space {_human(self.max_disk_space)}"
                raise NotEnoughDiskSpace(
                    f"not enough disk space for a {_human(size)} file in {self.cache_dir}: "
                    f"{_human(max(available, 0))} available (free disk less {_human(self.reserve)}{limit}) "
                    f"and {_human(sum(b.size for b in blobs))} of cached files that could be deleted"
                )
            freed = 0
            for blob in blobs:
                if size <= available + freed:
                    break
                for link in blob.links:
                    _remove(link)
                _remove(blob.path)
                freed += blob.size
                self.log.info(
                    "evicted from the weight cache", file=blob.links[0] if blob.links else blob.path, bytes=blob.size
                )


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _retryable(e: BaseException) -> bool:
    if isinstance(e, (WeightStoreError, LocalTokenNotFoundError)):
        return False
    if isinstance(e, LocalEntryNotFoundError):
        # the metadata request failed for want of a network (or the hub is down); hopeless when offline
        return not constants.HF_HUB_OFFLINE
    if isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, DisabledRepoError)):
        return False
    if isinstance(e, requests.HTTPError):
        status = e.response.status_code if e.response is not None else None
        return status is None or status >= 500 or status in (408, 429)
    # connection errors, timeouts, a body cut short, a size that does not match
    return isinstance(e, OSError)


def _explain(e: BaseException, repo_id: str, filename: str, revision: Optional[str]) -> BaseException:
    """A clear error for what will not get better by retrying; other errors pass unchanged."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, LocalTokenNotFoundError):  # --use_auth_token, and nothing saved
        return HubAccessError(
            "--use_auth_token: no token saved on this machine; run `huggingface-cli login` (or `hf auth login`) "
            "first, or pass the token with --token"
        )
    if isinstance(e, GatedRepoError):
        return HubAccessError(f"{repo_id} is a gated repository: accept its terms on the hub, then pass --token")
    if isinstance(e, RepositoryNotFoundError):
        return HubAccessError(
            f"{repo_id}: no such repository, or it is private and the token (--token) does not give access to it"
        )
    if isinstance(e, RevisionNotFoundError):
        return HubAccessError(f"{repo_id}: no revision {revision!r} (--revision)")
    if isinstance(e, DisabledRepoError):
        return HubAccessError(f"{repo_id}: access to this repository is disabled")
    if isinstance(e, LocalEntryNotFoundError):  # offline and not cached
        return HubAccessError(
            f"{filename} of {repo_id} is not in the cache and huggingface_hub is offline (HF_HUB_OFFLINE)"
        )
    if isinstance(e, EntryNotFoundError):
        return e  # the caller decides what a missing file means
    if status in (401, 403):
        return HubAccessError(
            f"{repo_id}: access to {filename} refused (HTTP {status}): the token is missing, invalid or "
            "not allowed to read this repository (--token)"
        )
    return e


def _describe(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if isinstance(e, LocalEntryNotFoundError) and cause is not None:
        text += f" ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})"
    return text


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)
