"""ONNX export of a compressed recommender: user ids -> scores of every item and the top-k items.

Graph (opset 17, standard ops, dynamic batch axis "batch"; built with ``onnx_graph``):

    users int64 [batch] -> scores float32 [batch, n_items], top_items int64 [batch, k], top_scores float32 [batch, k]

- MF / NeuMF: the ragged tables go into the graph as they are stored (CSR values + offsets, quantised codes and
  scales for int8/int4) and are looked up there, so the file is as small as the artifact's tables. The item side
  is looked up for every item on each call (a [n_items, d_max] temporary). NeuMF's MLP runs on all (user, item)
  pairs of the batch at once: memory batch x n_items x widest layer floats; keep batches small for big catalogues.
- LightGCN / NGCF: scores come from the propagated representations, which are dense (propagation mixes rows of
  every size) and are computed once at export time from the ragged tables (exactly as ``CompressedRecommender``
  does); running the graph propagation per request would cost a pass over the whole graph per call.

Items a user has already seen are not excluded here: serving knows them; the graph is the model.
Ids are not range-checked in the graph (see ``onnx_graph``): ``export_onnx``'s callers (serving) validate them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto
from torch import nn

from ciess_prod.compress.model import GRAPH_KINDS, CompressedRecommender
from ciess_prod.compress.onnx_graph import GraphBuilder, ragged_lookup, save_onnx

OPSET = 17


def _linear(g: GraphBuilder, x: str, layer: nn.Linear, name: str) -> str:
    """x @ W^T (+ b) on the last axis, any leading axes."""
    y = g.op("MatMul", x, g.constant(f"{name}/weight_t", layer.weight.detach().T.contiguous()), name=name)
    if layer.bias is not None:
        y = g.op("Add", y, g.constant(f"{name}/bias", layer.bias.detach()), name=f"{name}/biased")
    return y


def _all_rows(g: GraphBuilder, model: CompressedRecommender, table: str) -> str:
    """Every row of a table, dequantised and zero-padded: [rows, d_max]."""
    rows = g.constant(f"{table}/all_ids", np.arange(model.tables[table].num_rows, dtype=np.int64))
    return ragged_lookup(g, model.tables[table], rows, table)


def _scores(g: GraphBuilder, model: CompressedRecommender, users: str) -> str:
    kind = model.config.kind
    if kind in GRAPH_KINDS:
        user_final, item_final = model.propagated()
        rows = g.op("Gather", g.constant("user_final", user_final), users, axis=0, name="user_rows")
        return g.op("MatMul", rows, g.constant("item_final_t", item_final.T.contiguous()), name="scores_raw")
    if kind == "mf":
        user = ragged_lookup(g, model.tables["user"], users, "user")
        items = g.op("Transpose", _all_rows(g, model, "item"), perm=[1, 0], name="item_t")
        return g.op("MatMul", user, items, name="scores_raw")
    # NeuMF: score(u, i) = (gu * gi) . w_gmf + tower(relu(W_u mu + b + W_i mi)) . w_mlp + b_out
    head = model.head
    axis = lambda name, *axes: g.constant(name, np.array(axes, dtype=np.int64))  # noqa: E731
    gu = g.op("Unsqueeze", ragged_lookup(g, model.tables["user_gmf"], users, "user_gmf"), axis("ax1", 1))
    mu_h = _linear(g, ragged_lookup(g, model.tables["user_mlp"], users, "user_mlp"), head.mlp_user_in, "mlp_user_in")
    mi_h = _linear(g, _all_rows(g, model, "item_mlp"), head.mlp_item_in, "mlp_item_in")
    pairs = g.op("Add", g.op("Unsqueeze", mu_h, axis("ax1b", 1)), mi_h, name="pairs")  # [B, I, h]
    for i, layer in enumerate(head.mlp_tower):
        if isinstance(layer, nn.ReLU):
            pairs = g.op("Relu", pairs, name=f"tower/relu{i}")
        else:
            pairs = _linear(g, pairs, layer, f"tower/linear{i}")
    weight = head.predict.weight.detach().view(-1)
    gmf = g.op("Mul", gu, _all_rows(g, model, "item_gmf"), name="gmf")  # [B, I, d]
    gmf_score = g.op("MatMul", gmf, g.constant("w_gmf", weight[: head.d_max].contiguous()), name="gmf_score")
    mlp_score = g.op("MatMul", pairs, g.constant("w_mlp", weight[head.d_max :].contiguous()), name="mlp_score")
    total = g.op("Add", gmf_score, mlp_score, name="gmf_plus_mlp")
    return g.op("Add", total, g.constant("predict_bias", head.predict.bias.detach()), name="scores_raw")


def build_onnx(model: CompressedRecommender, top_k: int = 20) -> onnx.ModelProto:
    """The scoring graph of ``model`` (see the module docstring); ``top_k`` is capped at n_items."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    k = min(top_k, model.n_items)
    g = GraphBuilder(f"ciess_{model.config.kind}_{model.dtype}")
    users = g.input("users", TensorProto.INT64, ["batch"])
    with torch.no_grad():
        scores = _scores(g, model, users)
    g.output("scores", TensorProto.FLOAT, ["batch", model.n_items], source=scores)
    k_value = g.constant("k", np.array([k], dtype=np.int64))
    top_scores, top_items = g.op_outputs("TopK", scores, k_value, outputs=["top_scores", "top_items"], axis=-1)
    g.output("top_scores", TensorProto.FLOAT, ["batch", k], source=top_scores)
    g.output("top_items", TensorProto.INT64, ["batch", k], source=top_items)
    return g.model(opset=OPSET, doc=f"ciess-prod {model.config.kind} {model.dtype}: users -> scores, top-{k}")


def export_onnx(model: CompressedRecommender, path: Path, top_k: int = 20) -> Path:
    """Checks and writes the graph atomically (external data beside it when tables pass 2 GB)."""
    save_onnx(build_onnx(model, top_k), path)
    return Path(path)
