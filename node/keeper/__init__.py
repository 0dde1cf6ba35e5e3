"""What the stream keeper (procs/keeper.py) decides: table.py (which frontend serves each inference stream,
what is logged for its successor, and who takes a stream over when a frontend dies)."""
