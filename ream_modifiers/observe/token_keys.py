"""
Content-derived keys for calibration tokens.

A capped sample of calibration tokens (REAM's neuron-activation samples) must not
depend on how the calibration set was batched, ordered or split across
``torch.distributed`` ranks: the sample of a 2-rank run has to be exactly the
sample of a single run. So each token gets a 62-bit key computed from the
calibration *text* alone, a hash of (its whole sequence, its position among the
sequence's real tokens, a seed), and a sample keeps the ``capacity`` tokens with
the smallest keys: a bottom-k sketch, which two ranks merge by keeping the
smallest keys of their union. The keys are uniform, so the sample is uniform over
every calibration token.

Keys are computed on the embedding's device with wrapping int64 arithmetic
(splitmix64 finaliser); nothing moves to the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = [
    "TokenKeyRecorder",
    "token_keys",
    "positional_keys",
    "reseeded",
    "EMPTY_KEY",
]

# larger than every key, which is masked to 62 bits
EMPTY_KEY = torch.iinfo(torch.int64).max
_KEY_MASK = (1 << 62) - 1


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    # logical shift: torch's >> on int64 is arithmetic
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser: a bijection of int64 that scatters every bit."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MUL1
    x = (x ^ _shift_right(x, 27)) * _MUL2
    return x ^ _shift_right(x, 31)


def token_keys(
    input_ids: torch.Tensor, valid: torch.Tensor | None = None, seed: int = 0
) -> torch.Tensor:
    """
    ``[B*S]`` keys of a ``[B, S]`` batch of token ids. A real token's key depends
    only on its row's real tokens, its position among them and ``seed``, never on
    the batch it came in, its padding, or its rank.

    :param input_ids: ``[B, S]`` integer token ids
    :param valid: ``[B*S]`` or ``[B, S]`` bool mask of real tokens (None: all real)
    :param seed: changes every key
    """
    ids = input_ids.long()
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if valid is None:
        real = torch.ones_like(ids, dtype=torch.bool)
    else:
        real = valid.reshape(ids.shape).to(device=ids.device, dtype=torch.bool)
    # position among the row's real tokens, so left and right padding agree
    position = real.long().cumsum(dim=1) - 1
    terms = _mix(ids * _GOLDEN + position) * real.long()
    row = _mix(terms.sum(dim=1, keepdim=True) ^ _mix(torch.full_like(ids[:, :1], seed)))
    keys = _mix(row + _mix(position)) & _KEY_MASK
    return keys.reshape(-1)


def reseeded(keys: torch.Tensor, seed: int) -> torch.Tensor:
    """Independent keys for another ``seed`` (a statistic's own sampling seed)."""
    if seed == 0:
        return keys
    salt = _mix(torch.full((), seed, dtype=torch.long, device=keys.device))
    return _mix(keys ^ salt) & _KEY_MASK


def positional_keys(
    tokens: int, batch_index: int, device: torch.device
) -> torch.Tensor:
    """
    Fallback keys from ``(batch index, position)`` for a model whose
    embedding never saw token ids: deterministic in one process, but a
    distributed run then samples other tokens than a single one.
    """
    position = torch.arange(tokens, dtype=torch.long, device=device)
    salt = _signed((batch_index * 0x9E3779B97F4A7C15) % (1 << 64))
    return _mix(position + salt) & _KEY_MASK


class TokenKeyRecorder:
    """
    Records :func:`token_keys` for every calibration batch, from a forward-pre
    hook on the model's input embedding (registered through the modifier, so it
    only fires in calibration passes, once per batch, in the order the MoE layers
    later see the batches).

    :param padding_masks: per-batch ``[tokens]`` masks of real tokens (None: no
        padding), in calibration order
    """

    def __init__(self, padding_masks: Sequence[torch.Tensor | None]):
        self.padding_masks = list(padding_masks)
        self.keys: list[torch.Tensor | None] = []

    def attach(
        self,
        embedding: torch.nn.Module,
        register: Callable[[torch.nn.Module, Callable, str], object],
    ) -> None:
        register(embedding, self._on_embedding_input, "forward_pre")

    @torch.no_grad()
    def _on_embedding_input(self, module, args) -> None:
        input_ids = args[0] if args else None
        batch = len(self.keys)
        if self.padding_masks and batch >= len(self.padding_masks):
            return  # an extra pass (not calibration order): nothing to align with
        if input_ids is None or input_ids.is_floating_point():
            self.keys.append(None)
            return
        mask = self.padding_masks[batch] if batch < len(self.padding_masks) else None
        self.keys.append(token_keys(input_ids, mask))

    def keys_for(self, batch_index: int) -> torch.Tensor | None:
        """Keys of batch ``batch_index``, or None if none were recorded."""
        if batch_index < len(self.keys):
            return self.keys[batch_index]
        return None
