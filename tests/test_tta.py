"""Test-time augmentation (`tta: flip`): the logits are the mean of the image's and its mirror's, the
numbers without it come from the same pass, and the run's summary and `tinyswin eval` report both."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tinyswin import cli
from tinyswin.config import load_config
from tinyswin.data import write_cache
from tinyswin.data.synthetic import CLASS_NAMES, synthetic_splits
from tinyswin.errors import ConfigError
from tinyswin.evaluate import evaluate, evaluate_checkpoint
from tinyswin.model import SwinTransformer
from tinyswin.model_presets import preset_config
from tinyswin.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

KEEP = [0, 5, 6, 8]
MEAN, STD = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.25, 0.2, 0.3])


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W)."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    return (x - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)


def tiny_model(num_classes: int = 4, seed: int = 0) -> SwinTransformer:
    torch.manual_seed(seed)
    cfg = preset_config(
        "nano", num_classes=num_classes, img_size=16, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
        window_size=4,
    )  # fmt: skip
    model = SwinTransformer(cfg).eval()
    with torch.no_grad():  # a model that tells images apart (the zero-initialised head would not)
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


class Mirrored(nn.Module):
    """A model that is mirror-symmetric by construction: g(x) + g(mirror of x)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.inner(x.flip(-1))


def batches(n: int = 23, batch: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    return [(images[i : i + batch], labels[i : i + batch]) for i in range(0, n, batch)]


def test_flip_logits_are_the_mean_of_the_image_and_its_mirror() -> None:
    model = tiny_model()
    data = batches()
    result = evaluate(model, data, normalize, num_classes=4, label_smoothing=0.1, tta="flip")
    images = torch.cat([b[0] for b in data])
    labels = torch.cat([b[1] for b in data])
    with torch.no_grad():
        x = normalize(images)
        plain = model(x)
        mean = (model(x) + model(x.flip(-1))) / 2  # by hand
    for res, logits in ((result, mean), (result.plain, plain)):
        assert res.n == 23
        loss = F.cross_entropy(logits, labels, label_smoothing=0.1, reduction="sum")
        assert res.loss_sum == pytest.approx(loss.item(), rel=1e-5)
        assert res.correct1 == int((logits.argmax(1) == labels).sum())
        assert res.correct5 == 23  # 4 classes: top-5 holds every class
        expected = torch.zeros(4, 4, dtype=torch.int64)
        expected.index_put_((labels, logits.argmax(1)), torch.ones(23, dtype=torch.int64), accumulate=True)
        assert torch.equal(res.confusion, expected)
        assert int(res.bins[0].sum()) == 23
    assert result.tta == "flip" and result.plain.plain is None
    # the mirror changed this model's logits, so the two results are not the same numbers
    assert not torch.allclose(mean, plain, atol=1e-4)
    assert result.loss_sum != pytest.approx(result.plain.loss_sum, rel=1e-6)
    # and the plain part is exactly what an evaluation without test-time augmentation gives
    none = evaluate(model, data, normalize, num_classes=4, label_smoothing=0.1)
    assert none.plain is None and none.tta == "none"
    assert (none.correct1, none.correct5) == (result.plain.correct1, result.plain.correct5)
    assert none.loss_sum == pytest.approx(result.plain.loss_sum, rel=1e-6)
    assert torch.equal(none.confusion, result.plain.confusion)


def test_a_mirror_symmetric_model_scores_the_same_with_and_without_flip() -> None:
    model = Mirrored(tiny_model(seed=2))
    data = batches(seed=3)
    flip = evaluate(model, data, normalize, num_classes=4, tta="flip")
    none = evaluate(model, data, normalize, num_classes=4, tta="none")
    assert (flip.n, flip.correct1, flip.correct5) == (none.n, none.correct1, none.correct5)
    assert flip.loss_sum == pytest.approx(none.loss_sum, rel=1e-6)
    assert torch.equal(flip.confusion, none.confusion)
    assert torch.allclose(flip.bins, none.bins, rtol=1e-6, atol=1e-9)


def test_unknown_tta_is_refused() -> None:
    with pytest.raises(ValueError, match="tta"):
        evaluate(tiny_model(), batches(), normalize, num_classes=4, tta="crops")
    with pytest.raises(ConfigError, match=r"tta='sideways': expected one of 'none', 'flip'"):
        load_config(None, None, ["tta=sideways"])


@pytest.fixture(scope="module")
def tta_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    splits = synthetic_splits(size=16, train_per_class=12, val_per_class=6, seed=4)
    out = {}
    for name, (images, labels) in splits.items():
        keep = np.isin(labels, KEEP)
        out[name] = (images[keep], np.searchsorted(KEEP, labels[keep]))
    cache = write_cache(
        tmp_path_factory.mktemp("data") / "c", out, class_ids=[f"c{k}" for k in KEEP],
        class_names=[CLASS_NAMES[k] for k in KEEP], source="tta test set",
    )  # fmt: skip
    cfg = load_config(None, None, [
        f"data.source={cache}", "model.preset=nano", "model.embed_dim=16", "model.depths=[1, 1]",
        "model.num_heads=[1, 2]", "model.window_size=4", "augment.preset=none", "batch_size=16",
        "eval_batch_size=10", "schedule.epochs=2", "schedule.warmup_epochs=0", "optim.lr=3e-3",
        "optim.lr_base_batch=16", "ema.enabled=true", "ema.decay=0.5", "tta=flip", "seed=0",
    ])  # fmt: skip
    run_dir = tmp_path_factory.mktemp("runs") / "tta"
    summary = train(cfg, run_dir, progress=False, log=lambda _m: None)
    return run_dir, summary


def test_the_summary_holds_top1_and_top5_with_and_without_flip(tta_run) -> None:
    run_dir, _ = tta_run
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["tta"] == "flip"
    flip = evaluate_checkpoint(run_dir / "last.pt", log=lambda _m: None)  # the run's own tta: flip
    none = evaluate_checkpoint(run_dir / "last.pt", tta="none", log=lambda _m: None)
    assert flip["tta"] == "flip" and none["tta"] == "none" and none["n"] == flip["n"] == 24
    assert on_disk["val_top1"] == flip["top1"] and on_disk["val_top5"] == flip["top5"]
    assert on_disk["val_top1_no_tta"] == none["top1"] == flip["top1_no_tta"]
    assert on_disk["val_top5_no_tta"] == none["top5"] == flip["top5_no_tta"]
    ema_flip = evaluate_checkpoint(run_dir / "last.pt", ema=True, log=lambda _m: None)
    assert on_disk["ema_val_top1"] == ema_flip["top1"]
    assert on_disk["ema_val_top1_no_tta"] == ema_flip["top1_no_tta"]
    assert on_disk["ema_val_top5_no_tta"] == ema_flip["top5_no_tta"]
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["val_top1_no_tta"] == on_disk["val_top1_no_tta"]


def test_cli_eval_tta_flip_prints_both(tta_run, capsys: pytest.CaptureFixture) -> None:
    run_dir, _ = tta_run
    assert cli.main(["eval", str(run_dir / "last.pt"), "--tta", "none", "--json"]) == 0
    none = json.loads(capsys.readouterr().out)
    assert cli.main(["eval", str(run_dir / "last.pt"), "--tta", "flip", "--json"]) == 0
    flip = json.loads(capsys.readouterr().out)
    assert none["tta"] == "none" and "top1_no_tta" not in none
    assert (
        flip["tta"] == "flip" and flip["top1_no_tta"] == none["top1"] and flip["loss_no_tta"] == none["loss"]
    )
    assert cli.main(["eval", str(run_dir / "last.pt"), "--tta", "flip"]) == 0
    text = capsys.readouterr().out
    assert f"top-1 {100 * none['top1']:.2f}%" in text.splitlines()[-1]
