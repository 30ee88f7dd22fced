"""A tiny authoritative DNS server on UDP for tests: fixed A records, some answered late.

The processes under test reach it through their own mount namespace, where /etc/resolv.conf is
replaced (`resolver_namespace_command`), so the system resolver (glibc's getaddrinfo) really asks
it, and a "slow" name really keeps that resolver waiting.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import socket
import struct
import threading
from pathlib import Path

TYPE_A = 1


def _question(packet: bytes) -> tuple[str, int, int]:
    """The queried name, its type, and where the question ends."""
    labels, offset = [], 12
    while packet[offset]:
        length = packet[offset]
        labels.append(packet[offset + 1 : offset + 1 + length].decode("ascii", "replace").lower())
        offset += 1 + length
    offset += 1
    (qtype,) = struct.unpack(">H", packet[offset : offset + 2])
    return ".".join(labels), qtype, offset + 4


def _answer(packet: bytes, address: str | None) -> bytes:
    """The reply to `packet`: one A record of `address`, or none (NOERROR, for AAAA and others)."""
    _name, _qtype, end = _question(packet)
    flags = 0x8400  # response, authoritative, NOERROR
    header = packet[:2] + struct.pack(">HHHHH", flags, 1, 1 if address else 0, 0, 0)
    reply = header + packet[12:end]
    if address:
        reply += struct.pack(">HHHIH", 0xC00C, TYPE_A, 1, 60, 4) + ipaddress.IPv4Address(address).packed
    return reply


class DnsStub:
    """Answers `records` (name -> IPv4 address); names in `slow` are answered after `delay_s`."""

    def __init__(self, records: dict[str, str], slow: set[str], delay_s: float) -> None:
        self.records = records
        self.slow = slow
        self.delay_s = delay_s
        self.address = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
        self.queries: list[str] = []
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind((self.address, 53))  # glibc only asks port 53 (needs root)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._socket.close()

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                packet, client = self._socket.recvfrom(4096)
            except OSError:
                return
            name, qtype, _end = _question(packet)
            self.queries.append(name)
            reply = _answer(packet, self.records.get(name) if qtype == TYPE_A else None)
            delay = self.delay_s if name in self.slow else 0.0
            timer = threading.Timer(delay, self._send, (reply, client))
            timer.daemon = True
            timer.start()

    def _send(self, reply: bytes, client) -> None:
        if not self._stopped.is_set():
            with contextlib.suppress(OSError):
                self._socket.sendto(reply, client)

    def resolv_conf(self, directory: Path) -> Path:
        """A resolv.conf naming only this server, whose queries glibc waits long for (one try)."""
        path = directory / "resolv.conf"
        path.write_text(f"nameserver {self.address}\noptions timeout:30 attempts:1\n")
        return path


def namespace_problem() -> str | None:
    """Why `resolver_namespace_command` cannot work here, or None."""
    if os.geteuid() != 0:
        return "needs root: binding port 53 and mounting over /etc/resolv.conf in a mount namespace"
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "needs unshare(1) and mount(1) (util-linux)"
    return None


def resolver_namespace_command(resolv_conf: Path, command: list[str]) -> list[str]:
    """`command` in a private mount namespace whose /etc/resolv.conf is `resolv_conf`."""
    script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(resolv_conf), *command]
