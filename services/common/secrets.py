"""Secrets generated at first start into the state dir (`<state_dir>/secrets/`, mode 0700/0600).

Nothing secret is committed or passed on a command line: every process of a deployment reads the
same files. A file is created once, atomically (the first writer wins; a concurrent first start
reads the winner's value), and never rewritten here — rotation is the owner module's job.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from services.common.config import Settings


def secrets_dir(s: Settings) -> Path:
    path = s.state_dir / "secrets"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def create_once(path: Path, make: bytes) -> bytes:
    """The file's bytes; when it does not exist yet, `make` is written to it first (0600)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(make)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes()


def write_atomically(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    """Replace `path` with `data` (only its owner may read it unless `mode` says otherwise): a reader sees
    the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_new_secret(path: Path | str, text: str) -> None:
    """`text` and a newline in a new file only its owner may read (a secret handed out once, e.g. `--out`);
    an existing file is never overwritten (FileExistsError)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def secret_bytes(s: Settings, name: str, n: int = 32) -> bytes:
    """`n` random bytes named `name`, generated on first use."""
    return create_once(secrets_dir(s) / name, os.urandom(n))


def password(s: Settings, name: str) -> str:
    """A random password (43 URL-safe characters) named `name`, generated on first use."""
    return create_once(secrets_dir(s) / f"{name}.password", secrets.token_urlsafe(32).encode()).decode().strip()
