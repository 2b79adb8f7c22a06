import pytest

from tokenmill.router.disagg import (
    Decision,
    DisaggConfig,
    DisaggMode,
    PrefillPool,
    Reason,
    decide,
)

POOL = PrefillPool(num_workers=2, min_waiting_prefill_tokens=0)


def test_never_is_local_whatever_the_prompt():
    d = decide(DisaggConfig(mode=DisaggMode.NEVER), 10_000, 0, POOL)
    assert d == Decision(False, Reason.MODE_NEVER, 10_000)


def test_no_prefill_workers_is_local_in_every_other_mode():
    for mode in (DisaggMode.AUTO, DisaggMode.ALWAYS):
        d = decide(DisaggConfig(mode=mode), 10_000, 0, PrefillPool())
        assert (d.remote, d.reason) == (False, Reason.NO_PREFILL_WORKERS)


def test_always_is_remote_even_for_a_cached_prompt():
    d = decide(DisaggConfig(mode=DisaggMode.ALWAYS), 100, 100, POOL)
    assert d == Decision(True, Reason.MODE_ALWAYS, 0)


@pytest.mark.parametrize(
    "prompt,hit,remote,reason",
    [
        (512, 0, False, Reason.SHORT_PREFILL),  # at the threshold: local
        (513, 0, True, Reason.LONG_PREFILL),
        (4_000, 3_600, False, Reason.SHORT_PREFILL),  # the decode worker's hit counts
        (4_000, 3_000, True, Reason.LONG_PREFILL),
        (100, 500, False, Reason.SHORT_PREFILL),  # a hit beyond the prompt clamps to 0
    ],
)
def test_auto_threshold_on_tokens_left_after_the_decode_hit(prompt, hit, remote, reason):
    d = decide(DisaggConfig(min_remote_prefill_tokens=512), prompt, hit, POOL)
    assert (d.remote, d.reason, d.new_prefill_tokens) == (remote, reason, max(0, prompt - hit))


def test_auto_saturated_pool_prefills_locally():
    cfg = DisaggConfig(max_prefill_queue_tokens=1_000)
    busy = PrefillPool(num_workers=3, min_waiting_prefill_tokens=1_001)
    assert decide(cfg, 5_000, 0, busy).reason is Reason.PREFILL_SATURATED
    at_limit = PrefillPool(num_workers=3, min_waiting_prefill_tokens=1_000)
    assert decide(cfg, 5_000, 0, at_limit).reason is Reason.LONG_PREFILL


def test_config_rejects_negative_thresholds():
    with pytest.raises(ValueError, match="min_remote_prefill_tokens"):
        DisaggConfig(min_remote_prefill_tokens=-1)
    with pytest.raises(ValueError, match="max_prefill_queue_tokens"):
        DisaggConfig(max_prefill_queue_tokens=-1)


def test_interference_guard_sends_would_be_local_prefills_remote_on_busy_decoders():
    from tokenmill.router.disagg import DecodeLoad

    cfg = DisaggConfig(mode=DisaggMode.AUTO, max_local_decodes=2)
    pool = PrefillPool(num_workers=2, min_waiting_prefill_tokens=0)
    busy, calm = DecodeLoad(num_decoding=3), DecodeLoad(num_decoding=2)
    assert decide(cfg, 1000, 800, pool, busy).reason is Reason.DECODE_BUSY  # short, but busy
    assert decide(cfg, 1000, 800, pool, busy).remote
    assert decide(cfg, 1000, 800, pool, calm).reason is Reason.SHORT_PREFILL
    assert decide(cfg, 1000, 800, pool).reason is Reason.SHORT_PREFILL  # no load: no guard
    full = PrefillPool(num_workers=2, min_waiting_prefill_tokens=10**6)
    assert decide(cfg, 9000, 0, full, busy).reason is Reason.DECODE_BUSY
    assert decide(cfg, 9000, 0, full, calm).reason is Reason.PREFILL_SATURATED
    assert decide(cfg, 1000, 1000, pool, busy).reason is Reason.SHORT_PREFILL  # nothing to do
    with pytest.raises(ValueError):
        DisaggConfig(max_local_decodes=-1)
