"""The attention-cache budget behind procs/allocator.py: who holds how many bytes, until when, who waits."""
