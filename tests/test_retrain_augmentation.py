"""The CIFAR retrain's training augmentation is torchvision's RandomCrop(32, padding=4) +
RandomHorizontalFlip (then Normalize, then DARTS' Cutout 16), in distribution and pixel for pixel.

The loader under test is the one the retrain trains on: `retrain.data.build_loaders` on the shipped
CIFAR config, reading an npz of images that carry their own coordinates (channel 0 = row + 1,
channel 1 = column + 1, channel 2 = 200; raw 0 occurs only in padding). Each output image then names
its crop offset and flip; the test rebuilds that crop with torchvision's own functions (zero `fill`
pad, crop, hflip) and requires the loader's output to equal it, and tests the recovered offsets and
flips against the uniform distribution with chi-square tests (fixed seed, so deterministic).

Verified by mutating `sdarts/data/loader.py` in a copy of the tree (each failed with the line quoted):
- grey padding (pad value = the mean, i.e. normalise before padding): "padding is not black"
- reflect padding (`F.pad(..., mode="reflect")`): "padding is not black"
- offsets 0..7 (`torch.randint(0, 2 * self.pad, ...)`): "offsets are not uniform over 0..8"
- flip probability 0.45 (`torch.rand(n) < 0.45`): "flip probability is not 1/2: 7392/16384 (p = 7.27e-36)"
- flip probability 0.48: "flip probability is not 1/2: 7885/16384 (p = 1.67e-06)"
- one offset for both axes (`randint(..., (n, 1)).expand(n, 2)`): "offsets are not uniform over 0..8 x 0..8"
- Cutout square 12 instead of 16 (`half = self.cutout // 2 - 2`): "Cutout squares are not 16x16"
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import stats
from torchvision.transforms import functional as TF

from conftest import ROOT
from retrain.config import RetrainConfig, load
from retrain.data import build_loaders
from sdarts.data.constants import CIFAR_MEAN, CIFAR_STD

N = 8192       # images per epoch; two epochs -> 16384 crops (~200 per offset cell of 81)
P_MIN = 1e-3   # a fixed-seed test: the p-values are what they are; below this the distribution is wrong


def _pattern() -> np.ndarray:
    r, c = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    img = np.stack([r + 1, c + 1, np.full_like(r, 200)], -1).astype(np.uint8)  # HWC, as CIFAR npz
    return img


def _train_loader(cfg):
    """The training loader the retrain builds."""
    return build_loaders(cfg, 0, 1, torch.device("cpu")).train


def _loader(tmp_path, cutout: int):
    x = np.broadcast_to(_pattern(), (N, 32, 32, 3)).copy()
    y = (np.arange(N) % 10).astype(np.uint8)
    np.savez(tmp_path / "pattern.npz", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    over = [f"data.root={tmp_path / 'pattern.npz'}", "data.micro_batch=1024", f"data.cutout={cutout}",
            "data.holdout=0"]
    cfg: RetrainConfig = load(ROOT / "configs/retrain/cifar10.yaml", over)
    train = _train_loader(cfg)
    assert train.augment and len(train) == N // 1024
    return train


def _batches(loader, epochs: int = 2) -> torch.Tensor:
    out = []
    for e in range(epochs):
        loader.set_epoch(e)
        out += [b.x for b in loader]
    return torch.cat(out)


MEAN = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1) * 255
STD = torch.tensor(CIFAR_STD).view(1, 3, 1, 1) * 255


def _raw(x: torch.Tensor) -> torch.Tensor:
    return (x * STD + MEAN).round().long()  # (the pixel checks catch a non-integer image)


def _recover(raw: torch.Tensor):
    """(row offset, col offset, flipped) of each crop in 0..8 (torchvision's top/left in the padded
    image), read off the centre pixels (always inside the image for a pad-4 crop)."""
    flipped = raw[:, 1, 16, 17] < raw[:, 1, 16, 15]
    off_r = raw[:, 0, 16, 16] - 1 - 16 + 4
    off_c = torch.where(flipped, raw[:, 1, 16, 16] - 1 - 15 + 4, raw[:, 1, 16, 16] - 1 - 16 + 4)
    return off_r, off_c, flipped


def _torchvision_crop(off_r: int, off_c: int, flip: bool) -> torch.Tensor:
    img = torch.from_numpy(_pattern()).permute(2, 0, 1).float()
    out = TF.crop(TF.pad(img, [4], fill=0, padding_mode="constant"), off_r, off_c, 32, 32)
    return TF.hflip(out) if flip else out


def test_crops_and_flips_are_torchvision_random_crop_pad4_and_flip(tmp_path):
    x = _batches(_loader(tmp_path, cutout=0))
    raw = _raw(x)
    off_r, off_c, flipped = _recover(raw)
    n = len(x)

    # pixel for pixel: every crop equals torchvision's crop of the zero-padded image at its offset
    black = (0.0 - MEAN) / STD  # raw pixel 0, normalised: what padding must be
    for k in range(0, n, 97):  # a spread of samples; each offset/flip class shows up many times
        want = _torchvision_crop(int(off_r[k]), int(off_c[k]), bool(flipped[k]))
        pad = (want == 0).all(0)  # where the crop reaches into the padding
        got_pad = x[k][:, pad]
        assert torch.allclose(got_pad, black.view(3, 1).expand_as(got_pad), atol=1e-6), (
            f"padding is not black (raw 0): sample {k}, offset ({int(off_r[k])}, {int(off_c[k])}), "
            f"pad pixels read raw {raw[k][:, pad][:, :4].tolist()}")
        assert torch.equal(raw[k], want.long()), f"crop {k} is not torchvision's crop at its offset"
    assert ((off_r < 4) | (off_r > 4)).any() and ((off_c < 4) | (off_c > 4)).any()  # padding was seen

    # distribution: offsets uniform over 0..8 x 0..8 (independent), flips fair and independent of them
    assert off_r.min() >= 0 and off_c.min() >= 0 and off_r.max() <= 8 and off_c.max() <= 8, "offset outside 0..8"
    cells = torch.bincount(off_r * 9 + off_c, minlength=81).numpy()
    p_off = stats.chisquare(cells).pvalue
    assert p_off > P_MIN, f"offsets are not uniform over 0..8 x 0..8: chi2 p = {p_off:.3g}, counts {cells.tolist()}"
    p_flip = stats.binomtest(int(flipped.sum()), n, 0.5).pvalue
    assert p_flip > P_MIN, f"flip probability is not 1/2: {int(flipped.sum())}/{n} (p = {p_flip:.3g})"
    joint = torch.bincount(flipped.long() * 81 + off_r * 9 + off_c, minlength=162).numpy()
    p_joint = stats.chisquare(joint).pvalue
    assert p_joint > P_MIN, f"(offset, flip) not uniform over 162 cells: chi2 p = {p_joint:.3g}"
    # each marginal alone too (sharper against a one-axis error)
    for name, o in (("row", off_r), ("col", off_c)):
        p = stats.chisquare(torch.bincount(o, minlength=9).numpy()).pvalue
        assert p > P_MIN, f"offsets are not uniform over 0..8 ({name}): p = {p:.3g}"


def test_cutout_is_a_16_square_around_a_uniform_centre(tmp_path):
    """DARTS' Cutout(16) after Normalize: zero a 16x16 square centred uniformly on 0..31, clipped at the
    border. Same seed with and without cutout gives the same crops, so the zeroed pixels are where
    the two differ."""
    plain = _batches(_loader(tmp_path, cutout=0), epochs=1)
    cut = _batches(_loader(tmp_path, cutout=16), epochs=1)
    assert (plain != 0).all()  # no pattern pixel normalises to exactly 0
    mask = cut != plain
    assert (cut[mask] == 0).all(), "Cutout changes pixels other than by zeroing them"
    assert (mask == mask[:, :1]).all(), "Cutout differs across channels"
    m = mask[:, 0]
    rows, cols = m.any(2), m.any(1)
    r0, r1 = rows.float().argmax(1), 32 - rows.flip(1).float().argmax(1)
    c0, c1 = cols.float().argmax(1), 32 - cols.flip(1).float().argmax(1)
    assert rows.any(1).all(), "a sample without a Cutout square"
    box = torch.zeros_like(m)
    for k in range(len(m)):
        box[k, r0[k]:r1[k], c0[k]:c1[k]] = True
    assert torch.equal(box, m), "Cutout region is not a rectangle"
    h, w = r1 - r0, c1 - c0
    # clipped only at the border: height 16 inside, 8..15 touching it (centre 0..7 or 24..31)
    inner_r, inner_c = (r0 > 0) & (r1 < 32), (c0 > 0) & (c1 < 32)
    assert (h[inner_r] == 16).all() and (w[inner_c] == 16).all() and h.max() == 16 and w.max() == 16, (
        f"Cutout squares are not 16x16: heights {torch.bincount(h).tolist()}")
    assert h.min() >= 8 and w.min() >= 8, "Cutout centre outside the image"
    centre_r = torch.where(r0 > 0, r0 + 8, r1 - 8)
    centre_c = torch.where(c0 > 0, c0 + 8, c1 - 8)
    for name, c in (("row", centre_r), ("col", centre_c)):
        p = stats.chisquare(torch.bincount(c, minlength=32).numpy()).pvalue
        assert c.min() >= 0 and c.max() <= 31 and p > P_MIN, f"Cutout {name} centres not uniform on 0..31: p = {p:.3g}"
