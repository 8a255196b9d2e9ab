"""Netfilter backends: each renders and applies the netfilter part of a Plan."""

from __future__ import annotations

from ..errors import BackendUnavailableError
from .base import AppliedState, ApplyKind, Backend
from .nftables import NftablesBackend


def get_backend(name: str) -> Backend:
    """The backend for a configuration's `backend` key ("nftables" or "auto")."""
    if name in ("nftables", "auto"):
        return NftablesBackend()
    if name == "iptables":
        raise BackendUnavailableError(
            'the legacy iptables backend is not part of this version yet; use backend = "nftables"'
        )
    raise BackendUnavailableError(f"unknown backend {name!r}; known: nftables, auto")


__all__ = ["AppliedState", "ApplyKind", "Backend", "NftablesBackend", "get_backend"]
