"""Pages of the List calls: page_size, page_token, next_page_token.

A page token is opaque to callers: URL-safe base64 of a small JSON object that
says where the previous page stopped (the sort key of its last item, so items
added meanwhile are neither skipped nor repeated ahead of that point). A token
that does not decode is INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from gradmix.server.errors import InvalidArgumentError
from gradmix.server.limits import echo

T = TypeVar("T")
#: A sort key of a listed item, as JSON can hold it (e.g. [registered_at, name]).
Key = list[Any]


def encode_token(state: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(state, separators=(",", ":")).encode()).decode()


def decode_token(token: str) -> dict[str, Any]:
    """The state a `next_page_token` carries ({} for the first page).

    Raises:
        InvalidArgumentError: not a token this server made.
    """
    if not token:
        return {}
    try:
        state = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (UnicodeError, binascii.Error, ValueError) as exc:
        raise InvalidArgumentError(f"page_token {echo(token)} is not a page token") from exc
    if not isinstance(state, dict):
        raise InvalidArgumentError(f"page_token {echo(token)} is not a page token")
    return state


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_token: str


def page(items: Sequence[T], key: Callable[[T], Key], token: str, size: int) -> Page[T]:
    """The page of `items` (sorted by `key`) that follows `token`, at most `size` long."""
    state = decode_token(token)
    after = state.get("after")
    if after is not None and not isinstance(after, list):
        raise InvalidArgumentError(f"page_token {echo(token)} is not a page token")
    ordered = sorted(items, key=key)
    if after is not None:
        try:
            ordered = [item for item in ordered if key(item) > after]
        except TypeError as exc:  # a token of another List call
            raise InvalidArgumentError(
                f"page_token {echo(token)} belongs to another list") from exc
    chosen = ordered[:size]
    more = len(ordered) > size
    return Page(chosen, encode_token({"after": key(chosen[-1])}) if more else "")
