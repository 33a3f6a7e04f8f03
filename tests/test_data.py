"""Image folders: scanning, awkward and bad files, sharding, deterministic augmentation."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mocoserve.core.errors import UserError
from mocoserve.core.images import iter_image_files, load_rgb
from mocoserve.train.augment import MultiView, train_transform
from mocoserve.train.config import DataConfig
from mocoserve.train.data import EpochSampler, ImageDataset, ShardSampler, make_loader, scan_folder
from tests.imagegen import class_image, make_labelled


def test_scan_labelled_and_flat(labelled_dir, flat_dir):
    lab = scan_folder(labelled_dir)
    assert lab.labelled and lab.classes == ["class_0", "class_1", "class_2"]
    assert len(lab) == 24 and sorted(set(lab.labels)) == [0, 1, 2]
    flat = scan_folder(flat_dir)
    assert not flat.labelled and set(flat.labels) == {-1}


def test_scan_errors(tmp_path, labelled_dir):
    with pytest.raises(UserError, match="not found"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no images"):
        scan_folder(tmp_path / "empty")
    other = make_labelled(tmp_path / "other", classes=4, per_class=1)
    with pytest.raises(UserError, match="classes the training folder lacks: class_3"):
        scan_folder(other, scan_folder(labelled_dir).classes)


def test_val_may_lack_classes_and_keeps_train_numbering(tmp_path):
    val = make_labelled(tmp_path / "val", classes=3, per_class=1)
    (val / "class_0").rename(val / "zzz_unused")  # now "class_1", "class_2", "zzz_unused"
    (val / "zzz_unused").rename(val / "class_2b")
    index = scan_folder(val, ["class_0", "class_1", "class_2", "class_2b"])
    assert sorted(set(index.labels)) == [1, 2, 3]


def test_symlink_loops_are_followed_once(tmp_path):
    root = make_labelled(tmp_path / "d", classes=1, per_class=2)
    os.symlink(root, root / "class_0" / "loop")
    assert len(list(iter_image_files(root))) == 2


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def test_awkward_images_decode_to_the_right_pixels(tmp_path):
    rgb = class_image(0, 0, size=20)
    # EXIF orientation 6 (rotate 90° CW to display): a 20x10 file displays as 10x20
    wide = rgb.resize((20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    p = _save(wide, tmp_path / "rot.png", exif=exif.tobytes())
    expected = _pixels(wide.transpose(Image.Transpose.ROTATE_270))
    assert np.array_equal(_pixels(load_rgb(p)), expected)
    # CMYK JPEG: the same colours back (within JPEG's loss and the CMYK round trip)
    cmyk = load_rgb(_save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg", quality=98))
    assert cmyk.mode == "RGB" and np.abs(_pixels(cmyk) - _pixels(rgb)).mean() < 6
    # grey: every channel is the grey value, exactly
    grey = rgb.convert("L")
    out = _pixels(load_rgb(_save(grey, tmp_path / "gray.png")))
    assert all(np.array_equal(out[..., c], _pixels(grey)) for c in range(3))
    # fully transparent -> white background; half transparent -> blended with white
    rgba = rgb.convert("RGBA")
    rgba.putalpha(0)
    assert load_rgb(_save(rgba, tmp_path / "alpha.png")).getpixel((0, 0)) == (255, 255, 255)
    rgba.putalpha(128)
    half = _pixels(load_rgb(_save(rgba, tmp_path / "half.png")))
    assert np.abs(half - (_pixels(rgb) * 128 + 255 * 127) / 255).max() <= 1
    # palette: the palette's colours, exactly
    indexed = rgb.convert("P", palette=Image.ADAPTIVE)
    pal = load_rgb(_save(indexed, tmp_path / "pal.gif"))
    assert np.array_equal(_pixels(pal), _pixels(indexed.convert("RGB")))
    # 16-bit grey: scaled to 8 bits, not clipped to 255
    deep = (np.arange(400).reshape(20, 20) * 160).astype(np.uint16)
    out = _pixels(load_rgb(_save(Image.fromarray(deep), tmp_path / "deep.png")))
    assert out.shape == (20, 20, 3)
    assert np.abs(out[..., 0] - np.round(deep / 65535 * 255)).max() <= 1
    # animated: the first frame (GIF quantises its colours), not the second
    frames = [class_image(i, 0, size=16) for i in range(3)]
    anim = tmp_path / "anim.gif"
    frames[0].save(anim, save_all=True, append_images=frames[1:])
    first = _pixels(load_rgb(anim))
    assert np.abs(first - _pixels(frames[0])).mean() < 12
    assert np.abs(first - _pixels(frames[1])).mean() > 40


def test_jpeg_draft_decodes_at_reduced_size(tmp_path):
    p = _save(class_image(1, 0, size=400), tmp_path / "big.jpg")
    small = load_rgb(p, draft_size=64)
    assert 64 <= min(small.size) < 400


def test_dataset_skips_unreadable_files(tmp_path, capsys):
    root = make_labelled(tmp_path / "d", classes=1, per_class=3)
    (root / "class_0" / "empty.jpg").write_bytes(b"")
    (root / "class_0" / "text.png").write_text("not an image")
    good = io.BytesIO()
    class_image(0, 9, size=64).save(good, format="JPEG")
    (root / "class_0" / "truncated.jpg").write_bytes(good.getvalue()[:200])
    index = scan_folder(root)
    assert len(index) == 6
    ds = ImageDataset(index.files, index.labels, train_transform(DataConfig(image_size=16)))
    items = [ds[(i, 0)] for i in range(len(ds))]
    assert all(x.shape == (3, 16, 16) for x, _ in items)
    err = capsys.readouterr().err
    assert "empty.jpg" in err and "text.png" in err and "truncated.jpg" in err


def test_epoch_sampler_shards_whole_batches_deterministically(monkeypatch):
    import mocoserve.train.distributed as d

    shards = []
    for r in range(2):
        monkeypatch.setattr(d, "rank", lambda r=r: r)
        monkeypatch.setattr(d, "world_size", lambda: 2)
        s = EpochSampler(n=23, batch_size=5, seed=3)
        s.set_epoch(1)
        shards.append([i for i, _ in s])
        assert len(shards[-1]) == len(s) == 10  # 2 batches of 5 per rank
        s.set_epoch(1, skip_batches=1)
        assert [i for i, _ in s] == shards[-1][5:]
    assert not set(shards[0]) & set(shards[1])
    s2 = EpochSampler(n=23, batch_size=5, seed=3)
    s2.set_epoch(2)
    assert [i for i, _ in s2] != shards[-1]


def test_shard_sampler_covers_everything(monkeypatch):
    import mocoserve.train.distributed as d

    seen = []
    for r in range(3):
        monkeypatch.setattr(d, "rank", lambda r=r: r)
        monkeypatch.setattr(d, "world_size", lambda: 3)
        seen.extend(ShardSampler(7))
    assert sorted(set(seen)) == list(range(7)) and len(seen) == 9


def test_augmentation_does_not_depend_on_workers(labelled_dir):
    index = scan_folder(labelled_dir)
    ds = ImageDataset(
        index.files, index.labels, MultiView(train_transform(DataConfig(image_size=16)), 2), seed=5
    )

    def run(workers):
        sampler = EpochSampler(len(ds), 4, seed=5)
        sampler.set_epoch(3)
        loader = make_loader(ds, sampler, 4, workers, False, True, persistent=False)
        return torch.cat([torch.cat(views) for views, _ in loader])

    a, b = run(0), run(2)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a[:4], a[4:8])  # the two views differ


def test_batched_color_augment_matches_torchvision_per_image():
    from torchvision.transforms.v2 import functional as TF

    from mocoserve.train.augment import color_augment_batch

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 12, 12), generator=g, dtype=torch.uint8)
    params = torch.tensor(
        [  # brightness, contrast, saturation, hue, gray, sigma
            [1.0, 1.0, 1.0, 0.0, 0.0, 0.0],
            [1.3, 0.7, 1.2, 0.08, 0.0, 0.0],
            [0.6, 1.4, 0.6, -0.1, 0.0, 0.0],
            [1.1, 0.9, 1.3, 0.4, 1.0, 0.0],
            [0.8, 1.2, 1.0, -0.35, 0.0, 1.3],
        ]
    )
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    ours = color_augment_batch(images, params, mean, std)
    for i in range(5):
        b, c, s, h, gray, sigma = params[i].tolist()
        x = images[i].float() / 255
        x = TF.adjust_hue(
            TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, b), c), s), h
        )
        if gray:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if sigma:
            x = TF.gaussian_blur(x, [13, 13], [sigma, sigma])
        x = TF.normalize(x, list(mean), list(std))
        torch.testing.assert_close(ours[i], x, rtol=1e-4, atol=1e-4)


def test_gpu_augment_views_are_uint8_crops_with_seeded_params(labelled_dir):
    from mocoserve.train.augment import GeometricView

    index = scan_folder(labelled_dir)
    cfg = DataConfig(image_size=16, gpu_augment=True)
    ds = ImageDataset(index.files, index.labels, MultiView(GeometricView(cfg), 2), seed=1)
    (v1, p1), (v2_, p2) = ds[(3, 0)][0]
    assert v1.dtype == torch.uint8 and v1.shape == (3, 16, 16) and p1.shape == (6,)
    again = ds[(3, 0)][0]
    assert torch.equal(again[0][0], v1) and torch.equal(again[1][1], p2)
    assert not torch.equal(v1, v2_) or not torch.equal(p1, p2)
