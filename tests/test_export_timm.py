"""Export of timm backbones from training checkpoints: ONNX and TorchScript, parity-gated."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mocoserve import model as packages
from mocoserve.core.manifest import Manifest, Preprocess
from mocoserve.export.package import (
    EmbeddingModel,
    ExportError,
    export_checkpoint,
    fold_batchnorm,
    write_package,
)
from mocoserve.train import checkpoint
from mocoserve.train.config import TrainConfig
from mocoserve.train.models import Encoder
from tests.models import make_checkpoint

TINY = {
    "timm:vit_small_patch16_224": {
        "img_size": 32,
        "patch_size": 4,
        "depth": 2,
        "embed_dim": 64,
        "num_heads": 2,
    },
    "timm:convnext_tiny": {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]},
}


@pytest.mark.parametrize("arch", list(TINY))
def test_timm_checkpoint_exports_to_both_formats_with_parity(arch, tmp_path):
    ckpt = make_checkpoint(tmp_path / "c.pt", arch=arch, timm_kwargs=TINY[arch])
    manifest = export_checkpoint(ckpt, tmp_path / "m").manifest
    assert manifest.source["arch"] == arch and manifest.input_size == 32
    assert all(manifest.parity[n]["min_cosine"] >= 0.9999 for n in ("onnx", "torchscript"))
    # independently: the query encoder rebuilt from the checkpoint against each file
    saved = checkpoint.load(ckpt)
    cfg = TrainConfig.from_dict(saved["config"])
    encoder = Encoder(cfg.model).eval()
    encoder.load_state_dict(checkpoint.query_encoder_state(saved))
    images = torch.rand(9, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = F.normalize(encoder.features((images - mean) / std), dim=1).numpy()
    assert manifest.embedding_dim == expected.shape[1]
    for backend in ("onnx", "torchscript"):
        got = packages.load(tmp_path / "m", backend=backend).embed(images.numpy())
        assert ((got * expected).sum(1) >= 0.9999).all(), backend
    import onnx

    graph = onnx.load(str(tmp_path / "m" / "encoder.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis


def test_batchnorm_is_folded_where_there_is_some():
    import timm

    torch.manual_seed(0)
    bn_net = EmbeddingModel(
        timm.create_model("resnet10t", num_classes=0), None, [0.5] * 3, [0.5] * 3
    )
    bn_net.train()(torch.rand(4, 3, 32, 32))  # some BN statistics to fold
    bn_net.eval()
    folded = fold_batchnorm(bn_net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(folded(x), bn_net(x), atol=1e-5)
    vit = timm.create_model(
        "vit_small_patch16_224", num_classes=0, **TINY["timm:vit_small_patch16_224"]
    )
    no_bn = EmbeddingModel(vit, None, [0.5] * 3, [0.5] * 3).eval()
    assert fold_batchnorm(no_bn) is no_bn  # nothing to fold: exported as it is


class PythonBranch(nn.Module):
    """Python control flow on a tensor's value: TorchScript's trace takes the branch taken,
    torch.export (the ONNX exporter) refuses to guess."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.amax()) > 1e9:  # never, for images in [0, 1]
            x = -x
        return torch.flatten(F.adaptive_avg_pool2d(x, 2), 1)  # N x 12


def manifest() -> Manifest:
    return Manifest(12, 16, Preprocess(resize=16, crop=16), "backbone", files={})


def test_a_format_that_cannot_export_is_named_and_the_other_still_writes(tmp_path, capfd):
    model = EmbeddingModel(PythonBranch(), None, [0.5] * 3, [0.5] * 3).eval()
    out = tmp_path / "m"
    with pytest.raises(ExportError) as refused:
        write_package(model, manifest(), out, ("onnx", "torchscript"), 18, False, "branchy")
    message = str(refused.value)
    assert message.startswith("branchy cannot be exported to ONNX (") and "\n" not in message
    assert message.endswith("; --format torchscript writes the TorchScript file alone")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []
    assert capfd.readouterr().err == ""  # the exporter's graph dump is not shown
    written = write_package(model, manifest(), out, ("torchscript",), 18, False, "branchy")
    assert sorted(p.name for p in out.iterdir()) == ["encoder.pt", "manifest.json"]
    assert written.manifest.parity["torchscript"]["min_cosine"] >= 0.9999
    x = np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)
    assert packages.load(out).embed(x).shape == (2, 12)
