"""fail2ban's multi-line failure ids: one session's lines decide together.

A filter whose prefregex has `<F-MLFID>` (sshd: host and `sshd[pid]`) gives every line of
one *session* the same id. fail2ban keeps the groups matched so far per id
(`Filter._mergeFailure`), and the markers a failregex sets decide what a line means:

* `<F-NOFAIL>`: the line matched but is not a failure (`Connection closed by ADDR`);
* `<F-MLFGAINED>`: the session succeeded (`Accepted password for USER`), which also
  drops the session's failures still waiting for a host (*pending*);
* `<F-MLFFORGET>`: the session ended; its id is forgotten;
* a failure without a host is *pending*: the next line of the session that names the
  host counts as a failure, even one marked `<F-NOFAIL>`; so does a second user name
  in one session.

This module ports that merge rule exactly (fail2ban 1.0.2, server/filter.py); the
failures already counted for an address stay counted, as in fail2ban.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Groups = dict[str, "str | set[str] | None"]

# fail2ban's cache holds 100 ids (Utils.Cache(maxCount=100, maxTime=5*60)); the age limit
# is not kept here, the scanner reads logs faster than their clock runs.
_MAX_SESSIONS = 100

_NOFAIL, _FORGET, _WAS_NOFAIL, _GAINED = 1, 2, 4, 8


def _add_user(fail: Groups, user: object) -> set[str] | None:
    users = fail.get("users")
    if isinstance(user, str) and user:
        if not isinstance(users, set):
            users = set()
            fail["users"] = users
        users.add(user)
    return users if isinstance(users, set) else None


@dataclass
class Sessions:
    """The groups seen so far per multi-line failure id, oldest first."""

    cache: dict[str, Groups] = field(default_factory=dict)

    def merge(self, mlfid: str, fail: Groups) -> Groups:
        """This line's groups merged with its session's (fail2ban's _mergeFailure)."""
        flags = 0
        if fail.get("mlfgained"):
            flags |= _GAINED | _NOFAIL
            if not fail.get("nofail"):
                fail["nofail"] = fail["mlfgained"]
        elif fail.get("nofail"):
            flags |= _NOFAIL
        if fail.pop("mlfforget", None):
            flags |= _FORGET
        users: set[str] | None = None
        known = self.cache.get(mlfid)
        if known is not None:
            users = _add_user(known, fail.get("user"))
            if known.pop("nofail", None):
                flags |= _WAS_NOFAIL
            if known.pop("mlfgained", None):
                flags |= _WAS_NOFAIL
            if flags & _GAINED:
                known.pop("mlfpending", None)
            known.update((k, v) for k, v in fail.items() if v is not None)
            fail = known
            if flags & _FORGET:
                del self.cache[mlfid]
        elif not flags & _FORGET:
            users = _add_user(fail, fail.get("user"))
            if len(self.cache) >= _MAX_SESSIONS:
                del self.cache[next(iter(self.cache))]
            self.cache[mlfid] = fail
        if fail.pop("mlfpending", None) or (users is not None and len(users) > 1):
            # Failures were pending, or a second user name: this line counts after all.
            fail.pop("nofail", None)
            fail.pop("mlfgained", None)
        return fail
