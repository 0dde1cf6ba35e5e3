"""The command line and config file: Petals flag names and defaults, checked values, usage errors."""

from __future__ import annotations

import pytest

from node.supervisor.config import PUBLIC_INITIAL_PEERS, parse_config, parse_size


def parse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_petals_defaults():
    c = parse_config(["some/model"])
    assert c.model == "some/model"
    assert (c.num_handlers, c.update_period, c.request_timeout, c.session_timeout, c.step_timeout) == (
        8,
        120,
        180,
        1800,
        300,
    )
    assert (c.max_alloc_timeout, c.balance_quality, c.mean_balance_check_period, c.compression) == (
        600,
        0.75,
        60,
        "NONE",
    )
    assert c.torch_dtype == "auto" and c.max_chunk_size_bytes == 256 * 1024 * 1024
    assert c.peers == PUBLIC_INITIAL_PEERS
    assert parse_config(["m", "--new_swarm"]).peers == []


def test_model_flag_forms():
    assert parse_config(["--model", "a/b"]).model == "a/b"
    assert parse_config(["--converted_model_name_or_path", "a/b"]).model == "a/b"


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["m", "--num_handlers", "0"], "--num_handlers"),
        (["m", "--block_indices", "5:2"], "--block_indices"),
        (["m", "--block_indices", "abc"], "--block_indices"),
        (["m", "--update_period", "-1"], "--update_period"),
        (["m", "--torch_dtype", "int8"], "--torch_dtype"),
        (["m", "--dht_prefix", "a.b"], "--dht_prefix"),
        (["m", "--compression", "GZIP"], "--compression"),
        (["m", "--max_batch_size", "1.5"], "--max_batch_size"),
        (["m", "--public_ip", "1.2.3.4"], "--public_ip"),
        (["m", "--new_swarm", "--initial_peers", "/ip4/1.2.3.4/tcp/1/p2p/QmX"], "--new_swarm"),
        (["m", "--max_disk_space", "lots"], "--max_disk_space"),
        (["m", "--max_disk_space", "5XB"], "--max_disk_space"),
        (["m", "--max_disk_space", "-5GB"], "--max_disk_space"),
        (["m", "--max_disk_space", "0"], "--max_disk_space"),
        (["m", "--download_attempts", "0"], "--download_attempts"),
    ],
)
def test_invalid_values_name_the_flag(capsys, argv, flag):
    assert flag in parse_error(capsys, argv)


@pytest.mark.parametrize(
    "text, size",
    [
        ("50GB", 50 * 10**9),
        ("100GiB", 100 * 2**30),
        ("1.5 TB", 1.5e12),
        ("512M", 512 * 10**6),
        ("512 MiB", 512 * 2**20),
        ("4096", 4096),
        ("10 bytes", 10),
        ("2k", 2000),
        ("3 gigabytes", 3 * 10**9),
        ("1 tebibyte", 2**40),
        ("7KiB", 7168),
    ],
)
def test_disk_sizes_as_humanfriendly_reads_them(text, size):
    assert parse_size(text) == size
    assert parse_config(["m", "--max_disk_space", text]).max_disk_space == size


def test_download_settings():
    c = parse_config(["m"])
    assert (c.max_disk_space, c.download_attempts) == (None, 5)
    assert parse_config(["m", "--download_attempts", "2"]).download_attempts == 2


def test_missing_model(capsys):
    assert "MODEL" in parse_error(capsys, [])


def test_tensor_parallel_devices(capsys):
    assert parse_config(["m", "--tensor_parallel_devices", "cpu", "cpu"]).tensor_parallel_devices == ["cpu", "cpu"]
    assert parse_config(["m", "--tensor_parallel_devices", "cuda:0", "cuda:1"]).tensor_parallel_devices == [
        "cuda:0",
        "cuda:1",
    ]
    assert "'gpu0' is not a device" in parse_error(capsys, ["m", "--tensor_parallel_devices", "gpu0", "cpu"])
    assert "one kind" in parse_error(capsys, ["m", "--tensor_parallel_devices", "cuda:0", "cpu"])
    assert parse_config(["m", "--tensor_parallel_devices", "cpu", "cpu", "--adapters", "a/b"]).adapters == ["a/b"]


def test_swarm_settings(capsys):
    c = parse_config(["m", "--num_blocks", "3", "--throughput", "eval", "--network_bandwidth", "1000"])
    assert (c.num_blocks, c.throughput, c.network_bandwidth) == (3, "eval", 1000.0)
    assert (c.balance_checks, c.drain_timeout, c.mean_block_selection_delay) == (3, None, 5.0)
    assert (c.shutdown_grace, c.drain_seconds) == (300, 300)  # a move or a reload waits as long as a stop
    assert "--memory_margin" in parse_error(capsys, ["m", "--memory_margin", "1.5"])
    assert "--balance_checks" in parse_error(capsys, ["m", "--balance_checks", "0"])


def test_config_file_and_override(tmp_path):
    path = tmp_path / "node.yml"
    path.write_text(
        "model: some/model\nnum_handlers: 3\nnew_swarm: true\nblock_indices: '1:3'\n"
        "host_maddrs: [/ip4/127.0.0.1/tcp/0]\n"
    )
    c = parse_config(["--config", str(path)])
    assert (c.model, c.num_handlers, c.new_swarm, c.block_indices, c.host_maddrs) == (
        "some/model",
        3,
        True,
        (1, 3),
        ["/ip4/127.0.0.1/tcp/0"],
    )
    c = parse_config(["--config", str(path), "--num_handlers", "5"])
    assert c.num_handlers == 5


def test_config_file_errors_name_the_setting(capsys, tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("model: m\nnum_handlers: zero\n")
    assert "--num_handlers" in parse_error(capsys, ["--config", str(bad)])
    unknown = tmp_path / "unknown.yml"
    unknown.write_text("model: m\nno_such_flag: 1\n")
    assert "no_such_flag" in parse_error(capsys, ["--config", str(unknown)])
    assert "--config" in parse_error(capsys, ["--config", str(tmp_path / "missing.yml")])


def test_each_default_is_written_once():
    """The parser's defaults are NodeConfig's, so the command line, a config file and --help agree."""
    import msgspec

    from node.supervisor.config import COMPATIBILITY_ONLY, NodeConfig, build_parser

    given = parse_config(["m"])
    assert given == NodeConfig(model="m")
    text = build_parser().format_help().split("options:", 1)[1]

    def help_of(flag: str) -> str:
        return " ".join(text.split(f"  {flag} ", 1)[1].split("\n  -", 1)[0].split())

    assert "(default: 8)" in help_of("--num_handlers")
    for flag in ("--prefetch_batches", "--sender_threads", "--min_batch_size"):
        assert COMPATIBILITY_ONLY in help_of(flag)
    assert "grouped-query attention" in help_of("--max_batch_size")
    assert msgspec.structs.fields(NodeConfig)  # the one source
