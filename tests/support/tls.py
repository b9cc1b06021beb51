"""A throwaway CA (trustme, in the test process) and the PEM files servers and clients
of the TLS tests use: one server certificate for 127.0.0.1 serves every node."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.support.servers import RedisTls


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client: Path  # the client's certificate and key in one PEM file
    other_ca: Path  # a CA that signed nothing of ours

    def redis_tls(self) -> RedisTls:
        """TLS only; clients must show a certificate signed by the CA (mutual TLS)."""
        return RedisTls(self.ca, self.server_cert, self.server_key, "yes")

    def cli_args(self) -> list[str]:
        """redis-cli's, with the server's certificate as ours (same CA)."""
        return [
            *("--tls", "--cacert", str(self.ca)),
            *("--cert", str(self.server_cert), "--key", str(self.server_key)),
        ]


def make_certs(directory: Path) -> Certs:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("cdc-invalidator.client.example")
    certs = Certs(
        directory / "ca.pem", directory / "server.pem", directory / "server.key",
        directory / "client.pem", directory / "other-ca.pem",
    )  # fmt: skip
    ca.cert_pem.write_to_path(str(certs.ca))
    server.private_key_pem.write_to_path(str(certs.server_key))
    server.cert_chain_pems[0].write_to_path(str(certs.server_cert))
    client.private_key_and_cert_chain_pem.write_to_path(str(certs.client))
    trustme.CA().cert_pem.write_to_path(str(certs.other_ca))
    return certs
