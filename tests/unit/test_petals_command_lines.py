"""Petals operators' command lines, copied from Petals' README, its CI workflow and its own messages, start
the node with the same meaning: each row is `run_server`'s argument list and the settings it must give.
Then what Petals' parser does beyond plain flags: ./config.yml read by default in configargparse's syntax,
--use_auth_token without a value, --compression in any case, --port 0, --device mps, and the flags the
node accepts only for compatibility (named in a warning) or refuses (saying why)."""

from __future__ import annotations

import pytest

from node.supervisor.config import PUBLIC_INITIAL_PEERS, parse_config, read_command_line
from node.supervisor.daemon import listen_maddrs

PEERS = "/ip4/127.0.0.1/tcp/31337/p2p/QmS9KwZptnVdB9FFV7uGgaTq4sEKBwcYeKZDfSpyKDUd1g"  # Petals CI's INITIAL_PEERS
CI = f"bigscience/bloom-560m --device cpu --torch_dtype float32 --initial_peers {PEERS}"  # $RUN_SERVER there

# (where it comes from, the arguments after `python -m petals.cli.run_server`, the settings they must give)
COMMAND_LINES = [
    ("README", "meta-llama/Meta-Llama-3.1-405B-Instruct", {"model": "meta-llama/Meta-Llama-3.1-405B-Instruct"}),
    ("README, Docker", "--port 31330 meta-llama/Meta-Llama-3.1-405B-Instruct", {"port": 31330}),
    (
        "README 2.2.0",
        "petals-team/StableBeluga2",
        {"model": "petals-team/StableBeluga2", "peers": PUBLIC_INITIAL_PEERS},
    ),
    ("README 2.2.0, Llama 2", "meta-llama/Llama-2-70b-chat-hf --token YOUR_TOKEN_HERE", {"token": "YOUR_TOKEN_HERE"}),
    ("README, older", "stabilityai/StableBeluga2 --torch_dtype float16", {"torch_dtype": "float16"}),
    (
        "README, older",
        "--port 31330 enoch/llama-65b-hf --adapters timdettmers/guanaco-65b",
        {"adapters": ["timdettmers/guanaco-65b"]},
    ),
    ("reachability message", "MODEL --public_ip 1.2.3.4 --port 31337", {"public_ip": "1.2.3.4", "port": 31337}),
    (
        "CI, server 1",
        f"{CI} --adapters artek0chumak/bloom-560m-safe-peft --num_blocks 5 --throughput 1 "
        "--mean_balance_check_period 10",
        {"num_blocks": 5, "throughput": 1.0, "mean_balance_check_period": 10.0, "device": "cpu", "peers": [PEERS]},
    ),
    (
        "CI, server 2",
        f"{CI} --adapters --block_indices 0:5 --throughput 1 --identity_path tests/server2.id",
        {"adapters": [], "block_indices": (0, 5), "identity_path": "tests/server2.id"},
    ),
    (
        "CI, server 3",
        f"{CI} --num_blocks 14 --throughput auto --attn_cache_tokens 2048 --max_chunk_size_bytes 1024",
        {"throughput": "auto", "attn_cache_tokens": 2048, "max_chunk_size_bytes": 1024},
    ),
    (
        "CI, server 4",
        f"{CI} --tensor_parallel_devices cpu cpu --block_indices 0:2 --throughput auto",
        {"tensor_parallel_devices": ["cpu", "cpu"], "block_indices": (0, 2)},
    ),
    (
        "CI, older (an abbreviated flag)",
        "--converted_model_name_or_path M --block_indices 0:24 --new_swarm --identity tests/test.id "
        "--host_maddrs /ip4/127.0.0.1/tcp/31337 --throughput 1 --torch_dtype float32 --compression NONE "
        "--attn_cache_tokens 2048",
        {"model": "M", "identity_path": "tests/test.id", "peers": [], "compression": "NONE"},
    ),
    ("wiki FAQ: a gated model", "meta-llama/Llama-2-70b-hf --use_auth_token", {"token": True}),
    ("lower-case compression", "M --compression float16", {"compression": "FLOAT16"}),
    ("a random port", "M --port 0", {"port": 0}),
]


