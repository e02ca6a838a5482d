"""A throwaway PKI (CA, server and client certificates) made with the ``openssl`` command."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class TestPki:
    """Files of a throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""

    __test__ = False  # not a pytest test class

    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_test_pki(directory: Path, common_name: str = "cabin-monitor test CA") -> TestPki:
    """Create a CA, a server and a client certificate (EC P-256, valid two days) with the ``openssl`` command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("the openssl command is needed to make test certificates: apt-get install -y openssl")
    directory.mkdir(parents=True, exist_ok=True)
    new_key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"

    def run(command: str) -> None:
        subprocess.run([openssl, *shlex.split(command)], cwd=directory, check=True, capture_output=True, timeout=30)

    run(
        f"req -x509 {new_key} -keyout ca.key -out ca.crt -days 2 -subj '/CN={common_name}' "
        "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
    )
    for name, usage, san in (
        ("server", "serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"),
        ("client", "clientAuth", ""),
    ):
        (directory / f"{name}.ext").write_text(
            f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n"
            f"subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n{san}"
        )
        run(f"req {new_key} -keyout {name}.key -out {name}.csr -subj /CN=cabin-monitor-test-{name}")
        run(
            f"x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 "
            f"-out {name}.crt -extfile {name}.ext"
        )
    return TestPki(
        ca_file=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )
