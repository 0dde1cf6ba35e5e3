"""What every actor is told at launch: the node's resolved plan, written once to RUN_DIR/plan.json.

The supervisor resolves the command line and the model (family, dtype, block range, derived
defaults) into one NodePlan; actors read it instead of re-parsing flags, so that they all agree.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import msgspec


class NodePlan(msgspec.Struct, kw_only=True):
    # where the node lives
    run_dir: str
    daemon_maddr: str = ""  # the p2pd control socket that actors attach to
    peer_id: str = ""
    version: str

    # the model and the part of it we serve
    model: str
    revision: Optional[str] = None
    token: Union[str, bool, None] = None  # True: the token `huggingface-cli login` saved
    cache_dir: Optional[str] = None
    max_disk_space: Optional[int] = None  # bytes the weight cache may hold (node/weights/store.py)
    download_attempts: int
    family: str
    dht_prefix: str
    repository: Optional[str] = None
    total_blocks: int
    # the blocks served now; before the supervisor has chosen them (choose_blocks) both are 0
    start_block: int
    end_block: int
    choose_blocks: bool = False  # the range comes from the swarm (PROTOCOL 5.1), not --block_indices
    wanted_blocks: Optional[int] = None  # --num_blocks; None: as many as memory allows (PROTOCOL 5.3)
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    kv_groups: int  # num_key_value_groups as Petals budgets the cache (PROTOCOL 5.6, 5.7)
    torch_dtype: str
    device: str
    # --tensor_parallel_devices: runtime.K serves its shard of the blocks on the K-th; [] without
    tensor_parallel_devices: list[str] = []
    quant_type: str = "none"
    adapters: list[str] = []  # LoRA adapters, by the names given on the command line (node/runtime/lora.py)

    # limits and timeouts (PROTOCOL 5.6-5.9)
    max_batch_size: int
    inference_max_length: int
    attn_cache_tokens: int
    max_chunk_size_bytes: int
    # kept free for backward passes (node/supervisor/resources.py); what autograd saves fits in it
    autograd_bytes: int = 0
    max_alloc_timeout: float
    request_timeout: float
    session_timeout: float
    step_timeout: float
    compression: int  # CompressionType of outputs
    # what strangers may make the node hold (node/frontend/limits.py, the allocator)
    max_sessions: int
    max_sessions_per_peer: int
    max_bytes_in_flight: Optional[int]
    max_peer_bytes_in_flight: Optional[int]
    # host memory for what sessions sent, to rebuild their caches on a replaced runtime; None: enough for
    # every session the cache can hold (node/allocator/budget.py)
    history_bytes: Optional[int] = None

    # swarm
    initial_peers: list[str] = []
    public_name: Optional[str] = None
    throughput: float  # what to announce when throughput_mode is "fixed"
    throughput_mode: str = "fixed"  # or "auto", "eval", "dry_run" (PROTOCOL 5.2)
    network_bandwidth: Optional[float] = None  # Mbit/s
    update_period: float
    expiration: float
    num_handlers: int
    # in the public swarm, ask health.petals.dev whether the node is reachable (PROTOCOL 5.10), unless
    # --skip_reachability_check
    check_public_reachability: bool

    # supervision
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float
    shutdown_grace: float
    log_format: str
    log_level: str

    @property
    def num_blocks(self) -> int:
        return self.end_block - self.start_block

    @property
    def tp_world(self) -> int:
        return max(1, len(self.tensor_parallel_devices))

    def endpoint(self, name: str) -> str:
        return f"ipc://{os.path.join(self.run_dir, name)}"


PLAN_FILE = "plan.json"
# the environment variable through which the supervisor tells a tensor-parallel group where to meet
TP_STORE_ENV = "NODE_TP_STORE"


def write_plan(plan: NodePlan) -> str:
    path = os.path.join(plan.run_dir, PLAN_FILE)
    tmp = path + ".tmp"
    # the plan may hold a hub token: readable by the node's user only
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.json.encode(plan))
    os.replace(tmp, path)
    return path


def read_plan(run_dir: str) -> NodePlan:
    with open(os.path.join(run_dir, PLAN_FILE), "rb") as f:
        return msgspec.json.decode(f.read(), type=NodePlan)
