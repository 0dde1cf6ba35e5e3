"""Every message that crosses a process boundary inside the node.

A message travels as one msgpack header frame (one of the Structs below, tagged by class name),
followed by one raw frame per entry of its `tensors` list, in order. Tensors are never pickled.

Sockets and who may send what on them:
- control plane: supervisor ROUTER <-> one DEALER per actor (identity = actor name)
- runtime inbox: runtime ROUTER <- frontends' and the allocator's DEALERs
- allocator inbox: allocator ROUTER <- frontends' and the announcer's DEALERs
- announcer inbox: announcer ROUTER <- frontends' DEALERs
- kept streams and calls: the stream keeper's ROUTER <-> frontends' DEALERs (identity = frontend name); the
  keeper holds every rpc_inference stream's p2pd connection and every unary call, and relays their
  frames (procs/keeper.py)
- tensor-parallel group: runtime.0's PUSH -> each other rank's PULL (its work, in order)
- probe plane: every actor's XPUB -> `python -m node.probe`
"""

from __future__ import annotations

from typing import Any, Optional, Union

import msgspec

from protocol.dht_records import ServerInfo


class TensorMeta(msgspec.Struct, array_like=True, frozen=True):
    """Header of one raw tensor frame: torch dtype name without "torch." and the shape."""

    dtype: str
    shape: tuple[int, ...]


class Message(msgspec.Struct, tag_field="type", tag=True, omit_defaults=True):
    pass


# --- what each actor tells the supervisor when it is ready ----------------------------------------


class ReadyDetail(msgspec.Struct, tag_field="role", tag=True, kw_only=True):
    pass


class FrontendReady(ReadyDetail):
    peer_id: str
    stream_maddr: str  # where p2pd dials this frontend's stream handlers (removed if it dies)
    stream_handlers: list[str]


class KeeperReady(ReadyDetail):
    peer_id: str
    stream_maddr: str  # where p2pd dials the keeper's stream handler (removed if it dies)
    stream_handlers: list[str]


class AnnouncerReady(ReadyDetail):
    peer_id: str
    using_relay: bool  # only relays reach the node (PROTOCOL 5.10)


class AllocatorReady(ReadyDetail):
    capacity_bytes: int
    tokens: int


class RuntimeReady(ReadyDetail):
    blocks: tuple[int, int]
    dtype: str
    rank: int = 0
    device: str = ""


# --- what each actor counts, sent in every heartbeat (node/supervisor/metrics.py, node.probe --stats) --
# Counters only grow within one process; the supervisor keeps what a replaced process had counted.


class ActorStats(msgspec.Struct, tag_field="role", tag=True, kw_only=True):
    pass


class LatencyHistogram(msgspec.Struct):
    """Counts per bucket of LATENCY_BUCKETS (the last one: above them all), their sum and count."""

    buckets: list[int]
    sum: float = 0.0
    count: int = 0


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds


class FrontendStats(ActorStats):
    in_flight: int = 0  # requests being handled
    sessions: int = 0  # inference sessions open
    calls: dict[str, int] = {}  # per RPC
    errors: dict[str, int] = {}  # per RPC
    refused: dict[str, int] = {}  # requests refused by a limit, per reason (node_refused_total)
    bytes_in_flight: int = 0  # request bytes reserved by this frontend
    recovered: int = 0  # sessions rebuilt on a replaced runtime (their times: latency["session_recovery"])
    history_bytes: int = 0  # what open sessions sent, held to rebuild their caches (node/frontend/history.py)
    latency: dict[str, LatencyHistogram] = {}  # per RPC, and "inference_step"


class RuntimeStats(ActorStats):
    """runtime.0, which runs every round of the node."""

    done: int = 0  # tasks answered with a result
    tokens: int = 0  # tokens of the tasks answered with a result (batch x length of their inputs)
    failed: int = 0  # tasks answered with a failure
    rounds: int = 0
    round_sessions: int = 0  # requests in the last round
    round_tokens: int = 0  # tokens in the last round
    busy_seconds: float = 0.0
    round_sizes: dict[str, int] = {}  # rounds by how many requests ran together
    queue: int = 0  # tasks waiting
    in_progress: int = 0  # inference steps and forwards under way (chunked over rounds)
    sessions: int = 0  # attention caches held
    blocks_held: int = 0
    sessions_outside: int = 0  # sessions on blocks outside the announced range (during a move)
    free_memory: Optional[int] = None  # bytes free on the device
    refused: dict[str, int] = {}  # work refused by a limit (a full queue), per reason


