from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mapreduce_ray.plan import (
    CHUNK_BYTES_PER_PEER,
    CHUNK_INTAKE_S,
    CHUNKS_PER_SEGMENT,
    MIN_CHUNK_BYTES,
    MIN_SEGMENT_BYTES,
    plan_round,
    plan_segments,
    segment_limits,
    split_by_weight,
    split_within,
)
from mapreduce_ray.types import JobSpec, MinerSlot, TensorSpec

weights_st = (
    st.lists(st.integers(0, 1000), min_size=1, max_size=8).filter(any).map(lambda ws: tuple(float(w) for w in ws))
)
# (numel, chunk) with at most a few thousand chunks
sizes_st = st.integers(0, 10**7).flatmap(lambda n: st.tuples(st.just(n), st.integers(max(1, n // 2000), 10**7)))


@given(sizes=sizes_st, weights=weights_st, smallest=st.integers(1, 10**5), pace=st.integers(0, 10**7))
def test_plan_covers_every_element_once_in_order(sizes, weights, smallest, pace):
    numel, chunk = sizes
    paced = tuple(pace >> i for i in range(len(weights)))  # miners of different measured intakes
    segments = plan_segments(numel, weights, chunk, min_chunk_elems=smallest, paced_elems=paced)
    assert [s.miner for s in segments] == list(range(len(weights)))
    assert segments[0].start == 0 and segments[-1].stop == numel
    for before, after in zip(segments, segments[1:], strict=False):
        assert before.stop == after.start
    for s in segments:
        pieces = [b - a for a, b in s.chunks]
        assert sum(pieces) == s.numel and all(1 <= n <= chunk for n in pieces)
        assert [a for a, _ in s.chunks[1:]] == [b for _, b in s.chunks[:-1]]
        if not pieces:
            continue
        # chunks of 1/CHUNKS_PER_SEGMENT of the segment or its miner's paced size (all of it or up to a quarter), within
        # the job's chunk and over the floor, one of them shorter; at both ends a ramp doubling from the floor
        least = max(smallest, -(-s.numel // CHUNKS_PER_SEGMENT))
        step = min(chunk, max(least, paced[s.miner]))
        if s.numel <= step:
            assert pieces == [s.numel]  # a segment no longer than its chunk is one chunk
            continue
        step = min(step, max(least, s.numel // 4))
        ramp = [smallest * 2**k for k in range(64) if smallest * 2**k < step]
        assert pieces[: len(ramp)] == ramp and pieces[len(pieces) - len(ramp) :] == ramp[::-1]
        steady = pieces[len(ramp) : len(pieces) - len(ramp)]
        assert steady and sum(n != step for n in steady) <= 1 and max(steady) <= step
        assert len(steady) <= max(CHUNKS_PER_SEGMENT, -(-s.numel // chunk))


@given(sizes=sizes_st, weights=weights_st)
def test_segment_sizes_follow_weights_within_one_element(sizes, weights):
    numel, chunk = sizes
    total = sum(Fraction(w) for w in weights)
    for s, w in zip(plan_segments(numel, weights, chunk), weights, strict=True):
        ideal = numel * Fraction(w) / total
        assert abs(s.numel - ideal) < 1  # so within one chunk as well
        if w == 0:
            assert s.numel == 0 and s.chunks == ()


def test_numel_smaller_than_miner_count_leaves_some_miners_empty():
    assert split_by_weight(2, (1.0, 1.0, 1.0)) == [1, 1, 0]
    assert split_by_weight(1, (1.0, 2.0)) == [0, 1]


def test_plan_round_cuts_chunks_by_bytes():
    job = JobSpec(
        "j",
        "j",
        2,
        (MinerSlot(1, "a", "127.0.0.1:1", 1.0), MinerSlot(2, "b", "127.0.0.1:2", 1.0)),
        chunk_bytes=1024,
        timeout_s=1,
        max_bytes=1 << 20,
    )
    segments = plan_round(job, TensorSpec("float64", (3, 100_000)))  # 2.4 MB: both miners
    assert [(s.start, s.stop) for s in segments] == [(0, 150_000), (150_000, 300_000)]
    assert segments[0].chunks[:2] == ((0, 128), (128, 256)) and segments[0].chunks[-1] == (149_888, 150_000)


def test_a_miner_measured_fast_gets_fewer_larger_chunks_up_to_the_jobs_chunk_size():
    """Each peer's chunk fills CHUNK_INTAKE_S of its miner's measured intake shared by the peers: 25 MB/s over 2
    peers is 250,000 bytes (62,500 float32 elements); 1 GB/s would be 10 MB, held to the job's 1 MiB; a miner
    not measured gets 1/CHUNKS_PER_SEGMENT of its segment."""
    slots = tuple(
        MinerSlot(uid, f"m{uid}", f"127.0.0.1:{uid}", 1.0, throughput)
        for uid, throughput in ((1, 25e6), (2, 1e9), (3, 0.0))
    )
    job = JobSpec("j", "j", 2, slots, chunk_bytes=1 << 20, timeout_s=1, max_bytes=1 << 30)
    segments = plan_round(job, TensorSpec("float32", (3 << 22,)))  # 16 MiB a segment
    steps = [max(b - a for a, b in s.chunks) for s in segments]
    assert CHUNK_INTAKE_S == 0.02 and steps == [62_500, (1 << 20) // 4, (16 << 20) // 4 // CHUNKS_PER_SEGMENT]


@pytest.mark.parametrize(
    ("weights", "message"),
    [((), "finite and >= 0"), ((1.0, -1.0), "finite and >= 0"), ((float("nan"),), "finite"), ((0.0, 0.0), "positive")],
)
def test_bad_weights_are_refused(weights, message):
    with pytest.raises(ValueError, match=message):
        split_by_weight(10, weights)


def test_a_segment_is_cut_into_chunks_per_segment_within_the_job_chunk_size_and_the_floor():
    slots = (MinerSlot(1, "a", "127.0.0.1:1", 1.0), MinerSlot(2, "b", "127.0.0.1:2", 1.0))
    job = JobSpec("j", "j", 2, slots, chunk_bytes=4 << 20, timeout_s=1, max_bytes=1 << 30)
    big = plan_round(job, TensorSpec("float32", (16 << 20,)))  # 2 x 32 MiB: 256 KiB chunks, under the job's 4 MiB
    kib = [[(b - a) * 4 // 1024 for a, b in s.chunks] for s in big]
    assert kib == [[64, 128] + [256] * 126 + [128, 128, 64]] * 2  # ramps from the 64 KiB floor at both ends
    huge = plan_round(job, TensorSpec("float64", (1 << 28,)))  # 2 x 1 GiB: the job's 4 MiB rules
    mib = [(b - a) * 8 / (1 << 20) for a, b in huge[0].chunks]
    assert mib[:7] == [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2, 4]
    assert mib[-8:] == [4, 1 / 8, 2, 1, 1 / 2, 1 / 4, 1 / 8, 1 / 16]  # what the steps leave, then the ramp down
    assert len(mib) == 6 + 255 + 6  # the ramps take 4 MiB less 1/16 each
    small = plan_round(job, TensorSpec("float64", (MIN_SEGMENT_BYTES // 4,)))  # 2 x 64 KiB: one chunk each
    assert [s.chunks for s in small] == [((0, 8192),), ((8192, 16384),)]
    floor = plan_round(job, TensorSpec("float32", (MIN_CHUNK_BYTES,)))  # segments of two floors each
    assert [len(s.chunks) for s in floor] == [2, 2] and floor[0].chunks[0] == (0, MIN_CHUNK_BYTES // 4)
    crowd = JobSpec("j", "j", 64, slots, chunk_bytes=4 << 20, timeout_s=1, max_bytes=1 << 30)  # 64 peers
    assert plan_round(crowd, TensorSpec("float32", (16 << 20,)))[0].chunks[0] == (0, 64 * CHUNK_BYTES_PER_PEER // 4)


def test_chunk_must_be_positive():
    with pytest.raises(ValueError, match="chunk_elems must be >= 1"):
        plan_segments(10, (1.0,), 0)


def test_a_small_tensor_goes_to_fewer_miners_the_heaviest_first():
    slots = tuple(MinerSlot(u, f"h{u}", f"127.0.0.1:{u}", w) for u, w in ((1, 1.0), (2, 3.0), (3, 2.0)))
    job = JobSpec("j", "j", 2, slots, chunk_bytes=1 << 20, timeout_s=1, max_bytes=1 << 30)
    one = plan_round(job, TensorSpec("float32", (1000,)))  # 4 KB: one miner, the heaviest
    assert [s.numel for s in one] == [0, 1000, 0]
    two = plan_round(job, TensorSpec("float32", (MIN_SEGMENT_BYTES // 2,)))  # 2 x 64 KiB: the two heaviest
    assert [s.numel for s in two] == [0, 19661, 13107]
    every = plan_round(job, TensorSpec("float32", (MIN_SEGMENT_BYTES,)))
    assert all(s.numel for s in every)


def test_water_filling_holds_a_full_segment_at_its_limit_and_spreads_the_rest_by_weight():
    assert split_within(100, (2.0, 1.0, 1.0), (30, 100, 100)) == [30, 35, 35]
    assert split_within(100, (1.0, 0.0), (60, 50)) == [60, 40]  # the weighted one is full: the rest goes on
    assert split_within(10, (1.0, 1.0), (100, 100)) == split_by_weight(10, (1.0, 1.0))
    with pytest.raises(ValueError, match="100 elements exceed the segments' limits, 99 in all"):
        split_within(100, (1.0, 1.0), (49, 50))


@given(st.integers(0, 10**6), weights_st, st.data())
def test_water_filled_sizes_cover_the_tensor_within_every_limit(numel, weights, data):
    limits = tuple(data.draw(st.lists(st.integers(0, 10**6), min_size=len(weights), max_size=len(weights))))
    if sum(limits) < numel:
        with pytest.raises(ValueError, match="exceed the segments' limits"):
            split_within(numel, weights, limits)
        return
    sizes = split_within(numel, weights, limits)
    assert sum(sizes) == numel
    assert all(0 <= size <= limit for size, limit in zip(sizes, limits, strict=True))
    free = [i for i, (size, limit) in enumerate(zip(sizes, limits, strict=True)) if size < limit and weights[i]]
    for i in free:  # an unsaturated miner got at least its weight's share of what the unsaturated ones hold
        rest = sum(sizes[j] for j in free)
        assert sizes[i] >= rest * Fraction(weights[i]) / sum(Fraction(weights[j]) for j in free) - 1


def test_segment_limits_split_the_least_capacity_among_a_segments_miners():
    assert segment_limits((64, 32, 64), 1) == (64, 32, 64)
    assert segment_limits((64, 32, 64), 2) == (16, 16, 32)
    assert segment_limits((64, 0), 1) is None  # a capacity not told: no limit
    assert segment_limits((100,), 1) == (96,)  # whole elements of any dtype
