"""connmix_tx.later: a result now costs no Deferred; a result later gets the same continuation."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from connmix_tx.later import now_or_later, when_ready


def fired(deferred: Deferred) -> Any:
    results: list = []
    deferred.addBoth(results.append)
    assert results, "the Deferred did not fire"
    return results[0]


def test_a_result_now_is_answered_now_without_a_deferred() -> None:
    assert when_ready(None, lambda error: "sent" if error is None else error) == "sent"
    assert when_ready((2, 1), lambda counts: sum(counts)) == 3
    # A falsy value is a value, not "no result".
    assert when_ready(0, lambda value: value + 1) == 1


def test_a_result_later_gets_the_continuation_when_it_fires() -> None:
    later: Deferred = Deferred()
    seen: list = []
    answer = when_ready(later, lambda value: seen.append(value) or value * 2)
    assert isinstance(answer, Deferred) and seen == []
    later.callback(21)
    assert seen == [21] and fired(answer) == 42


def test_an_already_fired_deferred_is_still_a_result_later() -> None:
    answer = when_ready(succeed("ok"), str.upper)
    assert isinstance(answer, Deferred) and fired(answer) == "OK"


def test_failed_sees_the_failure_of_the_result_and_of_then() -> None:
    refused: Deferred = Deferred()
    answer = when_ready(refused, lambda value: "unreached", failed=lambda f: f"refused: {f.value}")
    refused.errback(ValueError("no link"))
    assert fired(answer) == "refused: no link"

    def broken(value: Any) -> Any:
        raise KeyError(value)

    late: Deferred = Deferred()
    answer = when_ready(late, broken, failed=lambda f: f.type.__name__)
    late.callback("x")
    assert fired(answer) == "KeyError"


def test_without_failed_a_failure_passes_through() -> None:
    refused: Deferred = Deferred()
    answer = when_ready(refused, lambda value: value)
    refused.errback(ValueError("gone"))
    outcome = fired(answer)
    assert isinstance(outcome, Failure) and outcome.check(ValueError)


def test_then_raising_on_a_result_now_raises_to_the_caller() -> None:
    def refuse(error: str | None) -> dict:
        raise RuntimeError(f"send failed: {error}")

    with pytest.raises(RuntimeError, match="send failed: client not found"):
        when_ready("client not found", refuse, failed=lambda f: "never called for a result now")


def test_extra_args_go_to_then_and_failed_alike() -> None:
    assert when_ready(2, lambda value, factor, offset: value * factor + offset, 10, 1) == 21
    later: Deferred = Deferred()
    answer = when_ready(later, lambda value, request_id: (value, request_id), 7,
                        failed=lambda failure, request_id: ("error", request_id, str(failure.value)))
    later.errback(ValueError("late"))
    assert fired(answer) == ("error", 7, "late")


def test_now_or_later_picks_the_continuation_by_the_kind_of_result() -> None:
    assert now_or_later(b"body", lambda body: ("now", body), lambda d: ("later", d)) == ("now", b"body")
    later: Deferred = Deferred()
    kind, deferred = now_or_later(later, lambda body: ("now", body), lambda d: ("later", d))
    assert kind == "later" and deferred is later
