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
