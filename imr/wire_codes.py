"""Every error code that goes on the wire, in one catalogue.

A *wire code* is the `code` of an error reply (`"error": {"code": ..., "message": ...}`,
or `error CODE: message` in the text form): the one part of a refusal a client may branch
on; the message is for people. docs/protocol.md's "Error codes" table documents each
member, and tests/test_wire_codes.py keeps the two in step.

The pure core cannot import this module, so it spells its own refusals:
`RefusalCode` (imr/core/addresses.py) and the quota codes (imr/core/quota.py). Their
members here take their values from there, and the test checks that none is missing.
"""

from __future__ import annotations

from enum import StrEnum

from imr.core import quota
from imr.core.addresses import RefusalCode


class WireCode(StrEnum):
    # The request line itself.
    BAD_REQUEST = "bad_request"
    UNSUPPORTED_VERSION = "unsupported_version"
    LINE_TOO_LONG = "line_too_long"
    # The connection and who is on it.
    BUSY = "busy"
    UNAUTHENTICATED = "unauthenticated"
    TLS_REQUIRED = "tls_required"
    FORBIDDEN = "forbidden"
    # The address (imr/core/addresses.py).
    INVALID_ADDRESS = RefusalCode.INVALID.value
    NETWORK_NOT_ALLOWED = RefusalCode.NETWORK.value
    NETWORK_TOO_WIDE = RefusalCode.TOO_WIDE.value
    NETWORK_OVERLAPS = "network_overlaps"
    LOOPBACK_ADDRESS = RefusalCode.LOOPBACK.value
    UNSPECIFIED_ADDRESS = RefusalCode.UNSPECIFIED.value
    MULTICAST_ADDRESS = RefusalCode.MULTICAST.value
    BROADCAST_ADDRESS = RefusalCode.BROADCAST.value
    LINK_LOCAL_ADDRESS = RefusalCode.LINK_LOCAL.value
    OWN_ADDRESS = RefusalCode.OWN.value
    ALLOWLISTED = RefusalCode.ALLOWLISTED.value
    # The change.
    NOT_BLOCKED = "not_blocked"
    RATE_LIMITED = quota.RATE_LIMITED
    QUOTA_EXCEEDED = quota.QUOTA_EXCEEDED
    STATE_UNWRITABLE = "state_unwritable"
    LIFT_NOT_ALLOWED = "lift_not_allowed"  # fleet events only: never sent to a client
    INTERNAL_ERROR = "internal_error"
