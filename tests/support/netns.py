"""A host that can vanish: a network namespace joined to this one by a veth pair.

A process run inside it (`prefix` + its command) reaches the servers on `host_address`,
the root namespace's end of the pair. `vanish()` takes the namespace's end of the link
down: from then on nothing it sends arrives, and nothing is sent back either, no FIN, no
RST, not even an ICMP error; what the servers send to it is silently dropped. That is a
host whose power or cable went, unlike a killed process (its kernel closes the
connection) or a stopped one (its kernel still answers TCP keepalives).

Needs root (CAP_NET_ADMIN) and iproute2's `ip`. Only the namespace, the pair and the
addresses made here are touched, and `remove()` takes them all away.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass

# 10.213.0.0/16, one /30 per namespace: unlikely to be in use on a test machine.
NET_PREFIX = "10.213"


class NoNamespaces(Exception):
    """This machine cannot make network namespaces here; the message says why."""


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    ip = shutil.which("ip")
    if ip is None:
        raise NoNamespaces("no `ip` command (iproute2)")
    return subprocess.run([ip, *args], capture_output=True, text=True, check=False)


def _ip_ok(*args: str) -> None:
    result = _ip(*args)
    if result.returncode != 0:
        raise NoNamespaces(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")


def _in_use(address: str) -> bool:
    return address in _ip("-4", "-o", "addr", "show").stdout


@dataclass
class VanishingHost:
    name: str  # the namespace
    host_link: str  # the root namespace's end of the pair
    guest_link: str  # the namespace's end
    host_address: str  # where the servers listen for it
    guest_address: str

    @classmethod
    def create(cls) -> VanishingHost:
        if os.geteuid() != 0:
            raise NoNamespaces("not root: making a network namespace needs CAP_NET_ADMIN")
        tag = f"{os.getpid() % 100000}{secrets.randbelow(100):02d}"
        for _ in range(20):
            third, fourth = secrets.randbelow(256), 4 * secrets.randbelow(64)
            host_address = f"{NET_PREFIX}.{third}.{fourth + 1}"
            if not _in_use(host_address):
                break
        else:
            raise NoNamespaces(f"no free /30 in {NET_PREFIX}.0.0/16")
        host = cls(
            name=f"cdci-{tag}",
            host_link=f"cdci{tag}h",  # interface names: at most 15 characters
            guest_link=f"cdci{tag}g",
            host_address=host_address,
            guest_address=f"{NET_PREFIX}.{third}.{fourth + 2}",
        )
        try:
            host._make()
        except BaseException:
            host.remove()
            raise
        return host

    def _make(self) -> None:
        _ip_ok("netns", "add", self.name)
        _ip_ok("link", "add", self.host_link, "type", "veth", "peer", "name", self.guest_link)
        _ip_ok("link", "set", self.guest_link, "netns", self.name)
        _ip_ok("addr", "add", f"{self.host_address}/30", "dev", self.host_link)
        _ip_ok("link", "set", self.host_link, "up")
        inside = ("-n", self.name)
        _ip_ok(*inside, "addr", "add", f"{self.guest_address}/30", "dev", self.guest_link)
        _ip_ok(*inside, "link", "set", self.guest_link, "up")
        _ip_ok(*inside, "link", "set", "lo", "up")

    @property
    def prefix(self) -> list[str]:
        """Put before a command to run it on this host."""
        return ["ip", "netns", "exec", self.name]

    @property
    def network(self) -> str:
        third, fourth = self.host_address.split(".")[2:]
        return f"{NET_PREFIX}.{third}.{int(fourth) - 1}/30"

    def vanish(self) -> None:
        """The host's link goes down: its connections fall silent, nothing closes them."""
        _ip_ok("-n", self.name, "link", "set", self.guest_link, "down")

    def remove(self) -> None:
        """Deleting the namespace deletes the pair (and ends nothing else)."""
        for args in (("link", "del", self.host_link), ("netns", "del", self.name)):
            with contextlib.suppress(NoNamespaces):
                _ip(*args)  # what was not made is not there