class RankStats(ActorStats):
    """runtime.K > 0 of a tensor-parallel group."""

    rounds: int = 0
    backwards: int = 0
    busy_seconds: float = 0.0
    sessions: int = 0


class AllocatorStats(ActorStats):
    refused: dict[str, int] = {}  # sessions refused by a limit, per reason
    used_bytes: int = 0
    capacity_bytes: int = 0
    tokens_used: int = 0  # in Petals' cache_tokens_left unit
    tokens_left: int = 0
    sessions: int = 0
    waiting: int = 0
    history_bytes: int = 0  # history memory reserved (node/allocator/budget.py)
    history_capacity: int = 0
    sessions_without_history: int = 0  # without history room at grant or since: they cannot survive a runtime restart


class KeeperStats(ActorStats):
    streams: int = 0  # rpc_inference streams held
    kept: int = 0  # ... of which a frontend's crash would not end (their messages are logged)
    log_bytes: int = 0  # what those logs hold
    resumed: int = 0  # streams handed to another frontend after theirs died
    calls: int = 0  # unary calls held (waiting for a frontend's answer)
    calls_resent: int = 0  # unary calls sent again to another frontend after theirs died
    refused: dict[str, int] = {}  # messages refused by a limit, per reason (node_refused_total)
    bytes_in_flight: int = 0  # bytes of messages read and not yet handled by a frontend
    # inference steps from a client message read to its reply written, and the runtime's compute in them:
    # the difference is the fixed cost the node adds to a step (node_step_overhead_seconds)
    steps_timed: int = 0
    step_seconds: float = 0.0
    step_compute_seconds: float = 0.0


class AnnouncerStats(ActorStats):
    state: int = -1  # the ServerState announced last; -1 before the first
    stored: int = 0  # announcements stored


# --- control plane: actor -> supervisor -------------------------------------------------------


class Ready(Message):
    """The actor has finished starting and serves its role."""

    name: str
    pid: int
    detail: Union[FrontendReady, KeeperReady, AnnouncerReady, AllocatorReady, RuntimeReady]
    code: str = ""  # the version of the project's code this process runs (procs/actor.py code_version)


class Heartbeat(Message):
    name: str
    stats: Union[FrontendStats, RuntimeStats, RankStats, AllocatorStats, AnnouncerStats, KeeperStats, None] = None
    pid: int = (
        0  # which process of the actor counted `stats` (node/supervisor/metrics.py keeps counters across restarts)
    )


class Fatal(Message):
    """The actor cannot work and restarting it will not help (bad weights, bad configuration)."""

    name: str
    reason: str


class Announced(Message):
    """The announcer stored a state in the DHT (or failed to)."""

    state: int
    ok: bool
    error: str = ""


class Measured(Message):
    """Runtime -> supervisor, before any block loads: what the device holds and how fast a block runs
    there (PROTOCOL 5.2-5.4). The rps fields are None unless throughput is measured (auto, eval, dry_run)."""

    device_type: str
    device_memory: int  # bytes: the device's total (a CPU's: the host's RAM)
    available_memory: int  # bytes free now
    block_params: int
    quant_type: str = "none"  # what the runtime serves: the plan's, or none if the device cannot run it
    adapter_bytes: int = 0  # LoRA weights the adapters add to a block (PROTOCOL 5.3)
    inference_rps: Optional[float] = None
    forward_rps: Optional[float] = None
    network_rps: Optional[float] = None
    num_devices: int = 1  # tensor parallelism: device_memory is then the smallest device's times this


class BlocksLoaded(Message):
    """Runtime -> supervisor: the blocks of a LoadBlocks sent while serving are in memory (or not)."""

    start_block: int
    end_block: int
    ok: bool = True
    error: str = ""


class SwarmView(Message):
    """Announcer -> supervisor: every valid server record of the model's blocks, read as clients read
    them (latest=True). blocks[index][peer id] = its record; `error` when the DHT failed."""

    req: int
    blocks: dict[int, dict[str, ServerInfo]] = {}
    error: str = ""


class ModelServers(Message):
    """One model of the swarm as its `_petals.models` record and its block records say."""

    num_blocks: int
    repository: Optional[str] = None
    blocks: dict[int, dict[str, ServerInfo]] = {}


