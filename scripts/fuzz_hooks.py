"""Schemathesis hooks for scripts/fuzz.

The document says an `Idempotency-Key` names one request: a client that
sends the same key with another request gets 422 by design. Generated
requests reuse short keys ("0", "a") across different bodies, so each
well-formed key is made unique here; malformed keys (the negative cases) are
left as generated.
"""

import re
import uuid

import schemathesis

WELL_FORMED = re.compile(r"^[\x21-\x7e]{1,255}$")


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    headers = case.headers or {}
    for name in list(headers):
        if name.lower() == "idempotency-key":
            key = headers[name]
            if isinstance(key, str) and WELL_FORMED.match(key):
                headers[name] = f"{key[:200]}-{uuid.uuid4().hex}"
