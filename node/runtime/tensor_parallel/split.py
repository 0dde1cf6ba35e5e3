"""How a tensor-parallel group divides a block (pure arithmetic, no torch: the supervisor checks a
model against `--tensor_parallel_devices` before anything starts).

Query heads are split evenly. KV heads are split evenly too, each rank keeping whole groups (a KV
head and the query heads that read it); a model with one KV head (multi-query) keeps it on every
rank instead. MLP columns (and each expert's) are split evenly. Anything else is refused: uneven
shards would make the fastest rank wait for the slowest at every reduction.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Heads(NamedTuple):
    q0: int
    q1: int
    kv0: int
    kv1: int


def head_split(num_heads: int, num_kv_heads: int, world: int) -> list[Heads]:
    if num_heads % world:
        raise ValueError(f"{num_heads} attention heads cannot be split evenly over {world} devices")
    if num_kv_heads % world == 0:
        groups, per = num_heads // num_kv_heads, num_kv_heads // world
        return [Heads(r * per * groups, (r + 1) * per * groups, r * per, (r + 1) * per) for r in range(world)]
    if num_kv_heads == 1:
        per = num_heads // world
        return [Heads(r * per, (r + 1) * per, 0, 1) for r in range(world)]
    raise ValueError(f"{num_kv_heads} KV heads cannot be split evenly over {world} devices (each keeps whole groups)")


def even_split(size: int, world: int, what: str) -> list[tuple[int, int]]:
    if size % world:
        raise ValueError(f"{what} of {size} cannot be split evenly over {world} devices")
    per = size // world
    return [(r * per, (r + 1) * per) for r in range(world)]


def mlp_width(config: Any) -> int:
    """The width of the columns split in the MLP (each expert's, for mixture-of-experts)."""
    if config.model_type == "bloom":
        return 4 * config.hidden_size
    if config.model_type == "falcon":
        return config.ffn_hidden_size
    return config.intermediate_size


def check_split(config: Any, geometry, world: int) -> None:
    """ValueError naming what does not divide, if the model cannot be split over `world` devices."""
    head_split(geometry.num_heads, geometry.num_kv_heads, world)
    even_split(mlp_width(config), world, "the MLP width")


def kv_heads_per_rank(num_heads: int, num_kv_heads: int, world: int) -> int:
    """KV heads held by the busiest rank: what one session's cache costs on one device (PROTOCOL 5.7)."""
    if world <= 1:
        return num_kv_heads
    split = head_split(num_heads, num_kv_heads, world)
    return max(h.kv1 - h.kv0 for h in split)
