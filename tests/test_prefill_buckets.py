"""Prefill passes group rows of similar length, so few token slots are spent on padding."""

from apexdsp.lm.generation import Row, SamplingParams, length_buckets


def rows(*lengths: int, prefix: int = 0) -> list[Row]:
    return [Row(prompt_ids=list(range(prefix + n)), params=SamplingParams(), prefix_len=prefix) for n in lengths]


def own_lengths(buckets: list[list[Row]], prefix: int = 0) -> list[list[int]]:
    return [[len(row.prompt_ids) - prefix for row in bucket] for bucket in buckets]


def test_rows_of_equal_length_share_one_pass():
    assert own_lengths(length_buckets(rows(300, 300, 300), 0)) == [[300, 300, 300]]


def test_short_rows_are_not_padded_to_a_long_one():
    buckets = length_buckets(rows(100, 600, 590, 95, 98), 0)
    assert own_lengths(buckets) == [[600, 590], [100, 98, 95]]


def test_padding_stays_within_the_bound_and_every_row_is_kept_once():
    lengths = [37, 512, 480, 450, 130, 128, 129, 700, 64, 66]
    buckets = length_buckets(rows(*lengths, prefix=40), 40, max_padding=0.1)
    assert sorted(n for bucket in own_lengths(buckets, 40) for n in bucket) == sorted(lengths)
    for bucket in own_lengths(buckets, 40):
        slots = max(bucket) * len(bucket)
        assert slots - sum(bucket) <= 0.1 * slots


def test_no_padding_allowed_means_one_pass_per_length():
    assert own_lengths(length_buckets(rows(5, 7, 5, 7), 0, max_padding=0.0)) == [[7, 7], [5, 5]]
