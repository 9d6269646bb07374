"""Stop strings across deltas: nothing of a stop string leaks, the earliest match wins."""

from __future__ import annotations

from kiln.engine.stopping import StopMatcher


def run(stops: list[str], deltas: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = ""
    for d in deltas:
        text, stopped = m.feed(d)
        out += text
        if stopped:
            return out, True
    return out + m.flush(), False


def test_stop_spanning_deltas() -> None:
    assert run(["</end>"], ["Hello </", "en", "d> more"]) == ("Hello ", True)


def test_possible_prefix_is_held_then_released() -> None:
    m = StopMatcher(["###"])
    assert m.feed("a #") == ("a ", False)
    assert m.feed("#") == ("", False)
    assert m.feed("x") == ("##x", False)


def test_earliest_of_several_stops_wins() -> None:
    assert run(["world", "lo w"], ["hel", "lo world"]) == ("hel", True)


def test_no_stop_releases_everything() -> None:
    assert run(["zzz"], ["a", "b", "zz"]) == ("abzz", False)


def test_no_stops_is_a_pass_through() -> None:
    assert StopMatcher([]).feed("anything") == ("anything", False)


def test_unarmed_text_is_released_whole_and_not_searched() -> None:
    # a sequence short of its min_tokens: the held "#" goes out with it, and only text after arming is searched
    m = StopMatcher(["###"])
    assert m.feed("a #") == ("a ", False)
    assert m.feed("## b", armed=False) == ("### b", False)
    assert m.feed("##") == ("", False)
    assert m.feed("#c") == ("", True)
