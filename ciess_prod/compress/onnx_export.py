"""ONNX export of compressed models: recommenders (user ids -> item scores and top-k) and DLRMs (-> click prob).

Graphs (opset 17, standard ops, dynamic batch axis "batch"; built with ``onnx_graph``):

    recommenders   users int64 [batch] -> scores float32 [batch, n_items], top_items int64 [batch, k],
                   top_scores float32 [batch, k]
    DLRM           dense float32 [batch, n_dense] (when n_dense > 0) and, per feature f, ``f.ids`` int64 [n_f] and
                   ``f.offsets`` int64 [batch + 1] (the KJT's offsets: bag b is ids[offsets[b]:offsets[b + 1]])
                   -> logits float32 [batch], probability float32 [batch]

DLRM bags pool in the graph: each id's bag index comes from the offsets (boundary marks scattered, then a
cumulative sum: no repeat_interleave, which exporters turn into a quadratic mask), rows are summed into their bags
with ScatterElements(reduction="add"), and mean pooling divides by max(bag length, 1), so empty bags pool to zero.

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

from ciess_prod.compress.ctr_model import CompressedDLRM
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
    pairs = _sequential(g, pairs, head.mlp_tower, "tower")
    weight = head.predict.weight.detach().view(-1)
    gmf = g.op("Mul", gu, _all_rows(g, model, "item_gmf"), name="gmf")  # [B, I, d]
    gmf_score = g.op("MatMul", gmf, g.constant("w_gmf", weight[: head.d_max].contiguous()), name="gmf_score")
    mlp_score = g.op("MatMul", pairs, g.constant("w_mlp", weight[head.d_max :].contiguous()), name="mlp_score")
    total = g.op("Add", gmf_score, mlp_score, name="gmf_plus_mlp")
    return g.op("Add", total, g.constant("predict_bias", head.predict.bias.detach()), name="scores_raw")


def _dlrm_graph(model: CompressedDLRM) -> onnx.ModelProto:
    g = GraphBuilder(f"ciess_dlrm_{model.dtype}")
    net, d = model.net, model.config.d_max
    const = lambda name, *values: g.constant(name, np.array(values, dtype=np.int64))  # noqa: E731
    pooled = []
    for f in model.feature_names:
        ids = g.input(f"{f}.ids", TensorProto.INT64, [f"n_{f}"])
        offsets = g.input(f"{f}.offsets", TensorProto.INT64, ["batch_plus_1"])
        rows = ragged_lookup(g, model.tables[f"t_{f}"], ids, f"t_{f}")  # [n_f, d]
        n_ids = g.op("Shape", ids, name=f"{f}/n")  # [1]
        n_bags = g.op("Sub", g.op("Shape", offsets, name=f"{f}/n_offsets"), const(f"{f}/one", 1), name=f"{f}/batch")
        # bag of each id: +1 at every inner boundary offsets[1:batch] (scattered with add into n_f + 1 slots, so
        # trailing empty bags land in the spare slot), cumulative sum, first n_f
        inner = g.op("Slice", offsets, const(f"{f}/s1", 1), n_bags, name=f"{f}/inner")
        marks = g.op("ConstantOfShape", g.op("Add", n_ids, const(f"{f}/one_", 1), name=f"{f}/n1"),
                     value=onnx.helper.make_tensor("z", TensorProto.INT64, [1], [0]), name=f"{f}/zeros")
        ones = g.op("ConstantOfShape", g.op("Shape", inner, name=f"{f}/n_inner"),
                    value=onnx.helper.make_tensor("o", TensorProto.INT64, [1], [1]), name=f"{f}/ones")
        marks = g.op("ScatterElements", marks, inner, ones, axis=0, reduction="add", name=f"{f}/marks")
        bag = g.op("Slice", g.op("CumSum", marks, const(f"{f}/axis0", 0), name=f"{f}/cumsum"), const(f"{f}/s0", 0),
                   n_ids, name=f"{f}/bag")
        index = g.op("Expand", g.op("Unsqueeze", bag, const(f"{f}/ax1", 1), name=f"{f}/bag_col"),
                     g.op("Concat", n_ids, const(f"{f}/d", d), axis=0, name=f"{f}/nd"), name=f"{f}/index")
        zeros = g.op("ConstantOfShape", g.op("Concat", n_bags, const(f"{f}/d_", d), axis=0, name=f"{f}/bd"),
                     value=onnx.helper.make_tensor("zf", TensorProto.FLOAT, [1], [0.0]), name=f"{f}/pool0")
        bags = g.op("ScatterElements", zeros, index, rows, axis=0, reduction="add", name=f"{f}/pooled")
        if model.config.pooling == "mean":
            lengths = g.op("Sub", g.op("Slice", offsets, const(f"{f}/a1", 1), const(f"{f}/end", 2**62), name=f"{f}/hi"),
                           g.op("Slice", offsets, const(f"{f}/a0", 0), n_bags, name=f"{f}/lo"), name=f"{f}/len")
            lengths = g.op("Cast", g.op("Max", lengths, const(f"{f}/one__", 1), name=f"{f}/len1"),
                           to=TensorProto.FLOAT, name=f"{f}/lenf")
            bags = g.op("Div", bags, g.op("Unsqueeze", lengths, const(f"{f}/ax1_", 1), name=f"{f}/lencol"),
                        name=f"{f}/mean")
        pooled.append(g.op("Unsqueeze", bags, const(f"{f}/ax1__", 1), name=f"{f}/vec"))  # [B, 1, d]

    bottom = None
    if model.n_dense:
        bottom = g.input("dense", TensorProto.FLOAT, ["batch", model.n_dense])
        bottom = _sequential(g, bottom, net.bottom, "bottom")
    vectors = pooled if bottom is None else [g.op("Unsqueeze", bottom, const("bottom/ax1", 1)), *pooled]
    vectors = g.op("Concat", *vectors, axis=1, name="vectors") if len(vectors) > 1 else vectors[0]
    if model.config.interaction == "cat":
        top_in = g.op("Flatten", vectors, axis=1, name="interaction")
    else:
        gram = g.op("MatMul", vectors, g.op("Transpose", vectors, perm=[0, 2, 1]), name="gram")
        dots = g.op("Gather", g.op("Flatten", gram, axis=1), g.constant("triu", net._triu), axis=1, name="dots")
        top_in = dots if bottom is None else g.op("Concat", bottom, dots, axis=1, name="interaction")
    logits = g.op("Squeeze", _sequential(g, top_in, net.top, "top"), const("ax_last", 1), name="logits_raw")
    g.output("logits", TensorProto.FLOAT, ["batch"], source=logits)
    g.output("probability", TensorProto.FLOAT, ["batch"], source=g.op("Sigmoid", logits, name="prob"))
    return g.model(opset=OPSET, doc=f"ciess-prod dlrm {model.dtype}: dense features + id bags -> click probability")


def _sequential(g: GraphBuilder, x: str, layers: nn.Sequential, name: str) -> str:
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.ReLU):
            x = g.op("Relu", x, name=f"{name}/relu{i}")
        else:
            x = _linear(g, x, layer, f"{name}/{i}")
    return x


def build_onnx(model: CompressedRecommender | CompressedDLRM, top_k: int = 20) -> onnx.ModelProto:
    """The scoring graph of ``model`` (see the module docstring); ``top_k`` is capped at n_items."""
    if isinstance(model, CompressedDLRM):
        with torch.no_grad():
            return _dlrm_graph(model)
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


def export_onnx(model: CompressedRecommender | CompressedDLRM, path: Path, top_k: int = 20) -> Path:
    """Checks and writes the graph atomically (external data beside it when tables pass 2 GB)."""
    save_onnx(build_onnx(model, top_k), path)
    return Path(path)
