"""Models and methods on tiny tensors: split BN, queue, momentum update, shuffled keys, configs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mocoserve.core.errors import UserError
from mocoserve.train.config import ModelConfig
from mocoserve.train.configure import build_config, method_defaults
from mocoserve.train.methods import MoCo, SupConQueue, build_method
from mocoserve.train.models import Encoder, SplitBatchNorm
from mocoserve.train.trainer import lr_factor


def tiny_cfg(method: str = "moco-v2", **model):
    cfg = method_defaults(method)
    cfg.model.arch = "resnet18"
    cfg.model.dim = 16
    cfg.method.queue_size = 10
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


def test_split_batchnorm_equals_batchnorm_per_chunk():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5)
    split = SplitBatchNorm(3, num_splits=2)
    with torch.no_grad():
        split.weight.uniform_()
        split.bias.uniform_()
    plain = [nn.BatchNorm2d(3) for _ in range(2)]
    for bn in plain:
        bn.load_state_dict(split.state_dict())
    out = split(x)
    # as in the MoCo demo, split j holds samples j, j+S, j+2S, ...
    for j, bn in enumerate(plain):
        torch.testing.assert_close(out[j::2], bn(x[j::2]))
    # running stats: the mean of the per-split updates
    torch.testing.assert_close(
        split.running_mean, (plain[0].running_mean + plain[1].running_mean) / 2
    )
    split.eval()
    torch.testing.assert_close(
        split(x),
        F.batch_norm(
            x,
            split.running_mean,
            split.running_var,
            split.weight,
            split.bias,
            False,
            0.0,
            split.eps,
        ),
    )


def test_split_batchnorm_rejects_uneven_batch():
    with pytest.raises(ValueError, match="split"):
        SplitBatchNorm(3, num_splits=4)(torch.randn(6, 3, 2, 2))


def test_encoder_small_stem_keeps_resolution_and_state_dict_is_plain_bn():
    enc = Encoder(ModelConfig(arch="resnet18", small_stem=True, bn_splits=2, dim=8))
    assert enc.backbone.conv1.kernel_size == (3, 3)
    assert isinstance(enc.backbone.maxpool, nn.Identity)
    assert enc(torch.randn(4, 3, 32, 32)).shape == (4, 8)
    plain = Encoder(ModelConfig(arch="resnet18", small_stem=True, dim=8))
    plain.load_state_dict(enc.state_dict())  # split BN saves BatchNorm2d's keys


@pytest.mark.parametrize("arch,feat", [("resnet18", 512), ("resnet50", 2048)])
def test_encoder_feature_dims(arch, feat):
    enc = Encoder(ModelConfig(arch=arch, head="mlp", dim=32))
    assert enc.feature_dim == feat
    enc.eval()
    x = torch.randn(2, 3, 32, 32)
    assert enc.features(x).shape == (2, feat) and enc(x).shape == (2, 32)


def test_unknown_arch_is_a_user_error():
    with pytest.raises(UserError, match="unknown --arch"):
        Encoder(ModelConfig(arch="vgg16"))


@pytest.mark.parametrize("batch,size", [(4, 10), (3, 10), (7, 5), (12, 5)])
def test_queue_wraps_for_any_batch_and_queue_size(batch, size):
    cfg = tiny_cfg()
    cfg.method.queue_size = size
    moco = MoCo(cfg)
    written = []
    for step in range(4):
        keys = torch.full((batch, 16), float(step + 1))
        written.extend([step + 1] * batch)
        moco._enqueue(keys)
    expected_ptr = len(written) % size
    assert int(moco.queue_ptr) == expected_ptr
    # the queue holds the newest `size` keys, the newest just before the pointer
    newest = written[-size:]
    slots = [(expected_ptr - size + i) % size for i in range(size)]
    assert [int(moco.queue[s, 0]) for s in slots] == newest


def test_queue_and_labels_are_in_the_state_dict():
    method = SupConQueue(tiny_cfg("supcon-queue"))
    method._enqueue(F.normalize(torch.randn(3, 16), dim=1), torch.tensor([4, 5, 6]))
    state = method.state_dict()
    assert {"queue", "queue_labels", "queue_ptr"} <= set(state)
    assert state["queue_labels"][:3].tolist() == [4, 5, 6]
    assert state["queue_labels"][3:].eq(-1).all()
    assert any(k.startswith("key_encoder.") for k in state)


def test_momentum_update_is_moco_equation_2():
    moco = MoCo(tiny_cfg())
    moco.momentum = 0.9
    with torch.no_grad():
        for p in moco.query_encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in moco.key_encoder.parameters()]
    moco._momentum_update()
    for pk, pk0, pq in zip(
        moco.key_encoder.parameters(), before, moco.query_encoder.parameters(), strict=True
    ):
        torch.testing.assert_close(pk, 0.9 * pk0 + 0.1 * pq)
    assert not any(p.requires_grad for p in moco.key_encoder.parameters())


def test_shuffled_keys_are_unshuffled_back_to_their_images():
    """In eval mode BN does not mix samples, so shuffled keys must equal plain keys, in order."""
    moco = MoCo(tiny_cfg(bn_splits=2))
    moco.eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        plain = F.normalize(moco.key_encoder(x), dim=1)
    torch.testing.assert_close(moco._keys(x), plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["moco-v1", "moco-v2", "supcon", "supcon-queue"])
def test_methods_step_and_only_query_encoder_gets_gradients(method):
    torch.manual_seed(0)
    m = build_method(tiny_cfg(method, bn_splits=2))
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    loss = m(views, torch.tensor([0, 1, 0, 1]))["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in m.query_encoder.parameters())
    if hasattr(m, "key_encoder"):
        assert all(p.grad is None for p in m.key_encoder.parameters())


def test_lr_schedules():
    cfg = method_defaults("moco-v1")  # step at 120 and 160 of 200
    assert lr_factor(cfg, 0, 10) == 1.0
    assert lr_factor(cfg, 120 * 10, 10) == pytest.approx(0.1)
    assert lr_factor(cfg, 160 * 10, 10) == pytest.approx(0.01)
    cfg = method_defaults("moco-v2")
    cfg.optim.epochs, cfg.optim.warmup_epochs = 10, 2
    assert lr_factor(cfg, 0, 5) == pytest.approx(0.1)
    assert lr_factor(cfg, 9, 5) == pytest.approx(1.0)
    assert lr_factor(cfg, 10, 5) == pytest.approx(1.0)
    assert lr_factor(cfg, 30, 5) == pytest.approx(0.5)
    assert lr_factor(cfg, 50, 5) == pytest.approx(0.0, abs=1e-12)


def test_paper_defaults_and_cifar_preset():
    v1, v2 = method_defaults("moco-v1"), method_defaults("moco-v2")
    assert (v1.model.head, v1.method.temperature, v1.optim.schedule) == ("linear", 0.07, "step")
    assert (v2.model.head, v2.method.temperature, v2.optim.schedule) == ("mlp", 0.2, "cosine")
    assert (v2.method.queue_size, v2.method.momentum, v2.optim.lr, v2.optim.weight_decay) == (
        65536,
        0.999,
        0.03,
        1e-4,
    )
    assert method_defaults("supcon-queue").method.queue_size == 8192
    c = build_config("moco-v2", preset="cifar")
    assert (c.model.small_stem, c.method.queue_size, c.method.momentum, c.method.temperature) == (
        True,
        4096,
        0.99,
        0.1,
    )
    assert (c.optim.lr, c.optim.weight_decay, c.data.image_size) == (0.06, 5e-4, 32)


def test_config_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: {name: supcon, temperature: 0.1}\noptim: {epochs: 3}\n")
    cfg = build_config(None, None, f, {"optim.epochs": 5})
    assert (cfg.method.name, cfg.method.temperature, cfg.optim.epochs) == ("supcon", 0.1, 5)
    f.write_text("optim: {epochz: 3}\n")
    with pytest.raises(UserError, match=r"unknown config key 'optim\.epochz'"):
        build_config(None, None, f, {})
    with pytest.raises(UserError, match="not divisible"):
        build_config("moco-v2", None, None, {"optim.batch_size": 6, "model.bn_splits": 4})
