"""The identifiers a request or a token carries, each pattern in one place, and the one way to test them.

Always whole-string matches: with `re.match(...$)` a trailing newline passes (`$` also matches
before a final "\\n"), and "con_...\\n" would reach SQL. The patterns keep their anchors because
they are shown to callers as they are.
"""
from __future__ import annotations

import re
import unicodedata

JOB_ID = r"^job_[A-Za-z0-9]{16}$"
CONNECTION_ID = r"^con_[A-Za-z0-9]{16}$"
REQUEST_ID = r"^[A-Za-z0-9._:-]{1,36}$"
TENANT = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
# Unicode categories refused in any request text: controls (C0, DEL, C1), invisible format
# characters (bidi overrides, zero-width), and the line and paragraph separators.
_CONTROL_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def matches(pattern: str, value: str) -> bool:
    """Whether all of `value` matches `pattern` (one of the patterns above)."""
    return re.fullmatch(pattern, value) is not None


def control_character(value: str) -> str | None:
    """The first control character in `value` (as U+XXXX), or None when there is none."""
    found = next((c for c in value if unicodedata.category(c) in _CONTROL_CATEGORIES), None)
    return None if found is None else f"U+{ord(found):04X}"
