"""The one shard rule: ``id % 1000`` as four digits, for one id and for many."""

import numpy as np
import pandas as pd

from danbooru_assets.core.shards import NUM_SHARDS, SHARD_KEYS, shard_key, shard_numbers


def test_shard_key_is_the_bucket_folder_name():
    assert shard_key(123042) == "0042"
    assert shard_key(7) == "0007"
    assert shard_key(999) == "0999"
    assert shard_key(1000) == "0000"
    assert shard_key(np.int64(5_001_234)) == "0234"


def test_shard_keys_cover_every_bucket_in_order():
    assert len(SHARD_KEYS) == NUM_SHARDS == len(set(SHARD_KEYS))
    assert SHARD_KEYS[0] == "0000" and SHARD_KEYS[-1] == "0999"
    assert SHARD_KEYS == sorted(SHARD_KEYS)


def test_shard_numbers_agree_with_shard_key_for_arrays_and_series():
    ids = np.array([0, 7, 999, 1000, 123042, 9_999_999], dtype=np.int64)
    numbers = shard_numbers(ids)
    assert [SHARD_KEYS[n] for n in numbers] == [shard_key(i) for i in ids]
    series = shard_numbers(pd.Series(ids))
    assert isinstance(series, pd.Series)
    assert list(series) == list(numbers)
