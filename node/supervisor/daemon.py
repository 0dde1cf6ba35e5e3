"""The node's p2pd daemon: started by the supervisor so that the peer id outlives every actor.

We start the hivemind p2pd binary ourselves (rather than through P2P.create) so that it dies with
the supervisor even on kill -9 (PR_SET_PDEATHSIG), sits outside the terminal's process group (a
Ctrl-C reaches only the supervisor, which then shuts down in order), and keeps its control socket in
the run directory. Actors attach with P2P.replicate(control_maddr).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Optional, Sequence

from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.control import DEFAULT_MAX_MSG_SIZE, DaemonConnector
from hivemind.p2p.p2p_daemon_bindings.utils import raise_if_failed, read_pbmsg_safe, write_pbmsg
from hivemind.proto import p2pd_pb2
from hivemind.utils.multiaddr import Multiaddr

from node.startup import die_with_parent
from node.supervisor.config import NodeConfig


class DaemonError(RuntimeError):
    pass


def listen_maddrs(config: NodeConfig) -> tuple[list[str], Optional[list[str]]]:
    if config.host_maddrs:
        host = list(config.host_maddrs)
    elif config.port:
        host = [f"/ip4/0.0.0.0/tcp/{config.port}", f"/ip6/::/tcp/{config.port}"]
    else:
        host = ["/ip4/0.0.0.0/tcp/0", "/ip6/::/tcp/0"]
    announce = list(config.announce_maddrs) if config.announce_maddrs else None
    if config.public_ip:
        announce = [f"/ip4/{config.public_ip}/tcp/{config.port}"]
    return host, announce


@dataclass
class Daemon:
    proc: asyncio.subprocess.Process
    control_maddr: str
    client: P2P  # the supervisor's own attachment: peer id and visible addresses
    log_task: Optional[asyncio.Task] = None
    lines: list = field(default_factory=list)

    @property
    def peer_id(self) -> str:
        return self.client.peer_id.to_base58()

    async def visible_maddrs(self) -> list[str]:
        return [str(m) for m in await self.client.get_visible_maddrs(latest=True)]

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def remove_stream_handlers(self, listen_maddr: str, names: Sequence[str]) -> None:
        """Unregister the stream handlers of an attached process that died.

        p2pd drops a client's unary handlers when its control connection closes, but it keeps a
        (balanced) stream handler and goes on dialing the dead client's socket: after a frontend
        restart, every other stream call (rpc_inference, *_stream) would fail or hang.
        """
        address = Multiaddr(listen_maddr)
        reader, writer = await DaemonConnector(Multiaddr(self.control_maddr)).open_connection()
        try:
            request = p2pd_pb2.Request(
                type=p2pd_pb2.Request.REMOVE_STREAM_HANDLER,
                removeStreamHandler=p2pd_pb2.RemoveStreamHandlerRequest(addr=address.to_bytes(), proto=list(names)),
            )
            await write_pbmsg(writer, request)
            response = p2pd_pb2.Response()
            await read_pbmsg_safe(reader, response)
        finally:
            writer.close()
        raise_if_failed(response)
        try:
            os.remove(address["unix"])  # a process killed with -9 leaves its socket file behind
        except (OSError, KeyError, TypeError):
            pass

    async def stop(self, timeout: float = 5.0) -> None:
        if self.log_task is not None:
            self.log_task.cancel()
        self.client._terminate()  # closes our client sockets; the daemon is ours to stop below
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def start_daemon(config: NodeConfig, run_dir: str, log) -> Daemon:
    peers = config.peers
    host, announce = listen_maddrs(config)
    socket_path = os.path.join(run_dir, "p2pd.sock")
    if os.path.exists(socket_path):
        os.remove(socket_path)
    control_maddr = f"/unix{socket_path}"

    kwargs = {"dhtServer": 1, "hostAddrs": ",".join(host)}
    if peers:
        kwargs["bootstrapPeers"] = ",".join(peers)
    if announce:
        kwargs["announceAddrs"] = ",".join(announce)
    if config.identity_path:
        if os.path.isfile(config.identity_path):
            if peers and await P2P.is_identity_taken(
                config.identity_path,
                initial_peers=peers,
                tls=True,
                use_auto_relay=False,
                use_ipfs=False,
                use_relay=True,
            ):
                raise DaemonError(f"identity {config.identity_path} is already used by another peer in the swarm")
        else:
            P2P.generate_identity(config.identity_path)
        kwargs["id"] = config.identity_path
    args = P2P._make_process_args(
        str(files("hivemind.hivemind_cli") / "p2pd"),
        autoRelay=not config.no_auto_relay,
        autonat=True,
        b=bool(peers),
        connManager=True,
        idleTimeout="30s",
        listen=control_maddr,
        natPortMap=True,
        relay=True,
        relayHopLimit=0,
        tls=True,
        persistentConnMaxMsgSize=DEFAULT_MAX_MSG_SIZE,
        **kwargs,
    )
    env = dict(os.environ, GOLOG_LOG_FMT="json")
    env.setdefault("GOLOG_LOG_LEVEL", "error")
    began = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        preexec_fn=die_with_parent,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        await asyncio.wait_for(_wait_started(proc, lines), config.daemon_startup_timeout)
    except (asyncio.TimeoutError, DaemonError) as e:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        detail = lines[-1] if lines else "no output"
        raise DaemonError(f"p2pd did not start: {e or 'timeout'} ({detail})") from None
    client = await P2P.replicate(Multiaddr(control_maddr))
    daemon = Daemon(proc, control_maddr, client, lines=lines)
    daemon.log_task = asyncio.get_running_loop().create_task(_drain_output(proc, log))
    log.info("p2pd started", peer_id=daemon.peer_id, pid=proc.pid, seconds=round(time.perf_counter() - began, 2))
    return daemon


async def _wait_started(proc: asyncio.subprocess.Process, lines: list) -> None:
    while True:
        line = await proc.stdout.readline()
        if not line:
            raise DaemonError("p2pd exited")
        text = line.decode(errors="replace").rstrip()
        lines.append(text)
        if text.startswith("Peer ID:"):
            return


async def _drain_output(proc: asyncio.subprocess.Process, log) -> None:
    """p2pd blocks if nobody reads its output; its lines become debug events."""
    while True:
        line = await proc.stdout.readline()
        if not line:
            return
        log.debug("p2pd", line=line.decode(errors="replace").rstrip())
