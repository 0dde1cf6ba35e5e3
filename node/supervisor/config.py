"""The command line: Petals `run_server` flags with the same names, defaults and meanings, plus the node's own.

As in Petals, `./config.yml` is read when it exists, then `--config FILE`, in configargparse's syntax
(node/supervisor/config_file.py); their settings become flags placed before the real command line, so
one parser checks them all and the command line wins. Any invalid value exits with code 2 and a message
naming the flag. Flags that only Petals' own runtime has are accepted and named in a warning at start
(COMPATIBILITY_ONLY); a flag whose Petals meaning the node cannot honour is refused, saying why.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Optional, Sequence, Union

import msgspec

from node.supervisor.config_file import ConfigFileError, read_settings, settings_to_argv
from protocol.wire import COMPRESSION_NAMES

PUBLIC_INITIAL_PEERS = [
    "/dns/bootstrap1.petals.dev/tcp/31337/p2p/QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY",
    "/dns/bootstrap2.petals.dev/tcp/31338/p2p/QmQGTqmM7NKjV6ggU1ZCap8zWiyKR89RViDXiqehSiCpY5",
    "/dns6/bootstrap1.petals.dev/tcp/31337/p2p/QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY",
    "/dns6/bootstrap2.petals.dev/tcp/31338/p2p/QmQGTqmM7NKjV6ggU1ZCap8zWiyKR89RViDXiqehSiCpY5",
    "/ip4/159.89.214.152/tcp/31337/p2p/QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY",
    "/ip4/159.203.156.48/tcp/31338/p2p/QmQGTqmM7NKjV6ggU1ZCap8zWiyKR89RViDXiqehSiCpY5",
]

COMPRESSION_TYPES = COMPRESSION_NAMES  # what --compression takes

# Defaults that depend on the model (PROTOCOL 5.6), applied when the model is resolved: (with
# grouped-query attention, without).
MODEL_DEFAULTS = {
    "max_batch_size": (8192, 2048),
    "inference_max_length": (8192, 2048),
    "attn_cache_tokens": (16384, 4096),
}
COMPATIBILITY_ONLY = "accepted for compatibility with Petals' run_server; has no effect here"
# What each compatibility-only flag does in Petals (2.2.0 and HEAD), for --help and the warning at start.
IN_PETALS = {
    "prefetch_batches": "in Petals, how many batches hivemind's Runtime forms ahead of the one it computes; "
    "the node's runtime forms each round from its queue when the round starts",
    "sender_threads": "in Petals, the threads hivemind's Runtime hands results back to the handler processes "
    "with; the node's runtime answers over ZeroMQ from its own loop",
    "min_batch_size": "in Petals, stored by its task pools and never read",
}
DEFAULT_CONFIG_FILE = "config.yml"  # read from the working directory when it exists, as Petals does
CUSTOM_MODULE_REFUSED = (
    "argument --custom_module_path: the node runs no code from its flags. In Petals this file is executed to "
    "register hivemind MoE expert classes, which Petals' transformer blocks never use, so it changes nothing a "
    "Petals server serves; remove the flag"
)

DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


class NodeConfig(msgspec.Struct, kw_only=True):
    """Every flag, parsed and checked. Field names are the flag names."""

    model: str
    public_name: Optional[str] = None
    token: Union[str, bool, None] = None  # True: the token `huggingface-cli login` saved (--use_auth_token)
    num_blocks: Optional[int] = None
    block_indices: Optional[tuple[int, int]] = None
    dht_prefix: Optional[str] = None
    port: Optional[int] = None
    public_ip: Optional[str] = None
    no_auto_relay: bool = False
    host_maddrs: Optional[list[str]] = None
    announce_maddrs: Optional[list[str]] = None
    daemon_startup_timeout: float = 60
    compression: str = "NONE"
    num_handlers: int = 8
    prefetch_batches: int = 1
    sender_threads: int = 1
    inference_max_length: Optional[int] = None
    min_batch_size: int = 1
    max_batch_size: Optional[int] = None
    max_chunk_size_bytes: int = 256 * 1024 * 1024
    attn_cache_tokens: Optional[int] = None
    cache_dir: Optional[str] = None
    max_disk_space: Optional[int] = None  # bytes
    device: Optional[str] = None
    torch_dtype: str = "auto"
    max_alloc_timeout: float = 600
    revision: Optional[str] = None
    throughput: Union[float, str, None] = None  # a float, "auto" / "eval" / "dry_run", or None (not given)
    update_period: float = 120
    expiration: Optional[float] = None
    request_timeout: float = 180
    session_timeout: float = 60 * 30
    step_timeout: float = 5 * 60
    initial_peers: Optional[list[str]] = None
    new_swarm: bool = False
    increase_file_limit: int = 4096
    stats_report_interval: Optional[float] = None
    custom_module_path: Optional[str] = None
    identity_path: Optional[str] = None
    balance_quality: float = 0.75
    mean_balance_check_period: float = 60
    quant_type: Optional[str] = None
    tensor_parallel_devices: Optional[list[str]] = None
    skip_reachability_check: bool = False
    adapters: list[str] = []
    # the node's own flags
    run_dir: Optional[str] = None
    max_restarts: int = 5
    restart_window: float = 60
    heartbeat_timeout: float = 15
    # A graceful stop serves open sessions until they end, for at most this long: a Petals client of today
    # cannot move a session to another server mid-generation, so a session cut is a generation lost. Five
    # minutes is a 1000-token generation at the public swarm's usual 3-6 tokens/s, and --step_timeout: an
    # idle session ends by then anyway.
    shutdown_grace: float = 5 * 60
    log_format: str = "auto"
    log_level: str = "info"
    download_attempts: int = 5
    network_bandwidth: Optional[float] = None  # Mbit/s; None: assume 100 (PROTOCOL 5.2)
    mean_block_selection_delay: float = 5.0
    balance_checks: int = 3
    drain_timeout: Optional[float] = None  # None: --shutdown_grace (a move or a reload waits as a stop does)
    memory_margin: float = 0.2
    metrics_port: Optional[int] = None
    # loopback: the page and the metrics show the node's peers, sessions and code version, which an operator
    # may not want on the internet; --metrics_host 0.0.0.0 opens them up deliberately
    metrics_host: str = "127.0.0.1"
    # what strangers may make the node hold (DESIGN section 5); honest clients stay far below
    max_sessions: int = 1024
    max_sessions_per_peer: int = 128
    max_bytes_in_flight: Optional[int] = None  # per frontend; None: 4 of the largest request the model allows
    max_peer_bytes_in_flight: Optional[int] = None  # per peer and frontend; None: 2 of the largest request
    history_bytes: Optional[int] = None  # None: enough for every session the cache can hold

    @property
    def peers(self) -> list[str]:
        if self.new_swarm:
            return []
        return list(self.initial_peers) if self.initial_peers is not None else list(PUBLIC_INITIAL_PEERS)

    @property
    def drain_seconds(self) -> float:
        """How long a move or a reload lets open sessions finish where they are: as long as a stop does,
        unless --drain_timeout says otherwise."""
        return self.shutdown_grace if self.drain_timeout is None else self.drain_timeout


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(text)
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(text)
    return value


def _block_range(text: str) -> tuple[int, int]:
    start, sep, end = text.partition(":")
    if not sep:
        raise ValueError(text)
    start, end = int(start), int(end)
    if not 0 <= start < end:
        raise ValueError(text)
    return start, end


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise ValueError(text)
    return value


def _throughput(text: str):
    if text in ("auto", "eval", "dry_run"):
        return text
    return _non_negative_float(text)


def _size(text: str) -> int:
    value = parse_size(text)
    if value <= 0:
        raise ValueError(text)
    return value


def _size_or_zero(text: str) -> int:
    value = parse_size(text)
    if value < 0:
        raise ValueError(text)
    return value


def _compression(text: str) -> str:
    value = text.upper()  # as Petals reads it
    if value not in COMPRESSION_TYPES:
        raise ValueError(text)
    return value


def _prefix(text: str) -> str:
    if not text or "." in text or " " in text:
        raise ValueError(text)
    return text


# sizes as humanfriendly.parse_size reads them (Petals parses --max_disk_space with it)

_DECIMAL = ("k", "m", "g", "t", "p", "e", "z", "y")
_BINARY_NAMES = ("kibibyte", "mebibyte", "gibibyte", "tebibyte", "pebibyte", "exbibyte", "zebibyte", "yobibyte")


def parse_size(text: str) -> int:
    """Bytes in "50GB" (50·10⁹), "100GiB" (100·2³⁰), "1.5 TB", "512M", "4096"; ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match:
        raise ValueError(f"not a size: {text!r}")
    number = float(match.group(1)) if "." in match.group(1) else int(match.group(1))
    unit = match.group(2).lower()
    if not unit or unit.startswith("b"):
        return int(number)
    unit = unit.rstrip("s")
    for power, (prefix, name) in enumerate(zip(_DECIMAL, _BINARY_NAMES), start=1):
        if unit in (prefix + "ib", name):
            return int(number * 1024**power)
        if unit.startswith(prefix):
            return int(number * 1000**power)
    raise ValueError(f"unknown size unit in {text!r}")


