import pytest

from vita_audio_runtime.schedule import LLM, Mode, expand, producers, steps


@pytest.mark.parametrize("mode,expected", [
    (Mode.VANILLA, "M" * 40),
    (Mode.BALANCE, "M" + "m" * 4 + "MMM" + "m" * 8 + ("MMMM" + "m" * 10) * 2),
    (Mode.BOOST, "M" + "m" * 10 + ("MMMM" + "m" * 10) * 2),
    (Mode.TURBO, ("M" + "m" * 10) * 3),
], ids=lambda v: v.name.lower() if isinstance(v, Mode) else None)
def test_four_modes_expand_as_in_the_spec(mode, expected):
    assert expand(mode, len(expected)) == expected
    assert expand(mode.name.lower(), len(expected)) == expected


def test_steady_state_tokens_per_llm_forward():
    for mode, per_forward in [("vanilla", 1), ("balance", 3.5), ("boost", 3.5), ("turbo", 11)]:
        s = expand(mode, 600 + 1540)[600:]  # 1540 = 10 * 11 * 14: whole periods of every mode
        assert len(s) / s.count("M") == pytest.approx(per_forward), mode


def test_producers_count_modules_from_the_last_llm_step():
    assert producers("boost", 10, 16) == [LLM] + list(range(10)) + [LLM] * 4 + [0]
    assert producers("balance", 10, 16) == [LLM, 0, 1, 2, 3, LLM, LLM, LLM, 0, 1, 2, 3, 4, 5, 6, 7]


def test_runs_longer_than_n_fall_through_to_the_llm():
    # M m^12 with N = 10: the 11th 'm' is an LLM step, the 12th restarts at module 0.
    assert producers([1, 12], 10, 14) == [LLM] + list(range(10)) + [LLM, 0, LLM]
    assert producers([1, 5], 3, 8) == [LLM, 0, 1, 2, LLM, 0, LLM, 0]


def test_steps_group_bursts_and_respect_the_length():
    assert [s.modules for s in steps("turbo", 10, 25)] == [0, 10, 0, 10, 0, 2]
    assert sum(s.tokens for s in steps("balance", 10, 57)) == 57


@pytest.mark.parametrize("bad,message", [
    ("fast", "unknown mode"), ("1,10,4", "even"), ("0,10", "first count"), ([1, -2], "negative"),
    ("1,x", "unknown mode"), ([], "even"), ([1, 0, 0, 0], "pair of zeros"),
])
def test_bad_modes_are_rejected_with_a_reason(bad, message):
    with pytest.raises(ValueError, match=message):
        Mode.parse(bad)


def test_custom_list_is_accepted():
    assert Mode.parse("1,10,4,10") == Mode.BOOST.value
    assert expand("2,3", 10) == "MMmmmMMmmm"


def test_huge_counts_expand_only_what_is_needed():
    assert expand([10**12, 1], 5) == "MMMMM"
    assert producers([1, 10**12], 3, 6) == [-1, 0, 1, 2, -1, 0]