class SwarmMap(Message):
    """Announcer -> supervisor, for the status page: every model prefix the swarm announces (ours first,
    at most MAX_MODELS) with its servers per block; `error` when the DHT failed."""

    req: int
    models: dict[str, ModelServers] = {}
    error: str = ""


# --- control plane: supervisor -> actor -------------------------------------------------------


class Stop(Message):
    """Finish or fail in-flight work within `grace` seconds, then exit 0."""

    grace: float = 0.0


class Retire(Message):
    """A frontend's replacement is serving (a reload): take no new calls or streams, serve the open ones
    until they end or `timeout` seconds pass (then the inference sessions are left to the stream keeper,
    which hands them over, and the other calls get their final error), and exit."""

    timeout: float


class PeerDown(Message):
    """Actor `name` died: fail whatever waits on it (a replacement is on its way). `pid`: the process that
    died (0: unknown), so that news arriving after its replacement's hello is not taken for the latter's."""

    name: str
    pid: int = 0


class PeerUp(Message):
    """The replacement of actor `name` is ready: tell it what it must know (e.g. cache grants)."""

    name: str


class Announce(Message):
    """Supervisor -> announcer: publish this state for this block range now, then keep refreshing it.
    `retire` is a range the node no longer serves: announced OFFLINE once, then left to expire."""

    state: int
    start_block: int
    end_block: int
    throughput: float = 0.0
    inference_rps: Optional[float] = None
    forward_rps: Optional[float] = None
    network_rps: Optional[float] = None
    quant_type: str = ""  # as served (the runtime may have fallen back); empty: the plan's
    retire: Optional[tuple[int, int]] = None


class LoadBlocks(Message):
    """Supervisor -> runtime: the swarm has been told we are JOINING; load these blocks now, quantized as
    quant_type says (what rank 0 measured it can run: every rank of a group loads the same way)."""

    start_block: int = -1
    end_block: int = -1
    quant_type: str = ""  # "": the plan's


class Serve(Message):
    """Supervisor -> frontends and allocator: the node's blocks are now [start_block, end_block)."""

    start_block: int
    end_block: int


class DropBlocks(Message):
    """Supervisor -> runtime after a move: free every block outside [start_block, end_block)."""

    start_block: int
    end_block: int


class SwarmQuery(Message):
    """Supervisor -> announcer: read the swarm's records of every block of the model (SwarmView)."""

    req: int


class SwarmMapQuery(Message):
    """Supervisor -> announcer: read every model the swarm announces, for the status page (SwarmMap)."""

    req: int


# --- runtime inbox ----------------------------------------------------------------------------


class Forward(Message):
    """Frames: hidden_states [B, T, H], prompts ([0] or [n_blocks, B|1, P, H])."""

    req: int
    start: int
    end: int
    tensors: list[TensorMeta]
    adapter: str = ""
    peer: str = ""  # the client: the runtime takes work fairly across peers
    points: float = 0.0  # Petals' priority: a peer's own requests with more points go first


class Backward(Message):
    """Frames: inputs [B, T, H], grad_outputs [B, T, H], prompts ([0] or [n_blocks, B|1, P, H])."""

    req: int
    start: int
    end: int
    tensors: list[TensorMeta]
    adapter: str = ""
    peer: str = ""
    points: float = 0.0


class InferStep(Message):
    """One step of an inference session. Frames: hidden_states [B, T, H], prompts, hypo_ids ([0] or [B]).

    `position` is how many cached tokens to keep before this step (rollback when smaller than before).
    The runtime creates the cache of `handle` on the first step (position 0) and drops it on DropCache.
    """

    req: int
    session: str
    handle: int
    start: int
    end: int
    position: int
    max_length: int
    batch: int
    tensors: list[TensorMeta]
    step: str = ""
    adapter: str = ""
    peer: str = ""


class Cancel(Message):
    """The requester no longer waits for `req` (client gone): skip it if it has not started."""

    req: int


class DropCache(Message):
    """Allocator -> runtime: these cache handles are released; free their tensors."""

    handles: list[int]


class Result(Message):
    req: int
    tensors: list[TensorMeta]
    compute_us: int = 0  # the blocks' compute for it (every round it took part in), for the node's fixed cost


SHUTTING_DOWN = "the server is shutting down; retry on another server"  # what clients are told on a graceful stop


