"""A command's answer is encoded to JSON once: the same bytes are stored with the effect and
sent to the caller, and a replay sends the stored text as it is."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
import starlette.responses
from fastapi.encoders import jsonable_encoder
from ordermesh_shared.commands import Answer, Recorded


@pytest.fixture
def no_second_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> str:
        raise AssertionError("the answer was encoded a second time")

    monkeypatch.setattr(starlette.responses.json, "dumps", refuse)


@pytest.mark.usefixtures("no_second_encoding")
def test_the_stored_text_and_the_response_are_the_same_encoding() -> None:
    body = jsonable_encoder({"id": "r-1", "amount": Decimal("12.50"), "items": [1, 2]})
    answer = Answer(201, body)
    recorded = Recorded("order:k", "fingerprint", answer, event=None)
    stored = recorded.args[3]  # key, fingerprint, status, body
    response = answer.response(replay=False)
    assert response.body == stored.encode()
    assert json.loads(response.body) == body
    assert response.status_code == 201
    assert response.headers["content-type"] == "application/json"
    assert response.headers["idempotent-replay"] == "false"


@pytest.mark.usefixtures("no_second_encoding")
def test_a_replay_sends_the_stored_text_as_it_is() -> None:
    stored = '{"id": "r-1", "amount": "12.50"}'  # as Postgres gives jsonb back
    answer = Answer(201, json.loads(stored), encoded=stored.encode())
    response = answer.response(replay=True)
    assert response.body == stored.encode()
    assert response.headers["idempotent-replay"] == "true"
