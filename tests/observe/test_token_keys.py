import itertools

import torch

from ream_modifiers.observe.collector import BatchRouting
from ream_modifiers.observe.statistics import ActivationSamples
from ream_modifiers.observe.token_keys import (
    EMPTY_KEY,
    positional_keys,
    reseeded,
    token_keys,
)

ROWS = [[5, 9, 2, 7, 7, 1], [3, 3, 8], [11, 4, 6, 2]]


def _padded(rows, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for index, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[index, span] = torch.tensor(row)
        mask[index, span] = True
    return ids, mask


def test_keys_depend_on_the_text_only_not_on_batching_or_padding():
    alone = [token_keys(torch.tensor([row])) for row in ROWS]
    for left in (False, True):
        ids, mask = _padded(ROWS, left)
        keys = token_keys(ids, mask.reshape(-1)).reshape(ids.shape)
        for index, row_keys in enumerate(alone):
            assert torch.equal(keys[index][mask[index]], row_keys)
    # the same row in another batch position: the same keys
    ids, mask = _padded(ROWS[::-1], left=False)
    keys = token_keys(ids, mask).reshape(ids.shape)
    assert torch.equal(keys[2][mask[2]], alone[0])


def test_keys_differ_between_rows_positions_and_seeds():
    ids = torch.randint(0, 50, (64, 128), generator=torch.Generator().manual_seed(0))
    keys = token_keys(ids)
    assert keys.unique().numel() == keys.numel()
    assert bool((keys >= 0).all()) and bool((keys < EMPTY_KEY).all())
    # a shared prefix does not give shared keys: the whole row is hashed
    a = token_keys(torch.tensor([[1, 2, 3, 4]]))
    b = token_keys(torch.tensor([[1, 2, 3, 5]]))
    assert not bool((a == b).any())
    assert torch.equal(reseeded(keys, 0), keys)
    assert not bool((reseeded(keys, 7) == keys).any())
    assert torch.equal(reseeded(keys, 7), reseeded(keys, 7))
    assert torch.equal(positional_keys(8, 3, "cpu"), positional_keys(8, 3, "cpu"))
    assert not torch.equal(positional_keys(8, 3, "cpu"), positional_keys(8, 4, "cpu"))


def _routing(hidden, keys, valid=None, batch_index=0):
    tokens = hidden.shape[0]
    index = torch.zeros(tokens, 1, dtype=torch.long)
    return BatchRouting(
        hidden,
        index,
        torch.ones(tokens, 1),
        valid,
        order=torch.arange(tokens),
        offsets=[0, tokens],
        layer=None,
        batch_index=batch_index,
        token_keys=keys,
    )


def _feed(statistic: ActivationSamples, batches) -> None:
    """Each batch: (keys [T], activations [E, T, D]); activation = f(token)."""
    for index, (keys, activations) in enumerate(batches):
        hidden = torch.zeros(keys.numel(), 4)
        routing = _routing(hidden, keys, batch_index=index)
        statistic.update_routing(routing)
        for expert in range(activations.shape[0]):
            statistic.update_intermediate(expert, activations[expert], routing)


def _tokens(count: int, experts: int = 3, width: int = 5, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    keys = token_keys(torch.randint(0, 1000, (1, count), generator=generator))
    activations = torch.randn(experts, count, width, generator=generator)
    return keys, activations


def _split(keys, activations, bounds):
    return [(keys[a:b], activations[:, a:b]) for a, b in itertools.pairwise(bounds)]


def test_sample_is_the_smallest_keys_whatever_the_batching():
    keys, activations = _tokens(40)
    capacity = 12
    expected_order = torch.argsort(keys)[:capacity]
    runs = {
        "one batch": _split(keys, activations, [0, 40]),
        "five batches": _split(keys, activations, [0, 3, 11, 20, 33, 40]),
    }
    permutation = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    runs["shuffled"] = _split(
        keys[permutation], activations[:, permutation], [0, 7, 40]
    )
    for name, batches in runs.items():
        statistic = ActivationSamples(3, 5, capacity, seed=0)
        _feed(statistic, batches)
        assert statistic.filled == capacity, name
        assert torch.equal(statistic.result(), activations[:, expected_order]), name


def test_two_ranks_merge_to_the_single_run_sample():
    keys, activations = _tokens(50)
    capacity = 16
    single = ActivationSamples(3, 5, capacity, seed=5)
    _feed(single, _split(keys, activations, [0, 10, 25, 50]))
    parts = []
    for batches in (
        _split(keys, activations, [0, 10]),
        _split(keys, activations, [10, 25, 50]),
    ):
        rank = ActivationSamples(3, 5, capacity, seed=5)
        _feed(rank, batches)
        parts.append(rank.sample())
    merged_keys, merged = ActivationSamples.smallest_keys(parts, capacity)
    assert torch.equal(merged, single.result())
    assert torch.equal(merged_keys, single.sample()[0])


def test_fewer_tokens_than_capacity_keeps_every_valid_token():
    keys, activations = _tokens(6)
    statistic = ActivationSamples(3, 5, capacity=32)
    hidden = torch.zeros(6, 4)
    valid = torch.tensor([True, False, True, True, False, True])
    routing = _routing(hidden, keys, valid=valid)
    statistic.update_routing(routing)
    for expert in range(3):
        statistic.update_intermediate(expert, activations[expert], routing)
    assert statistic.filled == 4
    kept = valid.nonzero().flatten()
    order = kept[torch.argsort(reseeded(keys, 0)[kept])]
    assert torch.equal(statistic.result(), activations[:, order])
