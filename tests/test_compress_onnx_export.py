"""ONNX export of compressed recommenders: checker passes, onnxruntime matches PyTorch within 1e-5 (fp32)."""

import onnx
import onnxruntime as ort
import pytest
import torch

from ciess_prod.cli import main
from ciess_prod.compress.artifact import save_artifact
from ciess_prod.compress.model import CompressedRecommender
from ciess_prod.compress.onnx_export import export_onnx
from tests.test_compress_artifact import KINDS, sized_model


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["fp32", "int4"])
def test_onnx_scores_match_pytorch(kind, dtype, tmp_path, one_torch_thread):
    model = CompressedRecommender.from_model(sized_model(kind), dtype)
    path = export_onnx(model, tmp_path / "model.onnx", top_k=7)
    onnx.checker.check_model(str(path), full_check=True)
    assert onnx.load(str(path)).opset_import[0].version >= 17
    run = session(path)
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 5, 33):  # the batch axis is dynamic
        users = torch.randint(0, model.n_users, (batch,), generator=generator)
        scores, top_scores, top_items = run.run(["scores", "top_scores", "top_items"], {"users": users.numpy()})
        expected = model.score_users(users)
        torch.testing.assert_close(torch.from_numpy(scores), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(top_scores), expected.topk(7, dim=1).values, rtol=0, atol=1e-5)
        picked = expected.gather(1, torch.from_numpy(top_items))  # the items named carry those scores
        torch.testing.assert_close(picked, torch.from_numpy(top_scores), rtol=0, atol=1e-5)


def test_export_cli(tmp_path, capsys):
    model = CompressedRecommender.from_model(sized_model("mf"), "fp32")
    save_artifact(model, tmp_path / "artifact", {})
    code = main(["export", "--artifact", str(tmp_path / "artifact"), "--format", "onnx",
                 "--out", str(tmp_path / "m.onnx"), "--top-k", "500"])
    assert code == 0 and "top-90" in capsys.readouterr().out  # capped at the catalogue
    users = torch.tensor([3, 4])
    (scores,) = session(tmp_path / "m.onnx").run(["scores"], {"users": users.numpy()})
    torch.testing.assert_close(torch.from_numpy(scores), model.score_users(users), rtol=0, atol=1e-5)
    (tmp_path / "artifact" / "manifest.json").write_text("[]")
    assert main(["export", "--artifact", str(tmp_path / "artifact"), "--out", str(tmp_path / "n.onnx")]) == 2
    assert "expected a JSON object" in capsys.readouterr().err and not (tmp_path / "n.onnx").exists()


def dlrm_and_data(pooling: str, interaction: str, n_dense: int):
    from ciess_prod.data.ctr import SyntheticCTRConfig, generate_ctr
    from ciess_prod.models.dlrm import DLRM, DLRMConfig

    data = generate_ctr(SyntheticCTRConfig(n_examples=300, n_dense=n_dense, table_sizes=(50, 30, 20),
                                           bag_lengths=(1, 2, 0.5)))  # 0.5: many empty bags
    torch.manual_seed(0)
    config = DLRMConfig(d_max=8, bottom_mlp=(16, 8), top_mlp=(8,), pooling=pooling, interaction=interaction)
    model = DLRM(config, data.n_dense, data.table_sizes, data.feature_names).eval()
    with torch.no_grad():
        for i, rows in enumerate(data.table_sizes):
            model.table_weight(i).normal_()
            model.set_row_sizes(i, torch.randint(1, 9, (rows,)))
    return model, data


def feeds(batch: dict) -> dict:
    out = {"dense": batch["dense"].numpy()} if batch["dense"].shape[1] else {}
    for f, jt in batch["sparse"].to_dict().items():
        out[f"{f}.ids"], out[f"{f}.offsets"] = jt.values().numpy(), jt.offsets().long().numpy()
    return out


@pytest.mark.parametrize(
    ("pooling", "interaction", "n_dense"), [("sum", "dot", 3), ("mean", "cat", 3), ("sum", "dot", 0)]
)
@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_dlrm_onnx_matches_pytorch(pooling, interaction, n_dense, dtype, tmp_path, one_torch_thread):
    from ciess_prod.compress.ctr_model import CompressedDLRM

    model, data = dlrm_and_data(pooling, interaction, n_dense)
    compressed = CompressedDLRM.from_model(model, dtype)
    if dtype == "fp32":  # the ragged tables pool exactly what the masked DLRM pools
        batch = data.batch(list(range(64)))
        with torch.no_grad():
            torch.testing.assert_close(compressed(batch["dense"], batch["sparse"]),
                                       model(batch["dense"], batch["sparse"]), rtol=0, atol=1e-6)
    path = export_onnx(compressed, tmp_path / "dlrm.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    run = session(path)
    for rows in (list(range(64)), [5], list(range(100, 117))):
        batch = data.batch(rows)
        logits, probability = run.run(["logits", "probability"], feeds(batch))
        expected = compressed(batch["dense"], batch["sparse"])
        torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(probability), torch.sigmoid(expected), rtol=0, atol=1e-5)
