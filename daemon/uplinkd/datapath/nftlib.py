"""libnftables through ctypes: the in-process transaction path (no `nft` subprocess per apply).

Debian's python3-nftables is the same ctypes approach but lives outside a venv's reach, and PyPI's
copy is older; the five C calls uplinkd needs are small enough to bind here directly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
from typing import Any

from ..errors import BackendUnavailableError

_NFT_CTX_DEFAULT = 0
_NFT_CTX_OUTPUT_JSON = 1 << 4


def _load() -> ctypes.CDLL:
    name = ctypes.util.find_library("nftables") or "libnftables.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        raise BackendUnavailableError(
            f"libnftables is not installed ({exc}); install the 'libnftables1' package"
        ) from exc
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
    lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return lib


class NftError(Exception):
    """libnftables refused a command buffer; nothing of that buffer was committed."""


class Nft:
    """One libnftables context, bound to the network namespace it was created in.

    The output format is fixed per context: libnftables 1.0.6 crashes when one context lists
    in text after JSON (or the other way round), so a caller wanting both keeps two contexts.
    """

    def __init__(self, *, json_output: bool = False) -> None:
        self._lib = _load()
        self.json_output = json_output
        self._ctx = self._new_context()
        # Dry runs (check_only) get a context of their own: libnftables 1.0.6 keeps what a dry
        # run did in its context's cache, so a map flush after a checked rebuild that was not
        # applied failed with "No such file or directory" (the checked buffer deleted the table).
        self._check_ctx = self._new_context()

    def _new_context(self) -> Any:
        ctx = self._lib.nft_ctx_new(_NFT_CTX_DEFAULT)
        if not ctx:
            raise BackendUnavailableError("libnftables could not create a context")
        self._lib.nft_ctx_buffer_output(ctx)
        self._lib.nft_ctx_buffer_error(ctx)
        if self.json_output:
            flags = self._lib.nft_ctx_output_get_flags(ctx) | _NFT_CTX_OUTPUT_JSON
            self._lib.nft_ctx_output_set_flags(ctx, flags)
        return ctx

    def close(self) -> None:
        for ctx in (self._ctx, self._check_ctx):
            if ctx:
                self._lib.nft_ctx_free(ctx)
        self._ctx = self._check_ctx = None

    def __enter__(self) -> Nft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, commands: str, *, check_only: bool = False) -> str:
        """Run a buffer of nft commands as one transaction and return its output."""
        ctx = self._check_ctx if check_only else self._ctx
        self._lib.nft_ctx_set_dry_run(ctx, check_only)
        try:
            rc = self._lib.nft_run_cmd_from_buffer(ctx, commands.encode())
        finally:
            self._lib.nft_ctx_set_dry_run(ctx, False)  # noqa: FBT003 - C signature
        output = (self._lib.nft_ctx_get_output_buffer(ctx) or b"").decode()
        error = (self._lib.nft_ctx_get_error_buffer(ctx) or b"").decode()
        if rc != 0:
            raise NftError(error.strip() or f"libnftables returned {rc}")
        return output

    def run_json(self, commands: str) -> list[dict[str, Any]]:
        if not self.json_output:
            raise ValueError("this context was created for text output")
        output = self.run(commands)
        if not output.strip():
            return []
        items: list[dict[str, Any]] = json.loads(output).get("nftables", [])
        return items
