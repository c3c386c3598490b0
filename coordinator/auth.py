"""Bearer tokens: issued at random, stored only as hashes, compared in constant time.

Node tokens are 256 random bits, so a plain SHA-256 is enough to store them (there is
nothing to brute-force, unlike a password). Tokens never reach a log line: error
messages name the node, never the token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from flask import Request

from coordinator.errors import Forbidden, Unauthorized

TOKEN_PREFIX = "hrd_"


def new_token() -> str:
    """A fresh node token (printable, URL-safe)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def token_matches(token: str, stored_hash: str) -> bool:
    """Constant-time comparison of a presented token with a stored hash."""
    return hmac.compare_digest(hash_token(token), stored_hash)


def bearer_token(request: Request, what: str) -> str:
    """The bearer token of `request`; 401 when missing or malformed."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if not header:
        raise Unauthorized(f"this request needs {what} as 'Authorization: Bearer <token>'")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(f"malformed Authorization header; expected 'Bearer <token>' "
                           f"carrying {what}")
    return token


def require_secret(request: Request, secret: str | None, what: str,
                   disabled_message: str) -> None:
    """Check that `request` carries `secret` (admin or registration token)."""
    if secret is None:
        raise Forbidden(disabled_message)
    token = bearer_token(request, what)
    if not hmac.compare_digest(hash_token(token), hash_token(secret)):
        raise Forbidden(f"the bearer token is not {what}")
