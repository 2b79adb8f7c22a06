"""Load forecasters: ``observe(x)`` once per planner tick, ``predict(k)`` the value ``k``
ticks ahead. All are deterministic given the observations.

- ``constant``: the last value (Dynamo's ``ConstantPredictor``).
- ``moving-average``: mean of the last ``window`` values.
- ``kalman``: a local-linear-trend Kalman filter (state: level and slope; ``k`` steps ahead
  is ``level + k * slope``), so a ramp is extrapolated rather than chased. Two states: the
  filter is a few lines of numpy (ARCHITECTURE.md: "a few lines where a library would be
  heavier than the model").
- ``arima``: statsmodels' ARIMA(1,1,1) refit on the last ``window`` values (optional extra
  ``tokenmill[planner]``; ``make_predictor`` raises ``PredictorUnavailable`` without it).
  Until it has ``min_points`` values it answers like ``constant``.

Forecasts are never negative. With no observation yet every predictor answers 0.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

import numpy as np


class Predictor(Protocol):
    def observe(self, value: float) -> None: ...

    def predict(self, steps_ahead: int = 1) -> float: ...


class PredictorUnavailable(RuntimeError):
    """The predictor needs an optional package that is not installed."""


class ConstantPredictor:
    def __init__(self) -> None:
        self._last = 0.0

    def observe(self, value: float) -> None:
        self._last = float(value)

    def predict(self, steps_ahead: int = 1) -> float:
        return max(0.0, self._last)


class MovingAveragePredictor:
    def __init__(self, window: int = 6) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self._values: deque[float] = deque(maxlen=window)

    def observe(self, value: float) -> None:
        self._values.append(float(value))

    def predict(self, steps_ahead: int = 1) -> float:
        return max(0.0, sum(self._values) / len(self._values)) if self._values else 0.0


class KalmanPredictor:
    """Local linear trend: ``level' = level + slope + w1``, ``slope' = slope + w2``,
    ``obs = level + v``. ``process_var`` (per unit of the observed value squared, relative to
    ``obs_var``) sets how fast it follows changes."""

    _F = np.array([[1.0, 1.0], [0.0, 1.0]])
    _H = np.array([[1.0, 0.0]])

    def __init__(self, process_var: float = 0.1, obs_var: float = 1.0, slope_var: float = 0.01):
        self._q = np.diag([process_var, slope_var])
        self._r = obs_var
        self._x: np.ndarray | None = None  # [level, slope]
        self._p = np.eye(2) * 1e3

    def observe(self, value: float) -> None:
        z = float(value)
        if self._x is None:
            self._x = np.array([z, 0.0])
            return
        scale = max(1.0, abs(z)) ** 2  # variances in the value's own scale
        x = self._F @ self._x
        p = self._F @ self._p @ self._F.T + self._q * scale
        s = (self._H @ p @ self._H.T)[0, 0] + self._r * scale
        gain = (p @ self._H.T)[:, 0] / s
        self._x = x + gain * (z - x[0])
        self._p = (np.eye(2) - np.outer(gain, self._H[0])) @ p

    def predict(self, steps_ahead: int = 1) -> float:
        if self._x is None:
            return 0.0
        return max(0.0, float(self._x[0] + steps_ahead * self._x[1]))


class ArimaPredictor:
    def __init__(
        self, window: int = 60, min_points: int = 8, order: tuple[int, int, int] = (1, 1, 1)
    ) -> None:
        try:
            from statsmodels.tsa.arima.model import ARIMA  # type: ignore[import-untyped]
        except ImportError as exc:  # the optional extra is not installed
            raise PredictorUnavailable(
                "the arima predictor needs statsmodels (pip install 'tokenmill[planner]')"
            ) from exc
        self._arima = ARIMA
        self._values: deque[float] = deque(maxlen=window)
        self._min_points, self._order = min_points, order

    def observe(self, value: float) -> None:
        self._values.append(float(value))

    def predict(self, steps_ahead: int = 1) -> float:
        if not self._values:
            return 0.0
        if len(self._values) < self._min_points or np.ptp(self._values) == 0:
            return max(0.0, self._values[-1])
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter on short, flat series
            try:
                fit = self._arima(np.asarray(self._values), order=self._order).fit()
                forecast = float(fit.forecast(steps_ahead)[-1])
            except (ValueError, np.linalg.LinAlgError):
                forecast = self._values[-1]
        return max(0.0, forecast) if np.isfinite(forecast) else max(0.0, self._values[-1])


PREDICTORS: dict[str, Callable[[], Predictor]] = {
    "constant": ConstantPredictor,
    "moving-average": MovingAveragePredictor,
    "kalman": KalmanPredictor,
    "arima": ArimaPredictor,
}


def make_predictor(name: str) -> Predictor:
    """A fresh predictor by name (``ValueError`` for an unknown one)."""
    try:
        factory = PREDICTORS[name]
    except KeyError:
        raise ValueError(f"unknown predictor {name!r}; choose from {sorted(PREDICTORS)}") from None
    return factory()