for _fn, _name in [
    (_positive_int, "positive integer"),
    (_non_negative_int, "non-negative integer"),
    (_positive_float, "positive number"),
    (_non_negative_float, "non-negative number"),
    (_block_range, "START:END range"),
    (_throughput, "number or one of auto, eval, dry_run"),
    (_fraction, "fraction in [0, 1)"),
    (_prefix, "prefix without '.' or ' '"),
    (_compression, "compression, one of " + ", ".join(COMPRESSION_TYPES) + " (any case)"),
    (_size, "size (e.g. 50GB = 50*10^9 bytes, 100GiB = 100*2^30 bytes)"),
]:
    _fn.__name__ = _name  # argparse names the expected kind in its error from the function name


class _CompatibilityOnly(argparse.Action):
    """Stores the value and remembers that the flag was given, so that the node can say at start that it
    has no effect here (from the command line or a config file, abbreviated or not)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        given = getattr(namespace, "compatibility_given", None) or []
        setattr(namespace, "compatibility_given", [*given, self.dest])


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown in --help, except "None": the help text says what an absent value means."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="petals-node" if os.path.basename(sys.argv[0]) == "petals-node" else "python -m node.supervisor",
        description="Serve a range of transformer blocks to a Petals swarm.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="hub repository or local directory of the model")
    p.add_argument("--model", "--converted_model_name_or_path", dest="model", help="same as MODEL")
    p.add_argument(
        "--config",
        "-c",
        help=f"file of settings, as Petals reads it (`key value`, `key = value`, `key: value`; .json: a map), read "
        f"after ./{DEFAULT_CONFIG_FILE} when that exists; the command line overrides both",
    )
    p.add_argument("--public_name", help="published in the DHT so that others can tell who serves")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--token", help="Hugging Face hub token")
    tok.add_argument(
        "--use_auth_token",
        dest="token",
        action="store_const",
        const=True,
        help="use the token that `huggingface-cli login` saved (as Petals; --token gives one explicitly)",
    )
    p.add_argument("--num_blocks", type=_positive_int, help="how many blocks to serve, chosen from the swarm")
    p.add_argument("--block_indices", type=_block_range, help="serve exactly these blocks, START:END (end excluded)")
    p.add_argument("--dht_prefix", type=_prefix, help="prefix of block uids; derived from the repository by default")
    p.add_argument(
        "--port", type=_non_negative_int, help="listen on this TCP port on every interface (0: a random one)"
    )
    p.add_argument("--public_ip", help="announce this IPv4 address (needs --port)")
    p.add_argument("--no_auto_relay", action="store_true", help="do not look for libp2p relays")
    p.add_argument("--host_maddrs", nargs="+", help="multiaddrs to listen on")
    p.add_argument("--announce_maddrs", nargs="+", help="multiaddrs to announce")
    p.add_argument("--daemon_startup_timeout", type=_positive_float)
    p.add_argument("--compression", type=_compression, help="compression of outputs: " + ", ".join(COMPRESSION_TYPES))
    p.add_argument("--num_handlers", type=_positive_int, help="network frontend processes")
    for flag in ("prefetch_batches", "sender_threads"):
        p.add_argument(f"--{flag}", type=_positive_int, action=_CompatibilityOnly, help=_compat_help(flag))
    p.add_argument(
        "--inference_max_length",
        type=_positive_int,
        help="longest inference session" + _by_model("inference_max_length"),
    )
    p.add_argument(
        "--min_batch_size", type=_positive_int, action=_CompatibilityOnly, help=_compat_help("min_batch_size")
    )
    p.add_argument("--max_batch_size", type=_positive_int, help="most tokens in one task" + _by_model("max_batch_size"))
    p.add_argument("--max_chunk_size_bytes", type=_positive_int)
    p.add_argument(
        "--attn_cache_tokens",
        type=_positive_int,
        help="attention cache budget per block" + _by_model("attn_cache_tokens"),
    )
    p.add_argument("--cache_dir", help="where hub downloads go ($PETALS_CACHE or ~/.cache/petals)")
    p.add_argument(
        "--max_disk_space",
        type=_size,
        help="cap on the weight cache in --cache_dir, e.g. 50GB or 100GiB; "
        "least recently used files are deleted to stay under it (default: only keep 1 GiB of the disk free)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda if available, else mps, else cpu)")
    p.add_argument("--torch_dtype", choices=("auto", "bfloat16", "float16", "float32"))
    p.add_argument("--max_alloc_timeout", type=_non_negative_float)
    p.add_argument("--revision", help="hub revision of the model")
    p.add_argument("--throughput", type=_throughput, help="published tokens/s, or auto/eval/dry_run")
    p.add_argument("--update_period", type=_positive_float, help="DHT refresh period (s)")
    p.add_argument("--expiration", type=_positive_float, help="DHT record lifetime (s); max(2*update_period, 3)")
    p.add_argument("--request_timeout", type=_positive_float)
    p.add_argument("--session_timeout", type=_positive_float)
    p.add_argument("--step_timeout", type=_positive_float)
    p.add_argument("--initial_peers", nargs="*", help="multiaddrs of swarm peers (default: the public swarm)")
    p.add_argument("--new_swarm", action="store_true", help="start a new private swarm (no initial peers)")
    p.add_argument("--increase_file_limit", type=_non_negative_int)
    p.add_argument(
        "--stats_report_interval",
        type=_positive_float,
        help="log one 'stats' event with the runtime's, the cache's and the frontends' figures this often (s)",
    )
    p.add_argument("--custom_module_path", help="refused: " + CUSTOM_MODULE_REFUSED.split(": ", 1)[1])
    p.add_argument("--identity_path", help="libp2p private key file (created if missing)")
    p.add_argument("--balance_quality", type=_non_negative_float)
    p.add_argument("--mean_balance_check_period", type=_positive_float)
    p.add_argument("--quant_type", choices=("none", "int8", "nf4"), help="weight quantization")
    p.add_argument("--tensor_parallel_devices", nargs="+", help="split blocks over these devices")
    p.add_argument(
        "--skip_reachability_check",
        action="store_true",
        help="in the public swarm, do not ask health.petals.dev whether the swarm can reach the node "
        "before going ONLINE",
    )
    p.add_argument("--adapters", nargs="*", help="LoRA adapter repositories")
    node = p.add_argument_group("node")
    node.add_argument("--run_dir", help="directory for the node's sockets and state (default /tmp/node.PID)")
    node.add_argument("--max_restarts", type=_non_negative_int, help="restarts allowed in --restart_window")
    node.add_argument("--restart_window", type=_positive_float, help="seconds")
    node.add_argument("--heartbeat_timeout", type=_positive_float, help="an actor silent this long is replaced")
    node.add_argument(
        "--shutdown_grace",
        type=_non_negative_float,
        help="seconds a stop (SIGTERM, SIGINT) serves open sessions before ending them; a second signal stops at once",
    )
    node.add_argument(
        "--download_attempts",
        type=_positive_int,
        help="tries per weight file on network errors, with exponential backoff (2 s, 4 s, ...)",
    )
    node.add_argument(
        "--network_bandwidth",
        type=_positive_float,
        help="the link's bandwidth in Mbit/s for the published network_rps (no speed test offline; default 100)",
    )
    node.add_argument(
        "--mean_block_selection_delay",
        type=_non_negative_float,
        help="mean random wait (s) before choosing blocks, so that nodes starting together do not pick the same ones",
    )
    node.add_argument(
        "--balance_checks",
        type=_positive_int,
        help="consecutive balance checks that must find the swarm unbalanced before the node moves (one when a "
        "block has no server)",
    )
    node.add_argument(
        "--drain_timeout",
        type=_non_negative_float,
        help="seconds open sessions may finish on the old blocks when the node moves, or on a frontend a reload "
        "replaces (default: --shutdown_grace)",
    )
    node.add_argument(
        "--memory_margin",
        type=_fraction,
        help="share of RAM (on a CPU) kept free when choosing --num_blocks automatically",
    )
    node.add_argument(
        "--metrics_port",
        type=_non_negative_int,
        help="serve Prometheus metrics (/metrics) and the status page (/, /status.json) on this port "
        "(0: any free port; default: off)",
    )
    node.add_argument(
        "--metrics_host",
        help="the address the metrics and the status page listen on (default 127.0.0.1, this host only; "
        "0.0.0.0 for every interface)",
    )
    node.add_argument(
        "--history_bytes",
        type=_size_or_zero,
        help="host memory for the inputs of open sessions, from which their attention caches are rebuilt when "
        "the runtime is replaced, e.g. 2GiB (default: enough for every session the cache can hold, "
        "--attn_cache_tokens x hidden size x dtype bytes per block; 0: sessions do not survive a runtime restart)",
    )
    limits = p.add_argument_group(
        "limits", "what any peer may make the node hold; honest Petals clients stay far below"
    )
    limits.add_argument("--max_sessions", type=_positive_int, help="inference sessions open at once, in all")
    limits.add_argument("--max_sessions_per_peer", type=_positive_int, help="inference sessions open at once, per peer")
    limits.add_argument(
        "--max_bytes_in_flight",
        type=_size,
        help="request bytes one frontend holds at once, e.g. 1GiB (default: 4 times the largest request the model "
        "allows, hidden states of --max_batch_size tokens with deep prompts for every served block)",
    )
    limits.add_argument(
        "--max_peer_bytes_in_flight",
        type=_size,
        help="request bytes one frontend holds at once for one peer (default: 2 times the largest request)",
    )
    node.add_argument("--log_format", choices=("auto", "json", "console"))
    node.add_argument("--log_level", choices=("debug", "info", "warning", "error"))
    # every default is NodeConfig's: --help shows them, and parse_config gets them from the parser
    p.set_defaults(
        **{
            f.name: f.default_factory() if f.default is msgspec.NODEFAULT else f.default
            for f in msgspec.structs.fields(NodeConfig)
            if f.default is not msgspec.NODEFAULT or f.default_factory is not msgspec.NODEFAULT
        }
    )
    return p


def _compat_help(flag: str) -> str:
    return f"{COMPATIBILITY_ONLY} ({IN_PETALS[flag]})"


def _by_model(flag: str) -> str:
    with_gqa, without = MODEL_DEFAULTS[flag]
    return f" (default: {with_gqa} for models with grouped-query attention, else {without})"


def _file_to_argv(path: str, parser: argparse.ArgumentParser) -> list[str]:
    try:
        return settings_to_argv(read_settings(path), parser, path)
    except OSError as e:
        parser.error(f"argument --config: cannot read {path}: {e.strerror}")
    except (ConfigFileError, UnicodeDecodeError) as e:
        parser.error(f"argument --config: {e}")


def parse_config(argv: Optional[Sequence[str]] = None) -> NodeConfig:
    return read_command_line(argv)[0]


def read_command_line(argv: Optional[Sequence[str]] = None) -> tuple[NodeConfig, list[tuple[str, dict]]]:
    """The configuration, and what the node should say about it at start: (message, fields) pairs."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    first = parser.parse_args(argv)
    notes: list[tuple[str, dict]] = []
    files = [first.config] if first.config else []
    if os.path.isfile(DEFAULT_CONFIG_FILE):  # configargparse's default file, read first
        files.insert(0, DEFAULT_CONFIG_FILE)
        notes.append((f"read ./{DEFAULT_CONFIG_FILE} from the working directory, as Petals does", {"cwd": os.getcwd()}))
    argv = [flag for path in files for flag in _file_to_argv(path, parser)] + argv
    args = parser.parse_args(argv)
    for flag in dict.fromkeys(getattr(args, "compatibility_given", None) or []):
        notes.append((f"--{flag} {COMPATIBILITY_ONLY}", {"flag": f"--{flag}", "in_petals": IN_PETALS[flag]}))

    model = args.model or args.model_pos
    if not model:
        parser.error("the following arguments are required: MODEL (or --model)")
    if args.model and args.model_pos and args.model != args.model_pos:
        parser.error(f"argument --model: conflicts with positional MODEL {args.model_pos!r}")
    if args.custom_module_path is not None:
        parser.error(CUSTOM_MODULE_REFUSED)
    if args.public_ip and not args.port:
        parser.error("argument --public_ip: needs a fixed non-zero --port (e.g. --port 31337)")
    if args.port is not None and args.host_maddrs:
        parser.error("argument --port: cannot be combined with --host_maddrs")
    if args.public_ip and args.announce_maddrs:
        parser.error("argument --public_ip: cannot be combined with --announce_maddrs")
    if args.new_swarm and args.initial_peers:
        parser.error("argument --new_swarm: cannot be combined with --initial_peers")
    if args.num_blocks is not None and args.block_indices is not None:
        parser.error("argument --num_blocks: cannot be combined with --block_indices")
    for device in args.tensor_parallel_devices or ():
        if not DEVICE.match(device):
            parser.error(f"argument --tensor_parallel_devices: {device!r} is not a device (use cpu, cuda or cuda:N)")
    if args.tensor_parallel_devices and len({d.split(":")[0] for d in args.tensor_parallel_devices}) > 1:
        parser.error("argument --tensor_parallel_devices: all devices of a group must be of one kind (cpu or cuda)")
    if args.tensor_parallel_devices:
        gpus = [d if ":" in d else f"{d}:0" for d in args.tensor_parallel_devices if d.startswith("cuda")]
        twice = sorted({d for d in gpus if gpus.count(d) > 1})
        if twice:
            parser.error(
                f"argument --tensor_parallel_devices: {', '.join(twice)} named more than once (cuda is cuda:0); "
                "NCCL cannot run two ranks on one GPU: name each GPU once"
            )

    fields = {f: getattr(args, f) for f in NodeConfig.__struct_fields__ if f != "model" and hasattr(args, f)}
    return NodeConfig(model=model, **fields), notes
