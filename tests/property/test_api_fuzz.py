from __future__ import annotations

import contextlib

from hypothesis import given
from hypothesis import strategies as st

from meshnet import api


@given(st.binary(max_size=512))
def test_decode_body_gives_a_map_or_api_error(data: bytes) -> None:
    try:
        body, _ = api.decode_body(data)
    except api.ApiError:
        return
    assert isinstance(body, dict)
    with contextlib.suppress(api.ApiError):
        api.parse_request(body)


@given(st.binary(min_size=4, max_size=4))
def test_frame_length_is_bounded(header: bytes) -> None:
    try:
        n = api.frame_length(header, api.MAX_REQUEST_BYTES)
    except api.ApiError:
        return
    assert 0 <= n <= api.MAX_REQUEST_BYTES
