"""Starting the node: `python -m node.supervisor --model X [flags]` (node/supervisor/__main__.py).

Parse the flags, prepare the run directory, start every actor at once (they import torch while the
rest happens), resolve the model in a child process while p2pd starts, then hand over to the
Supervisor (node/supervisor/supervisor.py) until the node stops.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
from typing import Optional

from node import logs
from node.supervisor.config import NodeConfig, read_command_line
from node.supervisor.processes import ActorProcess, start_actors
from node.supervisor.supervisor import Supervisor


def prepare_run_dir(config: NodeConfig) -> tuple[str, bool]:
    from node.supervisor.resolve import default_run_dir

    own = config.run_dir is None
    run_dir = os.path.abspath(config.run_dir or default_run_dir())
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    status_path = os.path.join(run_dir, "status.json")
    if os.path.exists(status_path):
        try:
            with open(status_path) as f:
                status = json.load(f)
            pid = status.get("supervisor_pid")
            if status.get("state") != "stopped" and pid and pid != os.getpid():
                os.kill(pid, 0)
                usage_error(f"argument --run_dir: {run_dir} is used by a running node (pid {pid})")
        except (OSError, ValueError):
            pass  # a stale run directory from a node that is gone
    for stale in ("plan.json", "plan.json.tmp"):  # actors start before the new plan is written
        if os.path.exists(os.path.join(run_dir, stale)):
            os.remove(os.path.join(run_dir, stale))
    longest = os.path.join(run_dir, "probe.frontend.999.sock")
    if len(longest) > 100:
        usage_error(f"argument --run_dir: {run_dir} is too long for unix sockets")
    return run_dir, own


def usage_error(message: str) -> None:
    sys.stderr.write(f"python -m node.supervisor: error: {message}\n")
    sys.exit(2)


def raise_file_limit(wanted: int, log) -> None:
    if wanted <= 0:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        log.info("raised the open file limit", old=soft, new=new)


def main(argv: Optional[list[str]] = None) -> None:
    config, notes = read_command_line(argv)
    log = logs.setup("supervisor", config.log_level, config.log_format)
    for message, fields in notes:
        log.warning(message, **fields) if "flag" in fields else log.info(message, **fields)
    run_dir, own = prepare_run_dir(config)
    raise_file_limit(config.increase_file_limit, log)
    actors = start_actors(config.num_handlers, max(1, len(config.tensor_parallel_devices or ())), run_dir)
    code = asyncio.run(boot(config, run_dir, own, actors, log))
    logs.exit_now(code)


async def boot(config: NodeConfig, run_dir: str, own: bool, actors: dict[str, ActorProcess], log) -> int:
    """Resolve the model (seconds of imports) while p2pd starts, then supervise."""
    from node.startup import light_hivemind

    light_hivemind()  # the supervisor needs hivemind's P2P, not its torch-based parts
    from node.supervisor.daemon import DaemonError, start_daemon
    from node.supervisor.resolve import ResolveError, resolve_in_child

    daemon = asyncio.get_running_loop().create_task(start_daemon(config, run_dir, log))
    try:
        plan = await resolve_in_child(config, run_dir)
    except ResolveError as e:
        for actor in actors.values():
            actor.kill()
        try:
            await (await daemon).stop()
        except DaemonError:
            pass
        if e.usage:
            usage_error(str(e))
        log.error("cannot resolve the model", error=str(e))
        return 1
    logs.quiet_hivemind()
    try:
        started = await daemon
    except DaemonError as e:
        log.error("cannot start p2pd", error=str(e))
        for actor in actors.values():
            actor.kill()
        return 1
    return await Supervisor(config, plan, log, own, actors, started).run()
