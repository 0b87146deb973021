"""made_ahead: items made on a thread, in order, errors in their place, the thread stopped on close."""
import threading

import numpy as np
import pytest

from spurfast.made_ahead import made_ahead


def test_items_come_in_order_and_are_made_on_another_thread():
    makers = []

    def items():
        for i in range(10):
            makers.append(threading.get_ident())
            yield i
    assert list(made_ahead(items(), depth=3)) == list(range(10))
    assert set(makers) and threading.get_ident() not in makers


def test_an_error_making_an_item_is_raised_in_its_place():
    def items():
        yield 1
        yield 2
        raise ValueError("item 3 could not be made")
    got = []
    with pytest.raises(ValueError, match="item 3"):
        for x in made_ahead(items()):
            got.append(x)
    assert got == [1, 2]


def test_closing_early_stops_the_maker_before_the_caller_draws_again():
    # the maker draws from an rng the caller uses once it closes the iterator: no draw of the
    # maker may come after that, and the caller's draws follow the items it took
    rng = np.random.default_rng(0)
    made = []

    def items():
        while True:
            made.append(rng.integers(1 << 30))
            yield made[-1]
    it = made_ahead(items(), depth=2)
    taken = [next(it) for _ in range(3)]
    it.close()
    before = len(made)
    after = rng.integers(1 << 30)
    assert len(made) == before, "the maker drew after close()"
    assert taken == made[:3]
    plain = np.random.default_rng(0)
    assert [plain.integers(1 << 30) for _ in range(before)] == made and plain.integers(1 << 30) == after
    assert not any(t.name == "spurfast-made-ahead" and t.is_alive() for t in threading.enumerate())
