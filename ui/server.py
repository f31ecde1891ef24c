"""Serving concerns: logins from flags and files."""

from __future__ import annotations

from pathlib import Path

from pipelines.config import AppConfig


def parse_auth(entry: str, where: str) -> tuple[str, str]:
    user, sep, password = entry.partition(":")
    if not sep or not user or not password:
        raise ValueError(f"auth entry {where} must be user:password, got {entry!r}")
    return user, password


def auth_pairs(config: AppConfig) -> list[tuple[str, str]]:
    """Every (user, password) from --auth and --auth-file."""
    pairs = [parse_auth(a, "--auth") for a in config.auth]
    if config.auth_file:
        path = Path(config.auth_file)
        if not path.is_file():
            raise ValueError(f"auth_file '{path}' does not exist")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                pairs.append(parse_auth(line.strip(), f"in {path} line {n}"))
    return pairs
