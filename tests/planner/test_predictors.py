import pytest

from tokenmill.planner.predictors import (
    PREDICTORS,
    ConstantPredictor,
    KalmanPredictor,
    MovingAveragePredictor,
    make_predictor,
)


def test_constant_and_moving_average():
    c, m = ConstantPredictor(), MovingAveragePredictor(3)
    assert c.predict() == 0.0 and m.predict() == 0.0
    for x in (1.0, 2.0, 3.0, 10.0):
        c.observe(x)
        m.observe(x)
    assert c.predict(5) == 10.0
    assert m.predict() == pytest.approx(5.0)  # the last three


def test_kalman_extrapolates_a_ramp_and_settles_on_a_level():
    k = KalmanPredictor()
    for t in range(30):
        k.observe(10.0 + 2.0 * t)  # the next value is 70
    assert k.predict(1) == pytest.approx(70.0, rel=0.05)
    assert k.predict(5) > k.predict(1)  # the trend goes on
    flat = KalmanPredictor()
    for _ in range(30):
        flat.observe(5.0)
    assert flat.predict(10) == pytest.approx(5.0, rel=1e-3)


def test_forecasts_are_never_negative():
    k = KalmanPredictor()
    for x in (50.0, 30.0, 10.0, 0.0, 0.0):
        k.observe(x)
    assert k.predict(20) == 0.0


def test_arima_through_statsmodels():
    pytest.importorskip("statsmodels", reason="the arima predictor is an optional extra")
    a = make_predictor("arima")
    for t in range(4):
        a.observe(float(t))
    assert a.predict() == 3.0  # too few points: the last value
    for t in range(4, 16):
        a.observe(float(t))
    assert a.predict() == pytest.approx(16.0, abs=2.0)


def test_unknown_predictor_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown predictor"):
        make_predictor("prophet")
    assert set(PREDICTORS) == {"constant", "moving-average", "kalman", "arima"}
