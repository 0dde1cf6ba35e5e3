"""Tensor parallelism (PROTOCOL 5.13): split.py says how a block divides over the ranks (pure arithmetic,
also used by the supervisor), shard.py holds a rank's share and its reductions, group.py is a runtime's
membership in the group (the torch.distributed reductions and rank 0's pushes)."""
