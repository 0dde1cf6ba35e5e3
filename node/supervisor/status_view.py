"""What the status page shows (`/status.json` on the metrics port), built from what the supervisor holds.

Pure: the supervisor calls `build` once a second on its own loop with its process table, its last map of
the swarm (SwarmMap, from the announcer) and its timeline, and the HTTP thread only serializes the
result (node/supervisor/status_server.py). `figures` is also what `python -m node.probe RUN_DIR --stats`
prints for each actor: one selection of the same stats structs, so the page and the probe agree.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import msgspec

from protocol.dht_records import ServerInfo, ServerState
from protocol.messages import SwarmMap


def figures(fields: dict[str, Any]) -> dict[str, Any]:
    """An actor's scalar stats (counts, gauges) in name order: what the probe's table and the page show.
    Per-RPC maps and histograms are left to the metrics."""
    return {k: fields[k] for k in sorted(fields) if not isinstance(fields[k], (dict, list, tuple))}


def actor_rows(actors: dict, now: float) -> list[dict]:
    rows = []
    for name in sorted(actors, key=_actor_order):
        actor = actors[name]
        stats = actor.stats
        rows.append(
            {
                "name": name,
                "pid": actor.pid,
                "ready": actor.ready,
                "restarts": actor.restarts,
                "code": actor.code,
                "heartbeat_age_s": round(max(0.0, now - actor.last_heartbeat), 1) if actor.last_heartbeat else None,
                "figures": figures(msgspec.structs.asdict(stats)) if stats is not None else {},
            }
        )
    return rows


def _actor_order(name: str) -> tuple:
    role, _, index = name.partition(".")
    order = {"announcer": 0, "allocator": 1, "runtime": 2, "frontend": 3, "keeper": 4}
    return (order.get(role, 9), int(index) if index.isdigit() else 0)


def swarm_models(swarm: Optional[tuple[float, SwarmMap]], own_peer: str) -> dict:
    """Each model prefix as one row of blocks with its servers drawn over the spans they hold, and how many
    ONLINE servers hold each block (a gap is a 0)."""
    if swarm is None:
        return {"read_at": None, "error": "", "models": []}
    read_at, view = swarm
    models = []
    for prefix, model in view.models.items():
        servers: dict[str, dict] = {}
        coverage = [0] * model.num_blocks
        for index in sorted(model.blocks):
            for peer, info in model.blocks[index].items():
                if 0 <= index < model.num_blocks and info.state == ServerState.ONLINE:
                    coverage[index] += 1
                entry = servers.get(peer)
                if entry is None:
                    servers[peer] = entry = _server(peer, info, own_peer, index)
                entry["first_seen"] = min(entry["first_seen"], index)
                entry["last_seen"] = max(entry["last_seen"], index)
        for entry in servers.values():  # a record without its span: draw it over the blocks it was found at
            entry["start"] = entry["start"] if entry["start"] is not None else entry["first_seen"]
            entry["end"] = entry["end"] if entry["end"] is not None else entry["last_seen"] + 1
            del entry["first_seen"], entry["last_seen"]
        models.append(
            {
                "prefix": prefix,
                "num_blocks": model.num_blocks,
                "repository": model.repository,
                "servers": sorted(servers.values(), key=lambda s: (s["start"], s["end"], s["peer_id"])),
                "coverage": coverage,
            }
        )
    return {"read_at": read_at, "error": view.error, "models": models}


def _server(peer: str, info: ServerInfo, own_peer: str, index: int) -> dict:
    return {
        "peer_id": peer,
        "this_node": peer == own_peer,
        "state": ServerState(info.state).name.lower(),
        "start": info.start_block,
        "end": info.end_block,
        "throughput": info.throughput,
        "version": info.version,
        "relay": info.using_relay,
        "public_name": info.public_name,
        "cache_tokens_left": info.cache_tokens_left,
        "quant_type": info.quant_type,
        "first_seen": index,
        "last_seen": index,
    }


def build(sup, now_unix: Optional[float] = None) -> dict:
    """The whole page's data from the supervisor (read on its loop thread)."""
    now = time.monotonic()
    now_unix = time.time() if now_unix is None else now_unix
    plan = sup.plan
    return {
        "time": now_unix,
        "node": {
            "state": sup.state_name(),
            "peer_id": plan.peer_id,
            "maddrs": list(sup.maddrs),
            "dht_prefix": plan.dht_prefix,
            "blocks": [plan.start_block, plan.end_block],
            "total_blocks": plan.total_blocks,
            "uptime_s": round(now - sup.started_at, 1),
            "moves": sup.placement.moves,
            "reloads": sup.reload.count,
            "code": sup.code,
        },
        "actors": actor_rows(sup.actors, now),
        "swarm": swarm_models(sup.swarm_map, plan.peer_id),
        "timeline": sup.timeline.as_dict(),
    }
