"""A rotation of a dot-product model's columns that puts its most used directions first.

For MF and LightGCN, score(u, i) = <f_u, f_i> with f linear in the ego embeddings (LightGCN's propagation is a
fixed linear map), and the L2 term depends only on row norms. Rotating the user and item tables by one
orthogonal matrix R therefore changes neither the scores nor the loss. A trained model's columns carry no order,
though, so cutting a row to its first d columns drops arbitrary directions; in the principal basis it keeps the
d directions along which the scored embeddings vary most, which is what a model trained at size d can keep.
"""

from __future__ import annotations

import torch

from ciess_prod.models.base import Recommender
from ciess_prod.models.lightgcn import LightGCN

# model kinds whose scores and loss are invariant under one orthogonal rotation of both tables
ROTATABLE_KINDS = ("mf", "lightgcn")


def principal_rotation(model: Recommender) -> torch.Tensor:
    """Orthogonal R [d_max, d_max] whose column j is the j-th right singular vector of the model's scored
    embeddings (users and items stacked, float64), by descending singular value."""
    if model.config.kind not in ROTATABLE_KINDS:
        raise ValueError(f"a principal basis keeps scores only for {ROTATABLE_KINDS}, not {model.config.kind}")
    with torch.no_grad():
        if isinstance(model, LightGCN):
            scored = model.final_embeddings()
        else:
            scored = torch.cat([model.masked_table("user"), model.masked_table("item")])
        _, _, vh = torch.linalg.svd(scored.double(), full_matrices=False)
    return vh.T


def rotate_to_principal_basis(model: Recommender) -> torch.Tensor:
    """Rotates ``model``'s user and item tables in place (call it at full size); returns the rotation used."""
    if any(bool((model.row_sizes(side) < model.config.d_max).any()) for side in ("user", "item")):
        raise ValueError("rotate the full-size model: cut rows would mix their masked columns into kept ones")
    rotation = principal_rotation(model)
    with torch.no_grad():
        for name in model.tables:
            weight = model.table_weight(name)
            weight.copy_((weight.double() @ rotation).to(weight.dtype))
    model.invalidate_cache()
    return rotation
