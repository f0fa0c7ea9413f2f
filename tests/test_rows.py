"""RowStore: per data point rows collected batch by batch into arrays sized once."""

import numpy as np
import pytest

from pytest_memaudit.metric.rows import RowStore


def test_the_rows_of_every_batch_in_order_and_views_not_copies():
    rng = np.random.default_rng(0)
    batches = [{"a": rng.random(n), ("b", "x"): rng.random((n, 3)).astype(np.float32)} for n in (4, 0, 7, 1)]
    store = RowStore(20)
    for batch in batches:
        store.add(batch)
    arrays = store.arrays()
    assert store.count == 12
    np.testing.assert_array_equal(arrays["a"], np.concatenate([b["a"] for b in batches]))
    np.testing.assert_array_equal(arrays[("b", "x")], np.concatenate([b[("b", "x")] for b in batches]))
    assert arrays[("b", "x")].dtype == np.float32 and arrays[("b", "x")].shape == (12, 3)
    assert np.shares_memory(arrays["a"], store.arrays()["a"])


@pytest.mark.parametrize("batch, message", [
    ({"a": np.zeros(3), "b": np.zeros(2)}, r"differ in number between keys: \[2, 3\]"),
    ({"a": np.zeros(3)}, r"brings the keys \['a'\], earlier batches \['a', 'b'\]"),
    ({"a": np.zeros(9), "b": np.zeros(9)}, "11 rows do not fit in a store of 10"),
])
def test_a_batch_that_does_not_fit_the_store_is_refused(batch, message):
    store = RowStore(10)
    store.add({"a": np.zeros(2), "b": np.zeros(2)})
    with pytest.raises(ValueError, match=message):
        store.add(batch)
    assert store.count == 2


def test_loaded_rows_keep_room_for_the_rest_of_the_stream():
    store = RowStore(10)
    store.load({"a": np.arange(4.0)})
    store.add({"a": np.arange(6.0)})
    np.testing.assert_array_equal(store.arrays()["a"], [0, 1, 2, 3, 0, 1, 2, 3, 4, 5])
    store.load({"a": np.arange(12.0)})  # more than the capacity: the store grows to hold them
    assert store.capacity == 12 and store.count == 12
