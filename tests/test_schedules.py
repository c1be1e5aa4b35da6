"""Per-scale iteration schedules: the official linear rule and validation."""
import pytest

from models.schedules import (AdaptiveSchedule, ConstantSchedule, LinearSchedule, ListSchedule, ScheduleError,
                              parse_schedule)


@pytest.mark.parametrize('left,right,expected', [
    (10, 10, [10] * 10),
    (10, 5, [10, 9, 8, 8, 7, 7, 6, 6, 5, 5]),
    (5, 10, [5, 5, 6, 6, 7, 7, 8, 8, 9, 10]),
    (12, 3, [12, 11, 10, 9, 8, 7, 6, 5, 4, 3]),
])
def test_linear_matches_official_iters_list(left, right, expected):
    assert LinearSchedule(left, right).caps(10) == expected


def test_other_schedules():
    assert ConstantSchedule(4).caps(3) == [4, 4, 4] and ConstantSchedule(4).is_constant
    assert ListSchedule((3, 2, 1)).caps(3) == [3, 2, 1]
    assert LinearSchedule(6, 2).caps(3) == [6, 4, 2]
    ad = AdaptiveSchedule(1e-3, 12)
    assert ad.caps(2) == [12, 12] and ad.tol == 1e-3


@pytest.mark.parametrize('make', [
    lambda: ConstantSchedule(-1), lambda: LinearSchedule(-2, 3), lambda: ListSchedule(()),
    lambda: ListSchedule((1, -1)), lambda: AdaptiveSchedule(0.0, 3), lambda: AdaptiveSchedule(1e-3, -1),
    lambda: ListSchedule((1, 2)).caps(3), lambda: ConstantSchedule(2.5),
])
def test_invalid_schedules(make):
    with pytest.raises(ScheduleError):
        make()


def test_parse():
    assert parse_schedule('const:8') == ConstantSchedule(8)
    assert parse_schedule('linear:10,5') == LinearSchedule(10, 5)
    assert parse_schedule('list:3,2,1') == ListSchedule((3, 2, 1))
    assert parse_schedule('adaptive:1e-3,12') == AdaptiveSchedule(1e-3, 12)
    for spec in ('const:x', 'linear:1', 'wavy:3', 'list:', 'const:-2'):
        with pytest.raises(ScheduleError):
            parse_schedule(spec)
    assert str(parse_schedule('linear:10,5')) == 'linear:10,5'
