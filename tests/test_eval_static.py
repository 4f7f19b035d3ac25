"""Static-shape evaluation: the last, partial batch is padded to the full batch so that a compiled model sees
one input shape, and the padded rows are left out of every sum."""

import pytest
import torch
from torch import nn

from tinyswin.evaluate import evaluate
from tinyswin.model import SwinTransformer
from tinyswin.model_presets import preset_config

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(nn.Module):
    """Passes inputs to a model and records the batch shapes it saw."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return self.inner(x)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def model(seed: int = 0) -> Recorder:
    torch.manual_seed(seed)
    cfg = preset_config(
        "nano", num_classes=7, img_size=16, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4
    )
    net = SwinTransformer(cfg).eval()
    with torch.no_grad():  # spread the logits so that predictions differ between images
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return Recorder(net)


def split(n: int, batch: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 7, (n,), generator=g)
    return [(images[i : i + batch], labels[i : i + batch]) for i in range(0, n, batch)]


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_padded_last_batch_gives_the_unpadded_results_with_one_shape(tta: str) -> None:
    data = split(45, 16)  # batches of 16, 16 and 13
    net = model()
    padded = evaluate(net, data, normalize, num_classes=7, label_smoothing=0.1, tta=tta)
    assert set(net.shapes) == {(16, 3, 16, 16)}  # the model saw one batch shape only
    assert len(net.shapes) == (6 if tta == "flip" else 3)
    net.shapes.clear()
    plain = evaluate(net, data, normalize, num_classes=7, label_smoothing=0.1, tta=tta, static_shapes=False)
    assert (13, 3, 16, 16) in net.shapes  # the unpadded evaluation ran the partial batch as it came
    pairs = [(padded, plain)] + ([(padded.plain, plain.plain)] if tta == "flip" else [])
    for a, b in pairs:
        assert a.n == b.n == 45
        assert (a.correct1, a.correct5) == (b.correct1, b.correct5)
        assert torch.equal(a.confusion, b.confusion) and int(a.confusion.sum()) == 45
        assert torch.equal(a.bins[0], b.bins[0]) and int(a.bins[0].sum()) == 45  # calibration counts
        assert torch.allclose(a.bins[1:], b.bins[1:], rtol=1e-5)
        assert a.loss_sum == pytest.approx(b.loss_sum, rel=1e-5)
    assert 0 < padded.correct1 < 45  # a model that gets some right and some wrong: the counts mean something


def test_padding_rows_do_not_reach_the_sums() -> None:
    """A split whose last batch holds one image: its sums are those of that image alone, whatever padding
    the batch carried."""
    data = split(17, 16, seed=4)
    net = model(seed=1)
    whole = evaluate(net, data, normalize, num_classes=7)
    first = evaluate(net, data[:1], normalize, num_classes=7)
    last = evaluate(net, data[1:], normalize, num_classes=7)  # one image, alone: no padding
    assert whole.n == 17 and last.n == 1
    assert whole.correct1 == first.correct1 + last.correct1
    assert torch.equal(whole.confusion, first.confusion + last.confusion)
    assert whole.loss_sum == pytest.approx(first.loss_sum + last.loss_sum, rel=1e-5)
