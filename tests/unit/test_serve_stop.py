"""Stop sequences in `zerotrain serve`: where the text is cut, and what a stream holds back."""

from __future__ import annotations

import pytest

from engine.apps.serve import cut_at_stop, held_back


@pytest.mark.parametrize("text, stop, expected", [
    ("Hello world. Bye.", ["."], ("Hello world", True)),
    ("Hello world. Bye.", ["Bye", "o w"], ("Hell", True)),  # the earliest occurrence of any stop wins
    ("Hello world", ["xyz"], ("Hello world", False)),
    ("Hello world", [], ("Hello world", False)),
    ("\nUser: hi", ["\nUser:"], ("", True)),
])
def test_cut_at_stop(text, stop, expected):
    assert cut_at_stop(text, stop) == expected


@pytest.mark.parametrize("text, stop, expected", [
    ("Hello wor", ["world!"], 3),  # "wor" may become "world!"
    ("Hello w", ["world!", "w"], 0),  # a whole stop is cut before holding back
    ("Hello \nUs", ["\nUser:", "Usa"], 3),  # the longest possible start counts
    ("Hello", ["xyz"], 0),
    ("ab", ["abcdef"], 2),  # all of a short text may be held
    ("Hello", [], 0),
])
def test_held_back(text, stop, expected):
    assert held_back(cut_at_stop(text, stop)[0], stop) == expected