class Failure(Message):
    """The request failed; `error` is meant for the Petals client and names what was wrong. `restarting`:
    it failed because the runtime is being replaced, and its replacement will take it (frontends send it
    again, after rebuilding the sessions' caches)."""

    req: int
    error: str
    restarting: bool = False
    cache_missing: bool = False  # an inference step whose session's cache this runtime does not hold


# --- allocator inbox --------------------------------------------------------------------------


class Allocate(Message):
    """Reserve KV cache for a session: `batch` x `max_length` tokens in each of `blocks` blocks.

    Wait up to `timeout` seconds for room; the grant lapses `lease` seconds after it is made.
    """

    req: int
    session: str
    batch: int
    max_length: int
    blocks: int
    timeout: float = 0.0
    lease: float = 1800.0
    peer: str = ""  # the client, for the limit of sessions per peer
    # a session handed over by the stream keeper: a grant its dead frontend still holds for the same
    # session and client is taken over (the news of that frontend's death may not have come yet)
    resumed: bool = False


class Granted(Message):
    req: int
    handle: int
    history: int = 0  # bytes of history memory reserved beside the cache; 0: the session cannot be rebuilt


class Release(Message):
    handle: int


class GrowHistory(Message):
    """The history memory held for grant `handle` grows to `bytes` in all (a session's deep prompts came
    beside its hidden states). Answered with Granted, or with Failure when there is no room: the grant
    then holds no history (the session cannot be rebuilt, and its history bytes go back to the others)."""

    req: int
    handle: int
    bytes: int


class Adopt(Message):
    """A frontend tells a (new) allocator about the grants it still holds, so accounting survives."""

    handle: int
    session: str
    batch: int
    max_length: int
    blocks: int
    expires_in: float
    peer: str = ""
    history: int = 0  # bytes of history memory it holds


class CapacityQuery(Message):
    req: int


class Capacity(Message):
    req: int
    bytes_left: int
    tokens_left: int  # DHT units: one K or V row of one block (PROTOCOL 5.7)
    tokens_available: int  # rpc_info units: K+V of one block at batch 1
    sessions: int


class PushRoute(Message):
    """A frontend got rpc_push for `session`: deliver the request (one frame) to the frontend owning it."""

    session: str


class PushDelivery(Message):
    """Allocator -> owning frontend: a pushed step for `session` (one frame: serialized ExpertRequest)."""

    session: str


# --- announcer inbox: announcer ROUTER <- frontends' DEALERs ---------------------------------------


class ServingQuery(Message):
    """Does the swarm show `peer` serving blocks [start, end)? (before a push to it, PROTOCOL 3.7)"""

    req: int
    peer: str
    start: int
    end: int


class Serving(Message):
    req: int
    serving: bool


# --- tensor-parallel group: runtime.0's PUSH -> the PULL of each other rank -------------------
# Rank 0 validates and schedules; the other ranks repeat its computations on their shards in the
# same order (their reductions pair up with rank 0's), so these carry only what a shard needs.


class ShardWork(msgspec.Struct, array_like=True, frozen=True):
    """One compute.Work of a round. Its frames, in order: hidden, prompts if `prompts`, hypo_ids if
    `hypo_ids` (the session's cache is reordered before the round, as rank 0 did on admission)."""

    first: int
    n_blocks: int
    past: int
    handle: int  # -1: no cache (a forward request)
    batch: int = 0
    max_length: int = 0
    start: int = 0
    end: int = 0
    prompts: bool = False
    hypo_ids: bool = False


class GroupRun(Message):
    works: list[ShardWork]
    tensors: list[TensorMeta]
    adapter: str = ""


class GroupBackward(Message):
    """Frames: inputs, grad_outputs, prompts ([0] when none)."""

    first: int
    n_blocks: int
    tensors: list[TensorMeta]
    adapter: str = ""


class GroupDrop(Message):
    handles: list[int]


class GroupStop(Message):
    """Rank 0 has drained: nothing more will come."""


# --- kept streams: the stream keeper <-> frontends (procs/keeper.py, node/keeper/) --------------
#
# A stream's frames travel one per message: the marker in the header (0 message, 1 error), the payload
# as one raw frame. `handled` counts the client's messages a frontend has answered or dropped (pushes
# excluded): what a replacement frontend must only record, not answer again, if this one dies.


