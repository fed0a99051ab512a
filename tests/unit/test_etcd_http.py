"""The etcd client's line splitting of streamed answers (one JSON message per line)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ordermesh_shared.etcd_http import lines


async def chunked(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def split(*chunks: bytes) -> list[bytes]:
    return [line async for line in lines(chunked(*chunks))]


async def test_messages_cut_anywhere_by_the_network_come_out_whole() -> None:
    assert await split(b'{"a"', b": 1}\n{", b'"b": 2}\n') == [b'{"a": 1}', b'{"b": 2}']


async def test_several_messages_in_one_chunk_are_separated() -> None:
    assert await split(b"{}\n{}\n{}\n") == [b"{}", b"{}", b"{}"]


async def test_blank_lines_are_skipped_and_a_last_unterminated_message_kept() -> None:
    assert await split(b"\n\r\n", b"{}\n  \n", b'{"end": 1}') == [b"{}", b'{"end": 1}']
