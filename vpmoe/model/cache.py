"""The KV caches the model decodes through: the model's contract with a cache, and two caches.

Design choices:
- The contract (`VpMoE.forward` with `cache=`): `advance(mask)` when a chunk of tokens [B, T]
  arrives (mask 1 real, 0 padding) returns its positions and doc ids (`chunk_positions`: positions
  continue over real tokens only, padding is doc -1, which no real token attends to); each
  attention layer then calls `update(layer, k, v, pos, doc)` with its rotated keys, mixed values,
  positions and doc ids and attends over what it returns. Tensors keep their slot (token) axis at
  `slot_dim`: 2 of k / v [B, G, S, D], 1 of pos / doc [B, S].
- `KVCache` grows: local layers keep only what a later query can still see, global layers keep
  everything in buffers with spare slots (no quadratic `torch.cat` per step); it can reorder rows
  (beam search). transformers' `generate` drives it through the HF adapter.
- `StaticKVCache` has fixed shapes and addresses, so a decode step can be captured as a CUDA graph
  (`vpmoe.model.generate.CapturedDecode`): rings for local layers, the call's capacity for global
  ones, writes in place at slots from a device counter.
"""
from __future__ import annotations

import torch

from vpmoe.config import ModelConfig


def chunk_positions(start: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, doc ids) [B, T] of a chunk of tokens appended to a cache whose rows' next positions
    are start [B]; mask [B, T]: 1 real, 0 padding. Positions continue over real tokens only; padding
    gets doc -1, which no real token attends to."""
    positions = (start[:, None] + mask.cumsum(1) - 1).clamp(min=0)
    return positions, torch.where(mask.bool(), torch.zeros_like(mask), torch.full_like(mask, -1))


def slot_dim(t: torch.Tensor) -> int:
    """The slot (token) axis of a cache tensor: 2 of k / v [B, G, S, D], 1 of pos / doc [B, S]."""
    return 2 if t.dim() == 4 else 1


def slot_shape(t: torch.Tensor, n: int) -> list[int]:
    """t's shape with n slots."""
    shape = list(t.shape)
    shape[slot_dim(t)] = n
    return shape


