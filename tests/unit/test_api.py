from __future__ import annotations

import pytest

from meshnet import api


def test_round_trip_msgpack_and_json() -> None:
    for as_json in (False, True):
        frame = api.encode(api.request("status", x=1), as_json)
        n = api.frame_length(frame[:4], api.MAX_REQUEST_BYTES)
        body, was_json = api.decode_body(frame[4:4 + n])
        assert was_json is as_json
        assert api.parse_request(body) == ("status", {"x": 1})


def test_frame_over_limit_is_refused_before_reading() -> None:
    header = (api.MAX_REQUEST_BYTES + 1).to_bytes(4, "big")
    with pytest.raises(api.ApiError, match="exceeds"):
        api.frame_length(header, api.MAX_REQUEST_BYTES)


@pytest.mark.parametrize(
    "body",
    [{"op": "status"}, {"v": 2, "op": "status"}, {"v": 1}, {"v": 1, "op": ""},
     {"v": 1, "op": "x", "args": [1]}],
)
def test_bad_requests(body: dict[str, object]) -> None:
    with pytest.raises(api.ApiError):
        api.parse_request(body)
