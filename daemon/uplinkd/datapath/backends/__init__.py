"""Netfilter backends: each renders and applies the netfilter part of a Plan."""

from __future__ import annotations

import logging

from ...errors import BackendUnavailableError
from ..nftlib import NftError
from .base import AppliedState, ApplyKind, Backend, Transaction
from .iptables import IptablesBackend
from .nftables import NftablesBackend

log = logging.getLogger("uplinkd")

BACKEND_NAMES = ("nftables", "iptables", "auto")


def get_backend(name: str) -> Backend:
    """The backend for a configuration's `backend` key or --backend ("nftables", "iptables",
    "auto": nftables wherever libnftables works, else the legacy iptables one)."""
    if name == "nftables":
        return NftablesBackend()
    if name == "iptables":
        return IptablesBackend()
    if name != "auto":
        raise BackendUnavailableError(f"unknown backend {name!r}; known: nftables, iptables, auto")
    nftables = NftablesBackend()
    try:
        nftables.check_available()
    except (BackendUnavailableError, NftError) as nft_reason:
        legacy = IptablesBackend()
        try:
            legacy.check_available()
        except BackendUnavailableError as legacy_reason:
            raise BackendUnavailableError(
                f"no netfilter backend works here: nftables: {nft_reason}; "
                f"iptables: {legacy_reason}"
            ) from legacy_reason
        log.info("backend auto: nftables does not work here (%s); using iptables", nft_reason)
        return legacy
    return nftables


__all__ = [
    "BACKEND_NAMES",
    "AppliedState",
    "ApplyKind",
    "Backend",
    "IptablesBackend",
    "NftablesBackend",
    "Transaction",
    "get_backend",
]
