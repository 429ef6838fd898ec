"""A preallocated key/value cache for incremental decoding.

Keys and values for every layer live in one buffer sized for the whole generation, so a decoding step
writes one slice instead of concatenating (which would copy the whole cache every token and make
batch-1 decoding compute-bound on memcpy). The cache also remembers which key positions are real
tokens (left padding in a batch) and how many real tokens each row has seen, so that position ids and
attention masks of later steps follow from it.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_heads: int,
        max_len: int,
        d_head: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layers, batch_size, n_heads, max_len, d_head)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.valid_count = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.has_padding = False
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values for one layer; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def record(self, mask: torch.Tensor) -> None:
        """Record the key-validity of a new chunk of `mask.shape[1]` positions (before layers run)."""
        start, end = self.length, self.length + mask.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        self.key_valid[:, start:end] = mask
        self.valid_count += mask.sum(dim=1)
        if not bool(mask.all()):
            self.has_padding = True

    def record_real(self, n: int) -> None:
        """`record` for `n` positions that are all real tokens: the common decoding step, which then
        needs no mask tensor, no reduction and no host sync."""
        start, end = self.length, self.length + n
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        self.key_valid[:, start:end] = True
        self.valid_count += n

    def advance(self, n: int) -> None:
        self.length += n

    def compact(self, keep: torch.Tensor) -> None:
        """Keep only the `keep` rows (finished sequences leave the batch) and drop the left-padding
        columns they all share.

        Only the filled part of the cache is copied, shifted to column 0: the shared padding goes, so
        the remaining rows can run up to the full context (the decoder counts padded columns against
        it) and attend over fewer keys.
        """
        L = self.length
        valid = self.valid_count.index_select(0, keep)
        shift = L - int(valid.max())
        n = L - shift
        shape = (self.k.shape[0], keep.numel(), *self.k.shape[2:])
        k = self.k.new_empty(shape)
        v = self.v.new_empty(shape)
        k[:, :, :, :n] = self.k[:, keep, :, shift:L]
        v[:, :, :, :n] = self.v[:, keep, :, shift:L]
        key_valid = torch.zeros(keep.numel(), self.max_len, dtype=torch.bool, device=self.key_valid.device)
        key_valid[:, :n] = self.key_valid[keep, shift:L]
        self.k, self.v, self.key_valid, self.valid_count = k, v, key_valid, valid
        self.length = n
        self.has_padding = not bool(key_valid[:, :n].all())
