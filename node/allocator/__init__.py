"""What the allocator (procs/allocator.py) decides: admission.py (grants, limits, waiting, the directory
of live sessions) over budget.py (the attention-cache and history bytes: who holds how many, until when)."""
