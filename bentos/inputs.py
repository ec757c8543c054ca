"""Strict request parsing for the service's APIs.

BentoML's default parsing is lenient where a recommender should not be: `k: "5"` and
`k: true` pass as integers, an unknown key is ignored, a multipart text field is JSON-decoded
(a title "1984" becomes a number), a multipart file field given as text is fetched as a URL,
and a malformed multipart body ends as a 500. `StrictInput` is the base of every request
model here:

- pydantic strict mode, unknown keys refused: a wrong type or an extra key is a 400 that
  names the field;
- JSON bodies for every API; multipart/form-data or a urlencoded form only for APIs with a
  file field, where each file field must be an uploaded file and each text field is taken as
  sent (or JSON-decoded when that gives a string, as BentoML's own client sends them);
- any other content type is a 415.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from bentoml import IODescriptor
from bentoml.exceptions import BentoMLException, InvalidArgument
from pydantic import ConfigDict, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

JSON_TYPES = frozenset({"", "application/json"})
FORM_TYPES = frozenset({"multipart/form-data", "application/x-www-form-urlencoded"})
MAX_ERRORS = 5        # a reply names this many problems at most
MAX_NAME_CHARS = 64   # of a field name echoed back (a client may send a 1 MB key)


class UnsupportedMediaType(BentoMLException):
    error_code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class StrictInput(IODescriptor):
    model_config = ConfigDict(strict=True, extra="forbid")

    @classmethod
    async def from_http_request(cls, request, serde):
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            if media in FORM_TYPES and cls.multipart_fields:
                return cls.model_validate(await _form_values(request, cls))
            if media not in JSON_TYPES:
                raise UnsupportedMediaType(_media_hint(cls, media))
            return cls.model_validate_json(await request.body() or b"{}")
        except ValidationError as exc:
            raise InvalidArgument(describe(exc)) from None
        except ClientDisconnect:  # a body cut off (or malformed, which ends the connection)
            raise InvalidArgument("the request body ended early: the connection was "
                                  "closed") from None


def _media_hint(cls, media: str) -> str:
    accepted = "application/json" + (" or multipart/form-data" if cls.multipart_fields
                                     else "")
    return f"Content-Type {_printable(media)!r} is not accepted here: send {accepted}"


def describe(exc: ValidationError) -> str:
    """'k: Input should be a valid integer; user_id: Field required' — every problem named
    by its field, without echoing the input back."""
    parts = []
    for error in exc.errors(include_url=False, include_context=False, include_input=False
                            )[:MAX_ERRORS]:
        where = ".".join(_printable(str(p)) for p in error["loc"]) or "body"
        message = error["msg"]
        if error["type"] == "path_type":  # BentoML's message for a file field sent as text
            message = "must be a file, uploaded as multipart/form-data"
        parts.append(f"{where}: {message}")
    more = exc.error_count() - MAX_ERRORS
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _printable(text: str) -> str:
    """Safe to echo: bounded, and valid UTF-8 (a lone surrogate would break the JSON
    encoder of the error reply itself)."""
    text = text[:MAX_NAME_CHARS] + ("…" if len(text) > MAX_NAME_CHARS else "")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


async def _form_values(request, cls) -> dict:
    """A form body → the values to validate; any malformation is a 400 naming it."""
    try:
        form = await request.form(max_files=len(cls.multipart_fields),
                                  max_fields=4 * len(cls.model_fields))
    except HTTPException as exc:  # starlette's MultiPartException, raised as a 400
        raise InvalidArgument(f"malformed form body: {exc.detail}") from None
    values = {}
    for name in form:
        given = form.getlist(name)
        if len(given) > 1:
            raise InvalidArgument(f"{_printable(name)}: given {len(given)} times, once "
                                  f"expected")
        values[name] = _form_value(cls, name, given[0])
    return values


def _form_value(cls, name: str, value):
    is_file = isinstance(value, UploadFile)
    if name in cls.multipart_fields:
        if not is_file:  # BentoML would download a URL given here: never fetch for a client
            raise InvalidArgument(f"{name}: must be a file, uploaded as multipart/form-data")
        return value
    if is_file:
        raise InvalidArgument(f"{_printable(name)}: a text field, not a file")
    field = cls.model_fields.get(name)
    try:
        decoded = json.loads(value)
    except (ValueError, RecursionError):  # deeply nested JSON overflows the decoder
        return value  # plain text: the strict validation says whether it fits
    if field is not None and field.annotation is str and not isinstance(decoded, str):
        return value  # a title "1984" stays text
    return decoded
