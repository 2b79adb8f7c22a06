"""L2: the planner, a pure decision maker: per-pool observations in, target replicas out.

``observation`` (what a planner sees), ``predictors`` (load forecasts), ``perf`` (latency
model from a timing profile), ``policies`` (``sla``, ``load``, ``dynamo``), ``governor``
(hysteresis, cooldown, min/max, total budget), ``planner`` (the state machine on an injected
clock). No I/O, no engine, no router: adapters (``launch.actuator``, ``sim.cluster``) observe
and apply.
"""
