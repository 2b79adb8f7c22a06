"""Per-request router options (extra field ``router``): policy knobs reach the router, a pin
needs ``allow_pinning`` (400 without it) and then wins over the policy."""

from __future__ import annotations

import httpx

from tokenmill.core.request import EngineRequest
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.frontend.app import FrontendConfig
from tokenmill.frontend.preprocess import ServedModel
from tokenmill.launch.stacks import assemble_local_stack as assemble_stack
from tokenmill.routing.dispatch import RoundRobinPolicy
from tokenmill.routing.kv_policy import KvRouterPolicy
from tokenmill.routing.options import RouterOptions
from tokenmill.worker.echo_engine import EchoConfig, EchoEngine


def request(i: int) -> EngineRequest:
    return EngineRequest(request_id=f"r{i}", prompt_token_ids=list(range(i, i + 40)))


async def test_pin_wins_and_knobs_reach_the_policy():
    policy = KvRouterPolicy.create("least-loaded", 16)
    first = await policy.select(request(0), ["w1", "w2"])
    other = "w2" if first == "w1" else "w1"
    # Least loaded would avoid ``first`` now; the pin overrides it.
    assert await policy.select(request(1), ["w1", "w2"], RouterOptions(worker_id=first)) == first
    overrides = policy._overrides(RouterOptions(temperature=0.7, lower_tier_credit=0.25))
    assert (overrides.policy.temperature, overrides.policy.lower_tier_credit) == (0.7, 0.25)
    assert overrides.worker_id is None
    assert await policy.select(request(2), ["w1", "w2"]) == other
    assert (
        await RoundRobinPolicy().select(request(3), ["a", "b"], RouterOptions(worker_id="b")) == "b"
    )


async def _post(config: FrontendConfig, tiny_model_dir, body: dict) -> httpx.Response:
    tokenizer = Tokenizer.from_hf_dir(tiny_model_dir)
    model = ServedModel("tiny", tokenizer, 2048)
    stack = await assemble_stack(EchoEngine(EchoConfig()), model, config)
    try:
        transport = httpx.ASGITransport(app=stack.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/v1/completions", json=body)
    finally:
        await stack.close()


async def test_pinning_needs_the_server_flag(tiny_model_dir):
    instance = "pinned-nowhere"
    body = {"prompt": "hi", "max_tokens": 2, "router": {"worker_id": instance, "temperature": 0.5}}
    refused = await _post(FrontendConfig(), tiny_model_dir, body)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "router.worker_id"
    allowed = await _post(FrontendConfig(allow_pinning=True), tiny_model_dir, body)
    assert allowed.status_code == 200  # an unknown pinned instance falls back to the policy
    bad = await _post(FrontendConfig(), tiny_model_dir, {"prompt": "hi", "router": {"x": 1}})
    assert bad.status_code == 400


async def test_remote_route_policy_skips_a_failed_router_replica():
    from tokenmill.routing.remote_router import RemoteRoutePolicy, RouteDecision, route_endpoint
    from tokenmill.runtime.inprocess import InProcessRuntime
    from tokenmill.runtime.interface import InstanceFailedError

    async def broken(req, ctx):
        raise InstanceFailedError("router replica died")
        yield  # an async generator

    async def healthy(req, ctx):
        yield RouteDecision(instance_id=req.instance_ids[-1])

    runtime = InProcessRuntime()
    await runtime.serve_endpoint(route_endpoint("tokenmill"), broken, instance_id="r-bad")
    await runtime.serve_endpoint(route_endpoint("tokenmill"), healthy, instance_id="r-good")
    policy = RemoteRoutePolicy(runtime.client(route_endpoint("tokenmill")))
    chosen = [await policy.select(request(i), ["w1", "w2"]) for i in range(4)]
    assert chosen == ["w2"] * 4
    for i in range(4):
        policy.on_finished(f"r{i}")
    await policy.close()
    await runtime.shutdown()
