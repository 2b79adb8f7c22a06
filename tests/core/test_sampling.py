"""SamplingParams validation: the seed range (the one the sampler's generator takes)."""

from __future__ import annotations

import pytest

from tokenmill.core.errors import InvalidRequestError
from tokenmill.core.sampling import MAX_SEED, MIN_SEED, SamplingParams


@pytest.mark.parametrize("seed", [MIN_SEED, -1, 0, 42, MAX_SEED])
def test_seeds_in_range_are_kept(seed):
    assert SamplingParams(seed=seed).seed == seed


@pytest.mark.parametrize("seed", [MAX_SEED + 1, MIN_SEED - 1, 1208925819614629174706176])
def test_seed_outside_the_generators_range_is_a_400_naming_seed(seed):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(seed=seed)
    assert e.value.param == "seed" and e.value.status == 400
