"""Confirmation (`spurfast.confirm`) and its kept results (`spurfast.confirm_work`) on
hand-made models and images with known answers: what a mutation review found untested."""
import numpy as np
import pytest
import torch
from torch import nn

from spurfast.confirm import (ConfirmConfig, apply_delta, confirm_findings, confirm_pattern, confirm_verdict,
                              content_controls)
from spurfast.data.sources import ArraySource
from test_confirm import CornerModel, _corner_mask, _finding


def test_paste_replaces_the_pixels_inside_the_mask():
    x = torch.full((2, 1, 4, 4), 0.8)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2, :2] = True
    out = apply_delta(x, torch.full((1, 4, 4), 0.3), mask, "paste")
    assert torch.allclose(out[:, :, :2, :2], torch.tensor(0.3))     # replaced, not 0.8 + 0.3
    assert torch.equal(out[:, :, 2:, :], x[:, :, 2:, :])


def test_p_value_is_bonferroni_adjusted_over_the_three_doses():
    # 5 clean images, the pattern flips all 5 at every dose, 9 scattered pixels flip none:
    # McNemar p = 0.5**5 at each dose, reported times 3 -> 0.09375: not confirmed on 5 images
    x = torch.zeros(5, 1, 16, 16)
    r = confirm_pattern(CornerModel(), x, 1, _corner_mask(), _finding([])["_contrast"], config=ConfirmConfig(seed=0))
    assert r["flip_rate"] == 1.0 and r["control_flip_rate"] == 0.0 and r["dose_control_flip_rate"] == 0.0
    assert r["p_value"] == pytest.approx(3 * 0.5 ** 5)
    assert confirm_verdict(r) == "no_effect"


def test_content_controls_stay_inside_the_mask():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:2, :3] = True
    cls = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    base = torch.full((1, 8, 8), 0.1)
    d = content_controls(mask, cls, base, 7, np.random.default_rng(0))
    assert d.shape == (7, 1, 8, 8)
    assert (d[:, :, ~mask] == 0).all()
    inside = d[:, :, mask]
    want = (cls - base)[:, :, mask]
    assert all(any(torch.equal(row, w) for w in want) for row in inside)


class DarkCornerModel(nn.Module):
    """Class 1 when the bottom-right 3x3 patch is dark."""
    def forward(self, x):
        z = 20 * (0.45 - x[:, :, -4:-1, -4:-1].mean((1, 2, 3))) - 2
        return torch.stack([torch.zeros_like(z), z], 1)


def test_paste_mode_content_control_draws_class_images_like_the_pasted_pattern():
    # paste mode: the pattern is an absolute image (0.2 in the corner) over clean images of
    # 0.5; the class images most like it are the dark-cornered quarter (P - base < 0), not
    # the brightest.  Pasting genuine dark-cornered class content flips as the pattern does.
    g = torch.Generator().manual_seed(0)
    x = 0.45 + 0.1 * torch.rand(200, 1, 16, 16, generator=g)
    pattern = torch.full((1, 16, 16), 0.5)
    pattern[0, -4:-1, -4:-1] = 0.2
    cls_imgs = 0.45 + 0.1 * torch.rand(40, 1, 16, 16, generator=g)
    cls_imgs[:10, :, -4:-1, -4:-1] = 0.0      # a quarter carry the dark corner
    cls_imgs[10:, :, -4:-1, -4:-1] = 1.0
    r = confirm_pattern(DarkCornerModel(), x, 1, _corner_mask(), torch.zeros(1, 16, 16), pattern,
                        config=ConfirmConfig(mode="paste", seed=0), class_images=cls_imgs)
    assert r["flip_rate"] > 0.95
    assert r["content_flip_rate"] > 0.9, r     # genuine class content moves it as much
    assert confirm_verdict(r) == "class_content"


