"""The train step as two CUDA graphs: (1) the model body's forward, (2) its backward + the optimizer.

Between them the head + loss run eagerly (the fused CE picks supervised rows with a host sync and
data-dependent shapes, which a graph cannot hold). Everything else in a step has static shapes and
no host sync: routing is dropless and the grouped GEMMs take their group offsets on the device.

Design choices:
- Static inputs: token ids are copied into a fixed buffer; document ids into the `DocMasks`
  buffer that the block masks' `mask_mod` closes over, and the block tables are rebuilt eagerly
  and copied into the captured masks' tensors (`FastBody(static_masks=True)`).
- Gradients: before capture the body's `.grad`s are set to None, so the captured backward
  allocates them in the graph's pool; they keep those addresses and every replay overwrites them
  (no zeroing pass). The head's gradient comes from the eager loss and accumulates into a
  preallocated `.grad` that the captured optimizer step zeroes after use.
- The optimizer (`FastMuonAdamW`) is captured inside graph 2; its learning rates are device
  tensors refreshed eagerly before each replay, so a schedule still applies.
- The first `warmup` calls are ordinary eager steps on a side stream (they compile and allocate
  everything); they are real training steps, not discarded. The next call captures, then replays.
"""
from __future__ import annotations

import torch

from vpmoe.model.fast import FastBody, update_router_biases


class GraphedTrainStep:
    def __init__(self, body: FastBody, loss_fn, optimizer, head_params: list, warmup: int = 2,
                 update_biases: bool = True):
        """loss_fn(hidden [B, T, d] leaf, batch) -> scalar loss through the head (eager).
        optimizer: a `FastMuonAdamW` over all parameters (body and head)."""
        if not body.static_masks:
            raise ValueError("GraphedTrainStep needs FastBody(static_masks=True)")
        self.body, self.loss_fn, self.opt = body, loss_fn, optimizer
        self.head = list(head_params)
        head_ids = {id(p) for p in self.head}
        self.body_params = [p for p in body.model.parameters() if id(p) not in head_ids and p.requires_grad]
        self.warmup, self.update_biases = warmup, update_biases
        self.calls = 0
        self.graphs = None
        self.tokens = None

    def _stage(self, batch):
        if self.tokens is None:
            self.tokens = batch["tokens"].clone()
        else:
            self.tokens.copy_(batch["tokens"])
        doc, _, _ = self.body.doc_masks(batch["doc_ids"])
        return doc

    def _after_backward(self, load, refresh_lr: bool):
        self.opt.step(refresh_lr=refresh_lr)
        if self.update_biases:
            update_router_biases(self.body.model, load)
        for p in self.head:
            p.grad.zero_()

    def _eager(self, batch, doc):
        hidden, aux, load = self.body(self.tokens, doc, rebuild_masks=False)
        h = hidden.detach().requires_grad_()
        loss = self.loss_fn(h, batch)
        loss.backward()
        torch.autograd.backward([hidden, aux], [h.grad, torch.ones_like(aux)])
        self._after_backward(load, refresh_lr=True)
        for p in self.body_params:
            p.grad = None
        return loss.detach() + aux.detach()

    def _capture(self, doc):
        torch.cuda.synchronize()
        for p in self.body_params:
            p.grad = None
        gf, gb = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(gf):
            hidden, aux, load = self.body(self.tokens, doc, rebuild_masks=False)
        grad_hidden, one = torch.zeros_like(hidden), torch.ones_like(aux)
        with torch.cuda.graph(gb, pool=gf.pool()):
            torch.autograd.backward([hidden, aux], [grad_hidden, one])
            self._after_backward(load, refresh_lr=False)
        self.graphs = (gf, gb, hidden, aux, grad_hidden)

    def __call__(self, batch) -> torch.Tensor:
        """One train step on `batch` (tokens, doc_ids, plus whatever loss_fn reads); returns the loss."""
        for p in self.head:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        doc = self._stage(batch)
        self.calls += 1
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self._eager(batch, doc)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graphs is None:
            self._capture(doc)
        gf, gb, hidden, aux, grad_hidden = self.graphs
        gf.replay()
        h = hidden.detach().requires_grad_()
        loss = self.loss_fn(h, batch)
        loss.backward()
        grad_hidden.copy_(h.grad)
        self.opt.refresh_lr()
        gb.replay()
        return loss.detach() + aux.detach()
