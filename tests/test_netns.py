"""The emulated hosts of the bandwidth benchmark: caps, byte counters, teardown, and the bounds it reports.

Namespace tests need root (CI runs as root); they must not run beside a bandwidth benchmark,
whose hosts share this module's names.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import netns  # noqa: E402
from bandwidth import Config  # noqa: E402

MIB = 1024 * 1024
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

RECEIVER = """
import socket
server = socket.create_server(("0.0.0.0", 5001))
connection, _ = server.accept()
total = 0
while chunk := connection.recv(1 << 16):
    total += len(chunk)
print(total)
"""
SENDER = """
import socket, sys, time
deadline = time.monotonic() + 10
while True:
    try:
        connection = socket.create_connection((sys.argv[1], 5001), timeout=1)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
connection.sendall(bytes(2 * 1024 * 1024))
connection.close()
"""


CONNECT = """
import socket, sys, time
deadline = time.monotonic() + 10
while True:  # the first connect also resolves the neighbour's address
    try:
        socket.create_connection((sys.argv[1], 5001), timeout=5).close()
        break
    except ConnectionRefusedError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
times = []
for _ in range(4):
    start = time.perf_counter()
    socket.create_connection((sys.argv[1], 5001), timeout=5).close()
    times.append(time.perf_counter() - start)
print(min(times))
"""
LISTENER = """
import socket
server = socket.create_server(("0.0.0.0", 5001))
while True:
    server.accept()[0].close()
"""


def in_host(net: netns.TestNetwork, host: str, *command: str) -> list[str]:
    return ["ip", "netns", "exec", net.netns(host), *command]


@needs_root
def test_hosts_send_through_capped_links_and_count_every_byte(tmp_path):
    with netns.TestNetwork([netns.HostSpec("a", 50), netns.HostSpec("b", None)]) as net:
        assert "rate 50Mbit" in netns.tc("qdisc", "show", "dev", "eth0", netns=net.netns("a"))
        assert "tbf" not in netns.tc("qdisc", "show", "dev", "eth0", netns=net.netns("b"))
        before = net.counters()
        receiver = subprocess.Popen(in_host(net, "b", sys.executable, "-c", RECEIVER), stdout=subprocess.PIPE)
        subprocess.run(in_host(net, "a", sys.executable, "-c", SENDER, net.addresses["b"]), check=True, timeout=60)
        assert int(receiver.communicate(timeout=60)[0]) == 2 * MIB
        traffic = {h: c - before[h] for h, c in net.counters().items()}
        sleeper = net.spawn("a", ["sleep", "600"])
    # headers on top of the payload: 2 MiB of TCP payload costs a few KiB more on the wire
    assert 2 * MIB <= traffic["a"].sent <= 2 * MIB * 1.05 and 2 * MIB <= traffic["b"].received <= 2 * MIB * 1.05
    assert traffic["a"].received < 0.05 * MIB and traffic["b"].sent < 0.05 * MIB  # acknowledgements only
    assert sleeper.poll() is not None
    assert netns.namespaces() == [] and netns.links() == []


@needs_root
def test_a_delayed_link_adds_its_delay_each_way_and_hosts_take_the_networks_sysctls_and_their_own():
    delay_ms = 10.0
    idle = "net.ipv4.tcp_slow_start_after_idle"
    hosts = [netns.HostSpec("a", 100, delay_ms, {idle: "0"}), netns.HostSpec("b", 100, delay_ms)]
    with netns.TestNetwork(hosts, {"net.ipv4.tcp_congestion_control": "reno", idle: "1"}) as net:
        net.spawn("b", [sys.executable, "-c", LISTENER])
        connect = subprocess.run(
            in_host(net, "a", sys.executable, "-c", CONNECT, net.addresses["b"]),
            capture_output=True,
            text=True,
            timeout=60,
        )
        settings = {
            host: subprocess.run(
                in_host(net, host, "sysctl", "-n", "net.ipv4.tcp_congestion_control", idle),
                capture_output=True,
                text=True,
            ).stdout.split()
            for host in ("a", "b")
        }
    rtt = float(connect.stdout)  # a connect takes one round trip: through both links' lines, each way
    assert 4 * delay_ms / 1e3 <= rtt < 4 * delay_ms / 1e3 + 0.02
    assert settings == {"a": ["reno", "0"], "b": ["reno", "1"]}
    assert netns.namespaces() == [] and netns.links() == []


@needs_root
def test_a_killed_runs_leftovers_are_removed():
    stale = f"{netns.NAME_PREFIX}-stale"
    netns.ip("netns", "add", stale)
    process = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "600"])
    netns.ip("link", "add", f"{netns.NAME_PREFIX}x", "type", "veth", "peer", "name", "eth0", "netns", stale)
    netns.remove_leftovers()
    assert process.wait(timeout=10) == -9
    assert netns.namespaces() == [] and netns.links() == []


def test_a_user_without_root_is_told_to_run_as_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit, match="run it as root"):
        netns.require_root()


def test_duplicate_host_names_are_refused():
    with pytest.raises(ValueError, match="unique"):
        netns.TestNetwork([netns.HostSpec("a"), netns.HostSpec("a")])


def test_bounds_and_predicted_bytes_follow_the_cost_model():
    d = 64 * MIB
    config = Config(peer_mbit=100, miner_mbit=200)  # sum of miner links = 4 x a peer's link
    bounds = config.bounds(d, peers=4, miners=2)
    assert bounds == {"relay": d / 12.5e6, "gloo": 1.5 * d / 12.5e6}
    starved = Config(100, 100).bounds(d, peers=4, miners=2)
    assert starved["relay"] == 4 * d / 25e6  # the miners' term: twice a peer's
    predicted = config.predicted_bytes(d, peers=4, miners=2)
    assert predicted[("relay", "peer")] == d and predicted[("gloo", "peer")] == 1.5 * d
    assert predicted[("relay", "miner")] == 2 * d
    delayed = config.bounds(d, peers=4, miners=2, rtt_s=0.05)  # two hops for the relay, six for a ring
    assert delayed == {"relay": d / 12.5e6 + 0.05, "gloo": 1.5 * d / 12.5e6 + 3 * 0.05}
    assert Config.parse("100/1000") == Config(100.0, 1000.0)
    with pytest.raises(SystemExit, match="PEER_MBIT/MINER_MBIT"):
        Config.parse("100")