@pytest.mark.parametrize(
    "source, line, expected", COMMAND_LINES, ids=[f"{i}:{row[0]}" for i, row in enumerate(COMMAND_LINES)]
)
def test_petals_command_lines_mean_the_same(source, line, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./config.yml here
    config = parse_config(line.split())
    for key, value in expected.items():
        assert getattr(config, key) == value, (source, key)


def test_use_auth_token_takes_no_value_and_the_model_after_it_stays_the_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = parse_config(["--use_auth_token", "meta-llama/Llama-2-70b-hf"])
    assert (config.model, config.token) == ("meta-llama/Llama-2-70b-hf", True)
    assert parse_config(["m", "--token", "hf_x"]).token == "hf_x"
    assert parse_config(["m"]).token is None


def parse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_port_zero_is_a_random_port_and_cannot_be_announced(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert listen_maddrs(parse_config(["m", "--port", "0"]))[0] == ["/ip4/0.0.0.0/tcp/0", "/ip6/::/tcp/0"]
    assert listen_maddrs(parse_config(["m", "--port", "31330"]))[0] == ["/ip4/0.0.0.0/tcp/31330", "/ip6/::/tcp/31330"]
    assert "fixed non-zero --port" in parse_error(capsys, ["m", "--public_ip", "1.2.3.4", "--port", "0"])
    assert "--port" in parse_error(capsys, ["m", "--port", "-1"])
    assert "--compression" in parse_error(capsys, ["m", "--compression", "gzip"])


def test_config_yml_in_the_working_directory_is_read_in_configargparse_syntax(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yml").write_text(
        "# a Petals operator's file\n"
        "---\n"
        "[server]\n"
        "converted_model_name_or_path = some/model\n"
        "num_handlers: 3\n"
        "block_indices 2:4 ; a comment\n"
        "--torch_dtype float32\n"
        "new_swarm\n"
        "no_auto_relay = false\n"
        "host_maddrs = [/ip4/127.0.0.1/tcp/0, /ip6/::1/tcp/0]\n"
        "public_name = 'my server'\n"
        "compression: float16\n"
    )
    config, notes = read_command_line([])
    assert (config.model, config.num_handlers, config.block_indices, config.torch_dtype) == (
        "some/model",
        3,
        (2, 4),
        "float32",
    )
    assert (config.new_swarm, config.no_auto_relay, config.public_name, config.compression) == (
        True,
        False,
        "my server",
        "FLOAT16",
    )
    assert config.host_maddrs == ["/ip4/127.0.0.1/tcp/0", "/ip6/::1/tcp/0"]
    assert any("config.yml" in message for message, _ in notes)
    # the command line wins over the file, and --config over ./config.yml
    (tmp_path / "other.conf").write_text('num_handlers = 5\nannounce_maddrs = ["/ip4/1.2.3.4/tcp/1"]\n')
    assert parse_config(["--num_handlers", "7"]).num_handlers == 7
    config = parse_config(["--config", "other.conf"])
    assert (config.num_handlers, config.announce_maddrs, config.block_indices) == (5, ["/ip4/1.2.3.4/tcp/1"], (2, 4))


def test_config_files_keep_what_the_node_read_before(tmp_path, monkeypatch):
    """A .json map and YAML block lists, which the node's --config took before it read Petals' syntax."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "node.json").write_text('{"model": "m", "new_swarm": true, "host_maddrs": ["/ip4/127.0.0.1/tcp/0"]}')
    config = parse_config(["--config", "node.json"])
    assert (config.model, config.new_swarm, config.host_maddrs) == ("m", True, ["/ip4/127.0.0.1/tcp/0"])
    (tmp_path / "node.yml").write_text("model: m\nhost_maddrs:\n  - /ip4/127.0.0.1/tcp/0\n  - /ip6/::1/tcp/0\n")
    assert parse_config(["--config", "node.yml"]).host_maddrs == ["/ip4/127.0.0.1/tcp/0", "/ip6/::1/tcp/0"]


@pytest.mark.parametrize(
    "text, words",
    [
        ("no_such_flag = 1\n", "no_such_flag"),
        ("new_swarm = maybe\n", "true or false"),
        ("block_indices = [1, 2]\n", "takes one value"),
        ("num_handlers = zero\n", "--num_handlers"),
    ],
)
def test_config_file_errors_name_the_setting(text, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yml").write_text("model = m\n" + text)
    assert words in parse_error(capsys, [])


def test_compatibility_only_flags_are_named_at_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yml").write_text("sender_threads = 2\n")
    config, notes = read_command_line(
        ["m", "--prefetch_batches", "4", "--min_batch", "2"]
    )  # abbreviated, as argparse allows
    flags = [fields["flag"] for _, fields in notes if "flag" in fields]
    assert sorted(flags) == ["--min_batch_size", "--prefetch_batches", "--sender_threads"]
    assert all("in Petals" in fields["in_petals"] for _, fields in notes if "flag" in fields)
    assert (config.prefetch_batches, config.sender_threads, config.min_batch_size) == (4, 2, 2)
    (tmp_path / "config.yml").unlink()
    assert [fields for _, fields in read_command_line(["m"])[1]] == []


def test_custom_module_path_is_refused_saying_why(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "module.py").write_text("raise SystemExit('the node must not run this')\n")
    error = parse_error(capsys, ["m", "--custom_module_path", "module.py"])
    assert "--custom_module_path" in error and "hivemind MoE expert" in error
    assert "--custom_module_path" in parse_error(capsys, ["m", "--custom_module_path", "missing.py"])


def test_device_mps_where_torch_has_it_and_a_clear_error_where_not(monkeypatch):
    from node.supervisor import resolve

    monkeypatch.setattr(resolve, "cuda_available", lambda: False)
    monkeypatch.setattr(resolve, "mps_available", lambda: False)
    with pytest.raises(resolve.PlanError, match="--device: mps requested but this torch cannot use an Apple GPU"):
        resolve.resolve_device("mps")
    assert resolve.resolve_device(None) == "cpu"
    monkeypatch.setattr(resolve, "mps_available", lambda: True)
    assert resolve.resolve_device("mps") == resolve.resolve_device("mps:0") == "mps"
    assert resolve.resolve_device(None) == "mps"  # Petals' default on Apple machines without CUDA
    assert resolve.resolve_dtype("bfloat16", None, "mps") == "float16"  # as Petals: no bfloat16 on MPS
    monkeypatch.setattr(resolve, "cuda_available", lambda: True)
    assert resolve.resolve_device(None) == "cuda"
    with pytest.raises(resolve.PlanError, match="cpu, cuda, cuda:N or mps"):
        resolve.resolve_device("tpu")
