"""Tests for connmix_tx.ids: snowflake client ids and xid-like node ids (docs/operations.md)."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import pytest

from connmix_tx.ids import (
    MAX_CLIENT_ID,
    TWITTER_EPOCH_MS,
    InvalidClientId,
    Snowflake,
    new_node_id,
    node_number_of,
    parse_client_id,
)

SEED_CLIENT_ID = 1463819408261513216
SEED_NODE_ID = "c8u7jfbin5659oh0b13g"
BASE32HEX = "0123456789abcdefghijklmnopqrstuv"


class FakeMillis:
    """A settable millisecond clock for ``Snowflake(now_ms=...)``."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def decode(client_id: int) -> tuple[int, int, int]:
    """(unix ms, node number, sequence) of a snowflake id, by the layout in docs/operations.md."""
    return (client_id >> 22) + TWITTER_EPOCH_MS, (client_id >> 12) & 1023, client_id & 4095


def xid_time(node_id: str) -> int:
    """The Unix time in the first 4 bytes of an xid-like node id."""
    bits = 0
    for char in node_id:
        bits = (bits << 5) | BASE32HEX.index(char)
    return (bits >> 4) >> 64  # drop the 4 padding bits, then the 8 bytes after the time


# Snowflake -----------------------------------------------------------------------------------


def test_seed_client_id_decodes_to_node_0_sequence_0_on_2021_11_25() -> None:
    ms, node, sequence = decode(SEED_CLIENT_ID)
    assert (node, sequence) == (0, 0)
    assert datetime.fromtimestamp(ms / 1000, timezone.utc).date().isoformat() == "2021-11-25"
    assert node_number_of(SEED_CLIENT_ID) == 0


def test_generator_reproduces_the_layout() -> None:
    ms, _, _ = decode(SEED_CLIENT_ID)
    assert Snowflake(0, FakeMillis(ms)).next_id() == SEED_CLIENT_ID
    client_id = Snowflake(37, FakeMillis(ms)).next_id()
    assert decode(client_id) == (ms, 37, 0)
    assert node_number_of(client_id) == 37


def test_sequence_counts_within_one_millisecond_and_restarts_in_the_next() -> None:
    clock = FakeMillis(1_700_000_000_000)
    gen = Snowflake(5, clock)
    first = [decode(gen.next_id()) for _ in range(3)]
    assert first == [(clock.ms, 5, 0), (clock.ms, 5, 1), (clock.ms, 5, 2)]
    clock.ms += 1
    assert decode(gen.next_id()) == (clock.ms, 5, 0)


def test_4096_ids_in_one_millisecond_roll_into_the_next() -> None:
    clock = FakeMillis(1_700_000_000_000)
    gen = Snowflake(1, clock)
    ids = [gen.next_id() for _ in range(4096)]
    assert decode(ids[-1]) == (clock.ms, 1, 4095)
    rolled = gen.next_id()
    assert decode(rolled) == (clock.ms + 1, 1, 0)
    # When the real clock reaches that millisecond, ids keep increasing without a repeat.
    clock.ms += 1
    after = gen.next_id()
    assert decode(after) == (clock.ms, 1, 1)
    everything = ids + [rolled, after]
    assert everything == sorted(set(everything))


def test_clock_going_backwards_keeps_ids_increasing() -> None:
    clock = FakeMillis(1_700_000_000_500)
    gen = Snowflake(2, clock)
    ids = [gen.next_id()]
    clock.ms -= 400
    ids += [gen.next_id(), gen.next_id()]
    assert [decode(i) for i in ids] == [(1_700_000_000_500, 2, s) for s in range(3)]
    clock.ms = 1_700_000_000_501  # caught up again
    ids.append(gen.next_id())
    assert decode(ids[-1]) == (1_700_000_000_501, 2, 0)
    assert ids == sorted(set(ids))


@pytest.mark.parametrize("number", [0, 1, 1023])
def test_node_number_bounds_accepted(number: int) -> None:
    client_id = Snowflake(number, FakeMillis(1_700_000_000_000)).next_id()
    assert node_number_of(client_id) == number


@pytest.mark.parametrize("number", [-1, 1024, 5000])
def test_node_number_out_of_bounds_refused(number: int) -> None:
    with pytest.raises(ValueError):
        Snowflake(number)


def test_default_clock_gives_ids_of_now() -> None:
    ms, node, _ = decode(Snowflake(3).next_id())
    assert node == 3
    assert abs(ms - datetime.now(timezone.utc).timestamp() * 1000) < 60_000


# parse_client_id -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("123", 123),
        (123, 123),
        (b"123", 123),
        ("1463819408261513216", SEED_CLIENT_ID),
        (SEED_CLIENT_ID, SEED_CLIENT_ID),
        (str(MAX_CLIENT_ID), MAX_CLIENT_ID),
        (MAX_CLIENT_ID, MAX_CLIENT_ID),
    ],
)
def test_parse_client_id_accepts_decimal_strings_and_integers(value: object, expected: int) -> None:
    assert parse_client_id(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        0,
        "0",
        -1,
        "-1",
        2**63,
        str(2**63),
        "12a",
        "+12",
        " 12",
        "12 ",
        "1.0",
        "\u0661\u0662",  # Arabic-Indic digits: isdigit() but not ASCII
        "1" * 25,
        1.5,
        1.0,
        True,
        False,
        None,
        "",
        [1],
        {"id": 1},
    ],
)
def test_parse_client_id_refuses_everything_else(value: object) -> None:
    with pytest.raises(InvalidClientId):
        parse_client_id(value)


def test_invalid_client_id_is_a_value_error() -> None:
    assert issubclass(InvalidClientId, ValueError)


# Node ids ------------------------------------------------------------------------------------


def test_node_id_format() -> None:
    node_id = new_node_id()
    assert re.fullmatch(r"[0-9a-v]{20}", node_id)
    # 96 bits in 100: the last character carries one bit and four zero padding bits.
    assert node_id[-1] in "0g"
    assert re.fullmatch(r"[0-9a-v]{20}", SEED_NODE_ID)


def test_node_id_starts_with_the_time_like_the_seed() -> None:
    node_id = new_node_id(lambda: 1648130493)
    assert node_id[:6] == SEED_NODE_ID[:6] == "c8u7jf"
    assert xid_time(node_id) == 1648130493
    assert xid_time(SEED_NODE_ID) == 1648130493


def test_node_id_time_is_now_by_default() -> None:
    assert abs(xid_time(new_node_id()) - datetime.now(timezone.utc).timestamp()) < 60


def test_node_ids_are_distinct_even_in_the_same_second() -> None:
    ids = {new_node_id(lambda: 1648130493) for _ in range(1000)}
    assert len(ids) == 1000
