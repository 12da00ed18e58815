"""Inspector sessions kept for a multi-user service: bounded in number and memory, expiring when unused."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from components.quantize.engine import Precision, QuantEngine
from components.quantize.errors import SessionError, SessionLimitError
from components.quantize.inspector import InspectorSession


class SessionStore:
    """Inspector sessions bounded in number and memory, expiring ``ttl_s`` seconds after their last use.

    Memory is reserved when a session is created (its :meth:`InspectorSession._estimate_bytes` upper
    bound), so a full store refuses new sessions with :class:`SessionLimitError` instead of evicting
    someone else's work. Expired sessions are purged on every call.
    """

    def __init__(self, *, max_sessions: int = 8, max_bytes: int = 512 * 2**20, ttl_s: float = 900.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_sessions < 1 or max_bytes < 1 or ttl_s <= 0:
            raise ValueError(f"max_sessions, max_bytes and ttl_s must be positive, got {max_sessions}, "
                             f"{max_bytes}, {ttl_s}")
        self.max_sessions, self.max_bytes, self.ttl_s = max_sessions, max_bytes, ttl_s
        self._clock = clock
        self._sessions: dict[str, InspectorSession] = {}
        self._last_used: dict[str, float] = {}
        self._expired: set[str] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._purge()
            return len(self._sessions)

    @property
    def bytes_reserved(self) -> int:
        with self._lock:
            self._purge()
            return sum(s.bytes_reserved for s in self._sessions.values())

    def create(self, engine: QuantEngine, image: torch.Tensor, precision: str | Precision = "int8") -> InspectorSession:
        """A new session (its ``session_id`` is the key for :meth:`get`)."""
        with self._lock:
            self._check_count()  # before the work of building a session that would be refused
        session = InspectorSession(engine, image, precision)
        with self._lock:
            self._check_count()
            used = sum(s.bytes_reserved for s in self._sessions.values())
            if used + session.bytes_reserved > self.max_bytes:
                raise SessionLimitError(
                    f"inspector memory budget exceeded: this session needs {session.bytes_reserved} bytes, "
                    f"{used} of {self.max_bytes} are in use; close a session or use a smaller image/model")
            self._sessions[session.session_id] = session
            self._last_used[session.session_id] = self._clock()
        return session

    def get(self, session_id: str) -> InspectorSession:
        """The session, marked as used now; :class:`SessionError` when unknown, closed or expired."""
        with self._lock:
            self._purge()
            if session_id not in self._sessions:
                why = "expired" if session_id in self._expired else "unknown or closed"
                raise SessionError(f"inspector session {session_id!r} is {why}; create a new session")
            self._last_used[session_id] = self._clock()
            return self._sessions[session_id]

    def close(self, session_id: str) -> None:
        with self._lock:
            self._purge()
            if self._sessions.pop(session_id, None) is None:
                raise SessionError(f"inspector session {session_id!r} is unknown or already closed")
            self._last_used.pop(session_id, None)

    def _check_count(self) -> None:
        self._purge()
        if len(self._sessions) >= self.max_sessions:
            raise SessionLimitError(f"too many inspector sessions ({self.max_sessions} open); close one or "
                                    f"wait for one to expire (after {self.ttl_s:g} s unused)")

    def _purge(self) -> None:
        now = self._clock()
        for sid in [s for s, t in self._last_used.items() if now - t > self.ttl_s]:
            self._sessions.pop(sid, None)
            self._last_used.pop(sid, None)
            self._expired.add(sid)
        if len(self._expired) > 10_000:  # remember recent expiries only, for the error message
            self._expired.clear()
