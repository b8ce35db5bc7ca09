"""Paper Sec. 3.2 as an experiment: a 1x1 conv drifts toward the identity, the query-attention reconstructor not.

Both are trained on real (Lite0 ImageNet) features of normal texture images only. As the conv fits the normal
features it also reconstructs anomalous ones well: its error on defect tokens becomes small. The attention
reconstructor, starting from a learnable query, keeps a clearly larger error on them.

Measured here (brick, 128 px, 16x16 tokens): defect-token squared error ~1e3 for the conv after 1000 steps
versus ~1.3e4 for the attention model after 300. Note that the conv's anomalous/normal *ratio* is still high at
that point, because its normal error shrinks even faster: the shortcut shows in absolute error first.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torchvision.io import ImageReadMode, decode_image

from adtr_anomalib.models.adtr.torch_model import ADTRModel, ADTRReconstructor

SIZE = 128
STRIDE = 8  # 16 x 16 tokens at 128 px


def _load(paths: list[Path], mode: ImageReadMode = ImageReadMode.RGB) -> torch.Tensor:
    images = torch.stack([decode_image(str(p), mode=mode) for p in paths]).float() / 255
    return images


def _features(model: ADTRModel, folder: Path) -> torch.Tensor:
    images = _load(sorted(folder.glob("*.png")))
    return model.extract_features((images - 0.5) / 0.5)


def _defect_maps(model: ADTRModel, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every defect image, and which grid cells are at least half covered by its mask."""
    images, masks = [], []
    for defect in sorted(p.name for p in (root / "test").iterdir() if p.name != "good"):
        paths = sorted((root / "test" / defect).glob("*.png"))
        images.append(_load(paths))
        masks.append(_load([root / "ground_truth" / defect / f"{p.stem}_mask.png" for p in paths], ImageReadMode.GRAY))
    features = model.extract_features((torch.cat(images) - 0.5) / 0.5)
    return features, F.avg_pool2d(torch.cat(masks), STRIDE)[:, 0] > 0.5


def _train(reconstructor: nn.Module, features: torch.Tensor, steps: int, lr: float) -> nn.Module:
    optimizer = torch.optim.AdamW(reconstructor.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    reconstructor.train()
    for _ in range(steps):
        batch = features[torch.randint(len(features), (8,), generator=generator)]
        loss = (reconstructor(batch) - batch).pow(2).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return reconstructor.eval()


def _token_error(reconstructor: nn.Module, features: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (reconstructor(features) - features).pow(2).sum(1)


def test_query_attention_avoids_the_identity_shortcut(textures_root: Path) -> None:
    torch.manual_seed(0)
    backbone = ADTRModel("tf_efficientnet_lite0", input_size=(SIZE, SIZE), feature_stride=STRIDE).eval()
    train = _features(backbone, textures_root / "train" / "good")
    defects, defect_cells = _defect_maps(backbone, textures_root)
    assert defect_cells.sum() >= 20
    channels, grid = train.shape[1], train.shape[-1]
    # Both reconstructors see whole maps (attention is contextual); errors are then read at defect cells.
    conv = _train(nn.Conv2d(channels, channels, kernel_size=1), train, steps=1000, lr=1e-2)
    attention = _train(
        ADTRReconstructor(channels, grid * grid, hidden_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                          num_heads=4, ffn_dim=128, dropout=0.0),
        train,
        steps=300,
        lr=1e-3,
    )  # fmt: skip

    errors = {
        name: float(_token_error(m, defects)[defect_cells].mean())
        for name, m in [("conv", conv), ("attention", attention)]
    }
    energy = float(defects.pow(2).sum(1)[defect_cells].mean())
    # The conv reconstructs anomalous features to within a few percent of their energy: they become invisible.
    assert errors["conv"] < 0.1 * energy, (errors, energy)
    assert errors["attention"] > 5 * errors["conv"], errors