def test_pool_images_predicted_as_the_class_are_no_clean_images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(60, 1, 16, 16, generator=g) * 0.2
    labels = np.zeros(60, int)                 # none labelled 1 (no content control)
    pred = np.zeros(60, int)
    pred[:20] = 1                              # 3 members + 17 misclassified as 1 outside the finding
    f = [_finding([0, 1, 2])]
    confirm_findings(f, CornerModel(), pool=ArraySource(x, labels, name="pool"), pool_pred=pred)
    assert f[0]["_confirm_detail"]["n_images"] == 40


class NaNWhenCornerSaturates(nn.Module):
    def forward(self, x):
        corner = x[:, :, -4:-1, -4:-1]
        z = 12 * corner.mean((1, 2, 3)) - 3
        z = z + torch.where(corner.flatten(1).amax(1) >= 1.0, float("nan"), 0.0)
        return torch.stack([torch.zeros_like(z), z], 1)


def test_images_the_model_gives_nan_for_with_the_pattern_are_left_out():
    x = torch.zeros(300, 1, 16, 16)
    x[:150, :, -4:-1, -4:-1] = 0.15            # + 0.9 saturates: NaN with the pattern only
    r = confirm_pattern(NaNWhenCornerSaturates(), x, 1, _corner_mask(), _finding([])["_contrast"],
                        config=ConfirmConfig(seed=0))
    assert r["n_images"] == 150 and r["flip_rate"] == 1.0, r


class _Src(ArraySource):
    loader_backend, device = "pil", "cpu"


def _kept(tmp_path, config=None, src=None):
    from spurfast.confirm_work import KeptConfirmations
    src = src or _Src(torch.rand(10, 1, 16, 16, generator=torch.Generator().manual_seed(0)), None, name="clean")
    return KeptConfirmations(tmp_path, CornerModel(), src, config or ConfirmConfig(), content="digest")


def _other_finding(f, what):
    g = dict(f)
    if what == "class":
        g["class"] = 0
    elif what == "mask":
        g["_mask"] = np.roll(f["_mask"], 1, 0)
    elif what == "contrast":
        g["_contrast"] = f["_contrast"] * 0.5
    elif what == "pattern":
        g["_pattern"] = torch.full((1, 16, 16), 0.7)
    return g


@pytest.mark.parametrize("change", ["seed", "mode", "content_match", "loader_backend", "version",
                                    "class", "mask", "contrast", "pattern", "class_images"])
def test_kept_confirmation_keys_on_every_input(tmp_path, monkeypatch, change):
    import spurfast.confirm_work as W
    f, idx, own = _finding([0]), np.arange(5), np.arange(5, 8)
    f["_pattern"] = torch.full((1, 16, 16), 0.5)
    _kept(tmp_path).keep(f, idx, own, {"flip_rate": 0.5})
    assert _kept(tmp_path).lookup(f, idx, own) == {"flip_rate": 0.5}
    cfg, src = ConfirmConfig(), None
    if change == "seed":
        cfg = ConfirmConfig(seed=1)
    elif change == "mode":
        cfg = ConfirmConfig(mode="paste")
    elif change == "content_match":
        cfg = ConfirmConfig(content_match=0.5)
    elif change == "loader_backend":
        src = _Src(torch.rand(10, 1, 16, 16, generator=torch.Generator().manual_seed(0)), None, name="clean")
        src.loader_backend = "dali"
    elif change == "version":
        monkeypatch.setattr(W, "VERSION", W.VERSION + 1)
    elif change == "class_images":
        own = np.arange(5, 9)
    else:
        f = _other_finding(f, change)
    assert _kept(tmp_path, cfg, src).lookup(f, idx, own) is None


def test_a_kept_file_without_a_result_is_computed_again(tmp_path):
    kept = _kept(tmp_path)
    f, idx, own = _finding([0]), np.arange(5), np.arange(0)
    tmp_path.mkdir(exist_ok=True)
    kept._path(f, idx, own).write_text("{}")
    assert kept.lookup(f, idx, own) is None
