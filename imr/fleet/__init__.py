"""Fleet mode: every member's blocks in every member's kernel, over Redis Streams.

Off unless `[fleet] enabled = true` (docs/fleet.md). `events` and `keys` are pure (no
I/O besides key files); `publisher` and `follower` talk to Redis; the trust checks a
remote event must pass are in `imr/core/fleet.py`.
"""