def _slots(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Cache slots start:end of k / v [B, G, S, D] or pos / doc [B, S]."""
    return t.narrow(slot_dim(t), start, end - start)


class KVCache:
    """Per-layer keys (rotated), values (mixed), positions and doc ids for incremental decoding.

    Local layers keep only what a later query can still see. Without padding inside the cache
    (left padding of the first chunk only: batched generation) that is the last `window` slots;
    once a padded slot sits after a real one (right padding, a padded chunk appended later) slots
    and positions part ways, so the slots kept are those from the first one holding a key within
    `window` positions of its row's next position (a host read per forward, in that case only).
    Keys kept beyond that are harmless: attention masks by position and document. Global layers
    keep everything, in buffers with spare slots that each step writes into (`_append_global`)."""

    is_compileable = False  # (transformers' generate asks any cache it is handed)
    GROW = 256  # spare slots a global layer's buffers get when they fill (`_append_global`)

    def __init__(self, cfg: ModelConfig, batch_size: int):
        self.cfg = cfg
        self.batch_size = batch_size
        self.layers: list[tuple | None] = [None] * cfg.n_layers
        self._buffers: list[tuple | None] = [None] * cfg.n_layers  # global layers: (k, v, pos, doc) with spare slots
        self.next_pos: torch.Tensor | None = None  # [B] position of the next token per row
        self.seen = 0  # tokens fed so far (including padding)
        self.inner_pad = False  # a padded slot after a real one somewhere (class docstring)
        self._trim = (-1, 0)  # (seen, slots) of the last position-based trim: one per forward

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens fed so far (transformers' generate asks a cache it is handed back)."""
        return self.seen

    def note_mask(self, mask: torch.Tensor) -> None:
        """Record whether this chunk's padding (mask 0) lands inside the cache (class docstring)."""
        if not self.inner_pad:
            self.inner_pad = bool((mask == 0).any()) if self.seen else bool((mask[:, :-1] > mask[:, 1:]).any())

    def advance(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk of tokens [B, T] arrives (mask: 1 real, 0 padding): its (positions, doc ids)
        (`chunk_positions`); the rows' next positions and the token count move on."""
        start = self.next_pos if self.next_pos is not None else mask.new_zeros(mask.shape[0])
        self.next_pos = start + mask.sum(1)
        self.seen += mask.shape[1]
        return chunk_positions(start, mask)

    def update(self, layer: int, k, v, pos, doc):
        """Append new entries; return the full (k, v, pos, doc) to attend over; trim local layers."""
        if self.cfg.is_global(layer) and not (k.requires_grad or v.requires_grad):
            return self._append_global(layer, k, v, pos, doc)
        old = self.layers[layer]
        if old is not None:
            k = torch.cat([old[0], k], dim=2)
            v = torch.cat([old[1], v], dim=2)
            pos = torch.cat([old[2], pos], dim=1)
            doc = torch.cat([old[3], doc], dim=1)
        keep = None if self.cfg.is_global(layer) else self.cfg.window
        if keep is not None and self.inner_pad:
            if self._trim[0] != self.seen:  # every local layer holds the same positions and documents
                needed = (doc >= 0) & (pos > self.next_pos[:, None] - keep)
                first = torch.where(needed.any(1), needed.int().argmax(1), needed.shape[1])
                self._trim = (self.seen, needed.shape[1] - int(first.min()))
            keep = max(keep, self._trim[1])
        if keep is not None and k.shape[2] > keep:
            self.layers[layer] = (k[:, :, -keep:], v[:, :, -keep:], pos[:, -keep:], doc[:, -keep:])
        else:
            self.layers[layer] = (k, v, pos, doc)
        return k, v, pos, doc

    def _append_global(self, layer: int, k, v, pos, doc):
        """A global layer keeps every entry: they are written into spare slots of its buffers (`GROW`
        more when full), so a decode step copies its own entries, not the whole cache (with
        `torch.cat` every step did: quadratic in the length). Returns views of the filled part.
        Not under autograd (an in-place write would change what a graph saved)."""
        old, n = self.layers[layer], k.shape[2]
        length = 0 if old is None else old[0].shape[2]
        bufs = self._buffers[layer]
        # new buffers when full, or when the entries are no longer theirs (a reorder's selected rows,
        # an append under autograd)
        if bufs is None or old is None or old[0].data_ptr() != bufs[0].data_ptr() or bufs[0].shape[2] < length + n:
            cap = length + n + self.GROW
            bufs = tuple(t.new_empty(slot_shape(t, cap)) for t in (k, v, pos, doc))
            if old is not None:
                for buf, part in zip(bufs, old):
                    _slots(buf, 0, length).copy_(part)
            self._buffers[layer] = bufs
        for buf, part in zip(bufs, (k, v, pos, doc)):
            _slots(buf, length, length + n).copy_(part)
        self.layers[layer] = tuple(_slots(buf, 0, length + n) for buf in bufs)
        return self.layers[layer]

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search / dropping finished rows)."""
        self.layers = [None if e is None else tuple(t.index_select(0, index) for t in e) for e in self.layers]
        if self.next_pos is not None:
            self.next_pos = self.next_pos.index_select(0, index)
        self.batch_size = int(index.numel())


class StaticKVCache(KVCache):
    """A KV cache of fixed shapes and addresses, so a decode step can be captured (`CapturedDecode`).

    Each layer's buffers are allocated once: a local layer keeps its last `window` entries in a
    ring (slot = the chunk's token count mod window), a global layer up to `capacity` entries.
    Slots never written hold doc -2, which no query shares. A one-token step writes its entries in
    place at slots computed from a device counter (`count`) and attends over the whole buffer
    (positions and documents mask what it must not see), so every step runs the same kernels on
    the same memory. A longer chunk attends over the buffer and itself (the prompt, into empty
    buffers: itself only), then keeps its last entries. Positions advance in place. The host
    counts tokens (`seen`) to refuse more than `capacity`. For sampling only (no autograd, no
    reordering)."""

    def __init__(self, cfg, batch_size: int, capacity: int, device):
        super().__init__(cfg, batch_size)
        self.capacity = capacity
        self.count = torch.zeros(1, dtype=torch.long, device=device)  # tokens fed so far
        self.start = torch.zeros(1, dtype=torch.long, device=device)  # the current chunk's first
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._chunk_slots: dict[int, torch.Tensor] = {}

    def note_mask(self, mask: torch.Tensor) -> None:
        """Nothing to note: no slots are trimmed by position (the base class's reason to)."""

    def reserve(self, n: int) -> None:
        """Refuse n more tokens past `capacity` (before anything is written)."""
        if self.seen + n > self.capacity:
            raise ValueError(f"StaticKVCache: {self.seen} tokens + {n} more exceed its capacity of "
                             f"{self.capacity} (the longest prompt + max_new_tokens)")

    def advance(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`KVCache.advance`, with the next positions and the device's token count moved in place."""
        T = mask.shape[1]
        self.reserve(T)
        positions, doc = chunk_positions(self.next_pos, mask)  # before the in-place add: no alias
        self.next_pos.add_(mask.sum(1))
        self.start.copy_(self.count)
        self.count.add_(T)
        self.seen += T
        self._chunk_slots = {}  # {buffer size: this chunk's slots}, made once for every layer of a size
        return positions, doc

    def update(self, layer: int, k, v, pos, doc):
        if k.requires_grad or v.requires_grad:
            raise ValueError("StaticKVCache is for sampling: no autograd through its in-place writes")
        size = self.capacity if self.cfg.is_global(layer) else min(self.cfg.window, self.capacity)
        if self.layers[layer] is None:
            self.layers[layer] = (k.new_zeros(slot_shape(k, size)), v.new_zeros(slot_shape(v, size)),
                                  pos.new_zeros(slot_shape(pos, size)), doc.new_full(slot_shape(doc, size), -2))
        bufs, parts, T = self.layers[layer], (k, v, pos, doc), k.shape[2]
        # a chunk attends over what the buffers hold and itself: the chunk alone when they are empty
        # (the prompt: no [T, capacity + T] scores), the buffers alone for one token (written first)
        visible = (bufs if T == 1 else parts if self.seen == T else
                   tuple(torch.cat([b, x], dim=slot_dim(b)) for b, x in zip(bufs, parts)))
        n = min(T, size)  # a chunk longer than a ring keeps its last entries
        slots = self._chunk_slots.get(size)
        if slots is None:
            slots = self._chunk_slots[size] = (self.start + torch.arange(T - n, T, device=k.device)) % size
        for b, x in zip(bufs, parts):
            b.index_copy_(slot_dim(b), slots, x.narrow(slot_dim(b), T - n, n))
        return visible

    def reorder(self, index: torch.Tensor) -> None:
        raise NotImplementedError("StaticKVCache keeps its rows (sampling only); use KVCache to reorder")
