"""A delay line between two network interfaces: every frame crosses, each way, `delay_ms` later.

    python benchmarks/delayline.py IFACE_A IFACE_B DELAY_MS     # as root; runs until killed

netns.py puts one in a host's link when the host has a delay (this kernel has no netem): the
host's veth end in the root namespace on one side, a second veth pair to the bridge on the
other. Frames are read and written whole with their GSO header (PACKET_VNET_HDR), so the
kernel segments large TCP sends on the far side as it would on the link itself; the order of
frames is kept (a constant delay is a FIFO).
"""

from __future__ import annotations

import collections
import contextlib
import socket
import sys
import threading
import time

SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4
SO_RCVBUFFORCE = 33  # Linux; Python's socket module lacks the name
ETH_P_ALL = 0x0003
MAX_FRAME = 65536 + 64
RECEIVE_BUFFER = 64 * 1024 * 1024  # a burst at a fast link's rate waits here, not dropped before its delay


def open_interface(name: str) -> socket.socket:
    """A raw socket on interface `name` that reads and writes frames with their virtio GSO header."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
    sock.bind((name, 0))
    return sock


def forward(source: socket.socket, target: socket.socket, delay_s: float) -> None:
    """Every frame arriving on `source` written to `target` `delay_s` after it arrived, in order."""
    due: collections.deque = collections.deque()
    ready = threading.Condition()

    def send() -> None:
        while True:
            with ready:
                while not due:
                    ready.wait()
                at, frame = due.popleft()
            wait = at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with contextlib.suppress(OSError):  # a frame the far side refuses is lost, as on a link
                target.send(frame)

    threading.Thread(target=send, daemon=True).start()
    while True:
        frame, address = source.recvfrom(MAX_FRAME)
        if address[2] == PACKET_OUTGOING:
            continue  # what this line itself wrote on the interface
        with ready:
            due.append((time.monotonic() + delay_s, frame))
            ready.notify()


def main() -> None:
    first, second, delay_ms = sys.argv[1], sys.argv[2], float(sys.argv[3])
    a, b = open_interface(first), open_interface(second)
    threading.Thread(target=forward, args=(a, b, delay_ms / 1e3), daemon=True).start()
    forward(b, a, delay_ms / 1e3)


if __name__ == "__main__":
    main()
