"""Optuna storage: which URL, how to open it, and how to print it safely.

Default: a SQLite file ``loopsearch.db`` in the working directory. Override with ``--storage``
or ``$LOOPSEARCH_STORAGE``. Any Optuna RDB URL works (``postgresql://user@host/db`` for many
workers); ``journal:PATH`` opens Optuna's journal file store; ``grpc://HOST:PORT`` connects to an
Optuna gRPC storage proxy (``loopsearch proxy serve``, in front of PostgreSQL), the path past one
database's connection limit for hundreds of workers.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend

from ..errors import StorageError

ENV = "LOOPSEARCH_STORAGE"
DEFAULT = "sqlite:///loopsearch.db"


def storage_url(explicit: str | None = None) -> str:
    return explicit or os.environ.get(ENV) or DEFAULT


def mask(url: str) -> str:
    """Hide credentials in a URL or a message that contains one: the password of user:secret@host
    (also with an empty user, ://:secret@host, and with spaces or ':' inside it), and every query
    parameter whose name contains "password", "secret" or "token" (?password=, ?sslpassword=, ...)."""
    url = re.sub(r"(://[^:/@\s]*):[^@/]*@", r"\1:***@", url)
    return re.sub(r"(?i)([?&;\s][a-z_]*(?:password|secret|token)[a-z_]*=)[^&;\s]*", r"\1***", url)


def _check_sqlite_path(url: str) -> None:
    path = Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None
    if path is None or str(path) in ("", ":memory:"):
        return
    parent = path.parent if str(path.parent) else Path(".")
    problem = None
    if not parent.is_dir():
        problem = f"{parent} is not an existing directory"
    elif path.exists() and not os.access(path, os.W_OK):
        problem = f"{path} is not writable"
    elif not path.exists() and not os.access(parent, os.W_OK):
        problem = f"directory {parent} is not writable"
    if problem:
        raise StorageError(f"cannot use storage {mask(url)}: {problem}; pass --storage sqlite:///WRITABLE/PATH.db "
                           f"or set {ENV}")


def journal_path(url: str) -> Path | None:
    """The file of a ``journal:PATH`` URL, else None."""
    return Path(url[len("journal:"):]) if url.startswith("journal:") else None


def require_existing(url: str | None = None) -> None:
    """Commands that only read (leaderboard, study list/show, report, compare) must not create an
    empty SQLite file where there is none: that means the wrong directory or a missing --storage."""
    url = storage_url(url)
    path = sqlite_path(url)
    if path is not None and not path.exists():
        raise StorageError(f"no study storage at {path.resolve()} (nothing was created here); run this in the folder "
                           f"where you created the study, or pass --storage URL (or set {ENV})")


def grpc_address(url: str) -> tuple[str, int] | None:
    """(host, port) of a ``grpc://HOST:PORT`` URL, else None."""
    if not url.startswith("grpc://"):
        return None
    host, _, port = url[len("grpc://"):].rstrip("/").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise StorageError(f"cannot read storage {mask(url)}: write grpc://HOST:PORT, e.g. grpc://10.0.0.5:13000")
    return host, int(port)


def grpc_proxy(host: str, port: int, timeout: float = 10.0) -> optuna.storages.BaseStorage:
    """A client of the gRPC storage proxy at host:port, checked to answer within ``timeout`` s."""
    try:
        import grpc  # noqa: F401  (optuna's proxy client needs grpcio)
    except ImportError:
        raise StorageError("grpc:// storage needs grpcio: pip install 'loopsearch[grpc]'") from None
    from optuna.storages import GrpcStorageProxy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        proxy = GrpcStorageProxy(host=host, port=port)
    try:
        proxy.wait_server_ready(timeout=timeout)
    except Exception:
        raise StorageError(f"no storage proxy answers at grpc://{host}:{port} within {timeout:g} s; start one with "
                           f"`loopsearch proxy serve --storage postgresql://... --port {port}`") from None
    return proxy


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URL (None for other URLs and in-memory SQLite)."""
    if not url.startswith("sqlite:///") or url[len("sqlite:///"):] in ("", ":memory:"):
        return None
    return Path(url[len("sqlite:///"):])


def open_storage(url: str | None = None, heartbeat: tuple[int, int] | None = None,
                 on_stale=None) -> optuna.storages.BaseStorage:
    """Open a storage. ``heartbeat=(interval_s, grace_s)`` turns on Optuna's heartbeat for RDB
    storages (a running trial silent for grace_s is failed, and ``on_stale`` called on it);
    journal stores get loopsearch's lease instead (loopsearch/search/workers.py)."""
    url = storage_url(url)
    try:
        if url.startswith("journal:"):
            path = url[len("journal:"):]
            parent = Path(path).parent
            if not parent.is_dir() or not os.access(parent, os.W_OK):
                raise StorageError(f"cannot use storage {mask(url)}: directory {parent} is not writable; "
                                   f"pass another --storage")
            return optuna.storages.JournalStorage(JournalFileBackend(path))  # file lock: safe for many processes
        address = grpc_address(url)
        if address is not None:
            return grpc_proxy(*address)  # no Optuna heartbeat through the proxy: workers use the lease
        _check_sqlite_path(url)
        if heartbeat is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat[0], grace_period=heartbeat[1],
                                                  heartbeat_stale_trial_callback=on_stale)
        return optuna.storages.RDBStorage(url)
    except StorageError:
        raise
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200]
        raise StorageError(f"cannot open storage {mask(url)}: {type(exc).__name__}: {mask(reason)}; "
                           f"pass a writable --storage URL or set {ENV}") from None
