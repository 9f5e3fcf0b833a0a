"""Node-sharded graphs: moving rows of a node-sharded tensor between ranks, and the distributed sparse product.

A graph's nodes (users, then items offset by n_users) are OWNED by the ranks holding their embedding rows. A rank
keeps only its owned rows of any per-node tensor; ``NodeFetch`` brings it the rows of other nodes it needs (an
all-to-all, differentiable: gradients travel back the same way), and ``ShardedGraph`` multiplies its rows of
D^-1/2 A D^-1/2 by a layer of its own nodes and of its halo (the neighbours other ranks own).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist

from ciess_prod.models.graph import normalized_adjacency, sparse_matmul


class _AllToAll(torch.autograd.Function):
    """Rows [n, d] sent in per-rank splits; the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.send, ctx.recv = send, recv
        return _exchange(x, send, recv)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _exchange(grad, ctx.recv, ctx.send), None, None


def _exchange(x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
    d = x.shape[1]
    out = torch.empty(sum(recv) * d, dtype=x.dtype)
    dist.all_to_all_single(out, x.detach().contiguous().view(-1), output_split_sizes=[c * d for c in recv],
                           input_split_sizes=[c * d for c in send])
    return out.view(-1, d)


class NodeFetch:
    """Fetches given rows of a node-sharded tensor from their owners (collective; differentiable).

    ``wanted``: global node ids [n]; ``owner``: their owner ranks [n]; ``local_index``: maps node ids this rank
    owns to rows of its owned tensor. The requests go out once here; every call then moves values only.
    """

    def __init__(self, wanted: torch.Tensor, owner: torch.Tensor, local_index: Callable[[torch.Tensor], torch.Tensor]):
        world = dist.get_world_size()
        order = torch.argsort(owner, stable=True)
        self.inverse = torch.argsort(order)
        asked = torch.bincount(owner, minlength=world)
        serve = torch.empty_like(asked)
        dist.all_to_all_single(serve, asked)
        self.recv, self.send = asked.tolist(), serve.tolist()
        requests = torch.empty(sum(self.send), dtype=torch.int64)
        dist.all_to_all_single(requests, wanted[order].contiguous(), output_split_sizes=self.send,
                               input_split_sizes=self.recv)
        self.serve_rows = local_index(requests)

    def __call__(self, owned: torch.Tensor) -> torch.Tensor:
        """Rows of ``wanted`` in its order [n, d], from every rank's ``owned`` [n_owned, d]."""
        return _AllToAll.apply(owned[self.serve_rows], self.send, self.recv)[self.inverse]


@dataclass
class Nodes:
    """The graph's nodes (users, then items offset by n_users) and which rank owns each."""

    n_users: int
    owned: torch.Tensor  # sorted global node ids this rank owns [n_owned]: its users, then its items
    n_owned_users: int
    user_owner: Callable[[torch.Tensor], torch.Tensor]
    item_owner: Callable[[torch.Tensor], torch.Tensor]

    def owner(self, nodes: torch.Tensor) -> torch.Tensor:
        is_user = nodes < self.n_users
        out = torch.empty_like(nodes)
        out[is_user] = self.user_owner(nodes[is_user])
        out[~is_user] = self.item_owner(nodes[~is_user] - self.n_users)
        return out

    def local_index(self, nodes: torch.Tensor) -> torch.Tensor:
        """Row of each owned node in the owned tensor (owned users first, then owned items)."""
        index = torch.searchsorted(self.owned, nodes)
        if len(nodes) and (index.max() >= len(self.owned) or not torch.equal(self.owned[index], nodes)):
            raise ValueError("asked for nodes this rank does not own")
        return index

    def fetch(self, nodes: torch.Tensor) -> NodeFetch:
        return NodeFetch(nodes, self.owner(nodes), self.local_index)


class ShardedGraph:
    """This rank's rows of D^-1/2 A D^-1/2 over (owned nodes, then halo nodes), and the halo's fetch."""

    def __init__(self, train: sp.csr_matrix, nodes: Nodes) -> None:
        rows = normalized_adjacency(train)[nodes.owned.numpy()]
        columns = np.unique(rows.indices)
        owned = nodes.owned.numpy()
        position = np.searchsorted(owned, columns).clip(max=max(len(owned) - 1, 0))
        is_owned = (owned[position] == columns) if len(owned) else np.zeros(len(columns), dtype=bool)
        halo = columns[~is_owned]
        column_of = np.empty(int(columns.max()) + 1 if len(columns) else 0, dtype=np.int64)
        column_of[columns[is_owned]] = position[is_owned]
        column_of[halo] = len(owned) + np.arange(len(halo))
        shape = (len(owned), len(owned) + len(halo))
        self.matrix = sp.csr_matrix((rows.data, column_of[rows.indices], rows.indptr), shape=shape)
        self.transposed = self.matrix.T.tocsr()
        self.halo = nodes.fetch(torch.from_numpy(halo.astype(np.int64)))

    def propagate(self, layer: torch.Tensor) -> torch.Tensor:
        """The next layer of the owned nodes from their current layer [n_owned, d] (collective)."""
        return sparse_matmul(self.matrix, self.transposed, torch.cat([layer, self.halo(layer)]))
