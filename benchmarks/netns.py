"""Emulated hosts on one machine: a network namespace per host, linked to one bridge, each link capped.

    with TestNetwork([HostSpec("peer-1", 100), HostSpec("miner-1", 1000)]) as net:
        net.spawn("peer-1", ["ray", "start", ...])   # a process inside the host
        net.counters()                               # bytes each host sent and received so far

The bridge lives in the root namespace with address BRIDGE_IP, so processes of
this machine (a Ray head, the benchmark's driver) reach every host directly and
uncapped. Host i has address 198.18.0.(10+i) on its interface eth0, in the range
RFC 2544 reserves for benchmarks. A host's cap holds in each direction: tc's
token bucket on its eth0 (what it sends) and on the bridge's end of its link
(what it receives).

Counters are read on the bridge's end of each link, in the root namespace: they
count whole frames (Ethernet, IP and TCP headers included).

Teardown always runs (exceptions, Ctrl-C, SIGTERM): every process in the hosts
is killed, then the namespaces and the bridge are deleted. Everything created is
named with NAME_PREFIX, so `remove_leftovers()` can clear what a killed run left.

A host with a delay gets a delay line (benchmarks/delayline.py) between its link and the
bridge, which holds every frame `delay_ms` each way: between two such hosts a round trip
takes 4·delay_ms more. (This kernel has no netem; the line runs in user space, fine for the
small rates of latency-bound runs, not for capped bulk traffic.)
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

NAME_PREFIX = "mrnet"
BRIDGE = f"{NAME_PREFIX}-br"
BRIDGE_IP = "198.18.0.1"
PREFIX_LEN = 24
FIRST_HOST_OCTET = 10
STOP_GRACE_S = 5.0
COMMAND_TIMEOUT_S = 30.0
LINE_START_S = 0.3  # a delay line that fails to open its interfaces has exited by then
QUEUE_S = 0.1  # a capped link queues at most this long a burst of its rate before dropping


@dataclass(frozen=True)
class HostSpec:
    """A host, its link's cap in Mbit/s each way (None: uncapped), its link's delay each way, and sysctls set
    in it (over the network's)."""

    name: str
    mbit: float | None = None
    delay_ms: float = 0.0
    sysctls: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Traffic:
    """Bytes a host sent and received (whole frames)."""

    sent: int
    received: int

    def __sub__(self, earlier: Traffic) -> Traffic:
        return Traffic(self.sent - earlier.sent, self.received - earlier.received)


def require_root() -> None:
    """SystemExit with one line unless this process may create namespaces and shape links."""
    if os.geteuid() != 0:
        raise SystemExit("this benchmark creates network namespaces and tc qdiscs: run it as root (sudo)")


def ip(*args: str, netns: str | None = None) -> str:
    """Run `ip` (inside `netns` when given); its output. CalledProcessError carries ip's own message."""
    return _run("ip", args, netns)


def tc(*args: str, netns: str | None = None) -> str:
    """Run `tc` (inside `netns` when given); its output."""
    return _run("tc", args, netns)


def _run(tool: str, args: tuple[str, ...], netns: str | None) -> str:
    command = ["ip", "netns", "exec", netns, tool, *args] if netns else [tool, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, command, done.stdout, done.stderr)
    return done.stdout


def token_bucket(mbit: float) -> list[str]:
    """tc arguments for a token bucket of `mbit` Mbit/s that queues up to QUEUE_S of traffic."""
    rate_bytes = mbit * 1e6 / 8
    burst = max(int(rate_bytes * 0.002), 128 * 1024)  # >= a GSO frame of 64 KiB, ~2 ms of the rate
    limit = max(int(rate_bytes * QUEUE_S), 4 * burst)
    return ["tbf", "rate", f"{mbit:g}mbit", "burst", str(burst), "limit", str(limit)]


def namespaces() -> list[str]:
    """This module's network namespaces that exist now (a run's, or one that was killed)."""
    names = (line.split()[0] for line in ip("netns", "list").splitlines() if line.strip())
    return [n for n in names if n.startswith(NAME_PREFIX)]


def kill_namespace_processes(netns: str) -> None:
    """SIGKILL every process inside `netns`, and wait until none is left."""
    deadline = time.monotonic() + STOP_GRACE_S
    while pids := [int(p) for p in ip("netns", "pids", netns).split()]:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in namespace {netns} survive SIGKILL")
        time.sleep(0.05)


def links() -> list[str]:
    """This module's interfaces in the root namespace (the bridge and the bridge's ends of links)."""
    return sorted(p.name for p in Path("/sys/class/net").iterdir() if p.name.startswith(NAME_PREFIX))


def remove_leftovers() -> None:
    """Delete this module's namespaces (killing their processes first), links and bridge, if any exist."""
    for netns in namespaces():
        kill_namespace_processes(netns)
    for link in links():  # deleting its end here removes a link at once, not when its namespace is freed
        with contextlib.suppress(subprocess.CalledProcessError):  # gone meanwhile with its namespace
            ip("link", "delete", link)
    for netns in namespaces():
        ip("netns", "delete", netns)
    if left := links():
        raise RuntimeError(f"network links {left} survive deletion")


class TestNetwork:
    """Hosts as network namespaces on one bridge; a context manager that always tears them down."""

    def __init__(self, hosts: list[HostSpec], sysctls: dict[str, str] | None = None):
        if len({h.name for h in hosts}) != len(hosts):
            raise ValueError(f"host names must be unique: {[h.name for h in hosts]}")
        self.hosts = {h.name: h for h in hosts}
        self.sysctls = sysctls or {}  # set in every host (e.g. its TCP congestion control)
        self.addresses = {h.name: f"198.18.0.{FIRST_HOST_OCTET + i}" for i, h in enumerate(hosts)}
        self._links = {h.name: f"{NAME_PREFIX}{i}" for i, h in enumerate(hosts)}  # the bridge's ends
        self._processes: list[subprocess.Popen] = []

    def netns(self, host: str) -> str:
        return f"{NAME_PREFIX}-{host}"

    def __enter__(self) -> TestNetwork:
        require_root()
        self._previous_sigterm = exit_on_sigterm()
        remove_leftovers()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        ip("link", "add", BRIDGE, "type", "bridge")
        ip("addr", "add", f"{BRIDGE_IP}/{PREFIX_LEN}", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")
        for name, host in self.hosts.items():
            netns, link = self.netns(name), self._links[name]
            ip("netns", "add", netns)
            ip("link", "add", link, "type", "veth", "peer", "name", f"{link}h")
            ip("link", "set", f"{link}h", "netns", netns)
            ip("link", "set", f"{link}h", "name", "eth0", netns=netns)
            ip("addr", "add", f"{self.addresses[name]}/{PREFIX_LEN}", "dev", "eth0", netns=netns)
            ip("link", "set", "lo", "up", netns=netns)
            ip("link", "set", "eth0", "up", netns=netns)
            for key, value in {**self.sysctls, **host.sysctls}.items():
                _run("sysctl", ("-qw", f"{key}={value}"), netns)
            ip("link", "set", link, "up")
            if host.delay_ms:
                self._delay(link, host.delay_ms)
            else:
                ip("link", "set", link, "master", BRIDGE)
            if host.mbit is not None:
                tc("qdisc", "add", "dev", "eth0", "root", *token_bucket(host.mbit), netns=netns)
                tc("qdisc", "add", "dev", link, "root", *token_bucket(host.mbit))

    def _delay(self, link: str, delay_ms: float) -> None:
        """Join `link` to the bridge through a delay line: link <-> line <-> `link`x, `link`y <-> bridge."""
        ip("link", "add", f"{link}x", "type", "veth", "peer", "name", f"{link}y")
        ip("link", "set", f"{link}y", "master", BRIDGE)
        for end in (link, f"{link}x", f"{link}y"):
            ip("link", "set", end, "promisc", "on", "up")
        line = [sys.executable, str(Path(__file__).with_name("delayline.py")), link, f"{link}x", f"{delay_ms:g}"]
        proc = self.spawn(None, line)
        time.sleep(LINE_START_S)
        if proc.poll() is not None:
            raise RuntimeError(f"the delay line on {link} exited at start; run `{' '.join(line)}` as root to see why")

    def spawn(
        self, host: str | None, command: list[str], env: dict | None = None, log: Path | None = None
    ) -> subprocess.Popen:
        """Start `command` inside `host` (None: in the root namespace, on the bridge), in a process group of its
        own, stopped with the network; output to `log` (or discarded)."""
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns(host), *command] if host else command,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            if log:
                out.close()
        self._processes.append(proc)
        return proc

    def counters(self) -> dict[str, Traffic]:
        """Bytes every host has sent and received since its link came up."""
        return {name: _traffic(link) for name, link in self._links.items()}

    def drops(self) -> dict[str, tuple[int, int]]:
        """Packets every capped host's token buckets dropped so far: (sending, receiving)."""
        return {
            name: (
                _dropped(tc("-s", "qdisc", "show", "dev", "eth0", netns=self.netns(name))),
                _dropped(tc("-s", "qdisc", "show", "dev", link)),
            )
            for name, link in self._links.items()
            if self.hosts[name].mbit is not None
        }

    def close(self) -> None:
        """Stop every process started here (SIGTERM to its group, then SIGKILL) and whatever else runs in the
        hosts, then delete the hosts and the bridge."""
        try:
            for proc in self._processes:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S
            for proc in self._processes:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(deadline - time.monotonic(), 0))
                _kill_group(proc)
        finally:
            try:
                remove_leftovers()
            finally:
                signal.signal(signal.SIGTERM, self._previous_sigterm)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group `proc` leads and wait until no live member is left (zombies whose
    parent has not reaped them yet hold nothing)."""
    deadline = time.monotonic() + STOP_GRACE_S
    while _live_members(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.poll()
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {_live_members(proc.pid)} survive SIGKILL")
        time.sleep(0.05)
    proc.poll()


def _live_members(pgid: int) -> list[int]:
    """The processes of group `pgid` that are not zombies."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(stat.parent.name))
    return members


def _dropped(stats: str) -> int:
    """The packets a qdisc dropped, from `tc -s qdisc show`."""
    match = re.search(r"dropped (\d+)", stats)
    return int(match[1]) if match else 0


def _traffic(link: str) -> Traffic:
    """The host's traffic, read on the bridge's end of its link, where sent and received swap."""
    stats = Path(f"/sys/class/net/{link}/statistics")
    return Traffic(int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text()))


def exit_on_sigterm():
    """Make SIGTERM raise SystemExit, so `finally` blocks (the teardown) run; the previous handler.

    Call it again after anything that installs its own handler (ray.init does)."""
    return signal.signal(signal.SIGTERM, _raise_system_exit)


def _raise_system_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)
