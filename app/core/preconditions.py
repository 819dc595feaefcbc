"""``If-Match`` on the routes that change a versioned resource (connectors, webhook subscriptions).

The header is parsed once, as RFC 9110 writes it; which versions it names is the route's to
compare with the resource's, once the body was found valid.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Header
from pydantic import AfterValidator
from pydantic.json_schema import SkipJsonSchema

__all__ = ["IF_MATCH_PATTERN", "IfMatch", "parse_if_match"]

# RFC 9110: "*", or a list of entity tags, strong ("3") or weak (W/"3"), of visible ASCII (the
# obsolete non-ASCII octets are not taken); empty list elements are allowed and ignored.
_ENTITY_TAG = r'(?:W/)?"[\x21\x23-\x7e]*"'
IF_MATCH_PATTERN = rf"^[ \t]*(?:\*|(?:,[ \t]*)*{_ENTITY_TAG}(?:[ \t]*,(?:[ \t]*{_ENTITY_TAG})?)*)[ \t]*$"
_IF_MATCH = re.compile(IF_MATCH_PATTERN)


def _if_match_syntax(value: str) -> str:
    if _IF_MATCH.match(value) is None:
        raise ValueError('must be * or a list of entity tags such as "3"')
    return value


async def parse_if_match(
    if_match: Annotated[
        str | SkipJsonSchema[None],
        AfterValidator(_if_match_syntax),
        Header(
            alias="If-Match",
            description=(
                'Change only this version: an ETag this service answered (`"3"`), a list of them '
                '(`"3", "4"`), or `*`. A weak or unknown tag never matches (412); anything else that is '
                "not a list of entity tags is a 422."
            ),
            json_schema_extra={"pattern": IF_MATCH_PATTERN},
        ),
    ] = None,
) -> frozenset[int] | None:
    """The versions an ``If-Match`` header names; ``*`` or no header means any version.

    A list names several; the current version must be one of them. Weak tags never match
    (RFC 9110 compares If-Match strongly), nor does anything this service did not issue: those
    leave no version, which no connector has. The service judges that (412) only once the body
    was found valid: this dependency raises nothing.
    """
    if if_match is None:
        return None
    tags = [tag.strip() for tag in if_match.split(",") if tag.strip()]
    if "*" in tags:
        return None
    return frozenset(
        int(tag[1:-1])
        for tag in tags
        if len(tag) <= 20 and tag[:1] == tag[-1:] == '"' and tag[1:-1].isdigit()
    )


IfMatch = Annotated[frozenset[int] | None, Depends(parse_if_match)]