class KeeperHello(Message):
    """Frontend -> keeper: this process (`pid`) takes new streams, or no longer does (`accepting`: a
    retirement or a drain; `draining`: the node is stopping, so a new stream is refused)."""

    frontend: str
    pid: int
    accepting: bool = True
    draining: bool = False


class StreamOpen(Message):
    """Keeper -> frontend: serve this stream. Frames: the client's messages so far when it is handed over
    from a frontend that died (`markers` gives each one's marker); its first `handled` were answered."""

    stream: int
    peer: str
    handled: int = 0
    markers: list[int] = []


class StreamIn(Message):
    """Keeper -> frontend: the client's next message (one frame)."""

    stream: int
    marker: int


class StreamInEnd(Message):
    """Keeper -> frontend: the client's input was cut (its connection closed with no end-of-input)."""

    stream: int


class StreamOut(Message):
    """Frontend -> keeper: a frame for the client (one frame); `handled` as of this frame."""

    stream: int
    marker: int
    handled: int
    compute_us: int = 0  # the runtime's compute for the step this frame answers (first frame of a reply)


class StreamHandled(Message):
    """Frontend -> keeper: a client message was handled with nothing to send (a step sent twice)."""

    stream: int
    handled: int


class StreamKeep(Message):
    """Frontend -> keeper: how many bytes of this session's messages to log (2x its history reservation,
    in the widest dtype a client sends); 0: do not log it, a frontend's crash ends it (a session whose
    history is not held, or one answered through a push, whose order a replay cannot rebuild)."""

    stream: int
    budget: int


class StreamDone(Message):
    """Frontend -> keeper: the reply is complete; close the stream."""

    stream: int


# Unary calls (rpc_info, rpc_forward, rpc_backward, rpc_push) are held by the keeper too: p2pd leaves a
# unary call waiting for good when the process that registered its handler dies, so the keeper (which
# outlives frontends) registers them and relays each call to a frontend, and to another if that one dies.


class UnaryCall(Message):
    """Keeper -> frontend: answer this call (`rpc`: the RPC's name, e.g. "rpc_forward"); frames: the request
    as p2pd delivered it (a serialized protobuf), or a forward or backward stream's messages, in order."""

    call: int
    rpc: str
    peer: str


class UnaryCancel(Message):
    """Keeper -> frontend: the call's caller is gone (p2pd cancelled it), or its time is up: stop its work."""

    call: int


class UnaryReply(Message):
    """Frontend -> keeper: the call's response (frames: the serialized protobuf, or a stream's messages in
    order), or `error`: what the caller is told, the repr of what a unary RPC raised (p2pd gives it as the
    call's error, as hivemind's handlers do) or its str for a stream (the text of the error frame), or
    `again`: a retiring frontend (a reload) gives the call up at its --drain_timeout: ask another."""

    call: int
    error: Optional[str] = None
    again: bool = False


# --- probe plane: every actor's XPUB -> python -m node.probe -------------------------------------


class ProbeEvent(msgspec.Struct, omit_defaults=True):
    """What an actor publishes for probes: a message header it sent or received, or its stats."""

    actor: str
    t: float
    dir: str  # "in", "out", "stats", or "run" (the runtime starting a round)
    type: str
    session: str = ""
    req: int = -1
    fields: dict[str, Any] = {}  # any message's header fields, or any actor's stats: the probe shows what crossed


ControlToSupervisor = Union[Ready, Heartbeat, Fatal, Announced, Measured, SwarmView, SwarmMap, BlocksLoaded]
ControlToActor = Union[
    Stop, Retire, PeerDown, PeerUp, Announce, LoadBlocks, Serve, SwarmQuery, SwarmMapQuery, DropBlocks
]
RuntimeInbox = Union[Forward, Backward, InferStep, Cancel, DropCache]
RuntimeReply = Union[Result, Failure]
AllocatorInbox = Union[Allocate, Release, GrowHistory, Adopt, CapacityQuery, PushRoute]
AllocatorReply = Union[Granted, Failure, Capacity, PushDelivery]
AnnouncerInbox = Union[ServingQuery]
AnnouncerReply = Union[Serving]
GroupInbox = Union[GroupRun, GroupBackward, GroupDrop, GroupStop]
KeeperInbox = Union[KeeperHello, StreamOut, StreamHandled, StreamKeep, StreamDone, UnaryReply]
KeeperToFrontend = Union[StreamOpen, StreamIn, StreamInEnd, UnaryCall, UnaryCancel]
