"""Make a TLS certificate for a party's endpoint: python -m jobs.certificate [cert=PATH] [key=PATH]

Writes a self-signed certificate and its private key, and prints the settings that serve it. An
endpoint serving it (wire.tls_cert, wire.tls_key) announces its key's SHA-256 on chain beside its
address; callers pin the certificate to that. Settings: conf/certificate.yaml.
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig

from jobs.service import user_errors
from mapreduce_ray.wire.tls import create_certificate


@hydra.main(config_path="../conf", config_name="certificate", version_base=None)
def main(cfg: DictConfig) -> None:
    with user_errors():
        cert, key = os.path.abspath(cfg.cert), os.path.abspath(cfg.key)
        fingerprint = create_certificate(cert, key)
        print(f"wrote {cert} and {key} (key sha256 {fingerprint})")
        print(f"serve it: wire.tls_cert={cert} wire.tls_key={key}")


if __name__ == "__main__":
    main()
