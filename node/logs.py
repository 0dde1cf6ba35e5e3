"""Structured logs: one event per line, JSON when stderr is not a terminal.

Every process calls `setup(actor=...)` once; the actor name is bound to every event. Records of
libraries that use the standard logging module (hivemind, transformers) go through the same
renderer, so an operator gets one format from the whole node.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def setup(actor: str, level: str = "info", fmt: str = "auto") -> structlog.stdlib.BoundLogger:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    level_no = _LEVELS.get(level, logging.INFO)
    pid = os.getpid()

    def add_origin(logger, method, event: dict) -> dict:
        # a processor, not contextvars: events from every thread of the process carry the actor name
        event.setdefault("actor", actor)
        event.setdefault("pid", pid)
        return event

    shared = [
        structlog.contextvars.merge_contextvars,
        add_origin,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    logging.captureWarnings(True)  # library warnings become events too, not stray stderr lines
    root.setLevel(level_no)
    # hivemind and p2pd are chatty at INFO about things an operator of this node does not act on
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING" if level_no > logging.DEBUG else "DEBUG")
    for noisy in ("hivemind", "asyncio", "filelock", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(max(level_no, logging.WARNING))
    return structlog.get_logger()


def route_transformers_logs() -> None:
    """transformers prints through a handler of its own; send its records through ours instead
    (call once transformers is imported: it installs that handler on first use)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def quiet_hivemind() -> None:
    """hivemind installs its own colored handler on import; route its records through ours instead."""
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown: with torch and hivemind loaded it takes seconds,
    during which the supervisor (and an operator's stop command) would wait for nothing."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
