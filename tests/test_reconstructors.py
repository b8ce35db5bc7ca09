"""The reconstructor: projections as convolutions, and the paper's Table 4 ablations as model options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from adtr_anomalib import ADTR, ADTRPlus
from adtr_anomalib.data import mvtec_layout_folder
from adtr_anomalib.models.adtr.components import LOCALITY_BIAS_FLOOR, RECONSTRUCTORS, ADTRReconstructor, attention_bias
from adtr_anomalib.models.adtr.components.transformer import Attention
from adtr_anomalib.models.adtr.torch_model import ADTRModel
from tests.conftest import TINY
from tests.helpers import make_folder, onnx_outputs, tiny_adtr, tiny_engine

SIZE = (64, 128)  # a 4x8 token grid at stride 16: the CNN's bottleneck halves it twice


def _reference(reconstructor: ADTRReconstructor, features: torch.Tensor) -> torch.Tensor:
    """The projections as the paper writes them: per-token Linear layers around pixel_unshuffle/pixel_shuffle."""
    batch, _, height, width = features.shape
    patch = reconstructor.patch_size
    tokens = reconstructor.input_proj(F.pixel_unshuffle(features, patch).flatten(2).transpose(1, 2))
    out = reconstructor.output_proj(reconstructor.mix(tokens, (height // patch, width // patch)))
    return F.pixel_shuffle(out.transpose(1, 2).reshape(batch, -1, height // patch, width // patch), patch)


@pytest.mark.parametrize("patch_size", [1, 2])
def test_projections_as_convolutions_equal_the_linear_layers(patch_size: int) -> None:
    reconstructor = ADTRReconstructor(24, 32 // patch_size**2, patch_size=patch_size, **TINY).eval()
    for layer in (reconstructor.input_proj, reconstructor.output_proj):
        nn.init.normal_(layer.bias)  # a per-position bias in the output: a wrongly tiled one shows
    features = torch.randn(2, 24, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(reconstructor(features), _reference(reconstructor, features), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", RECONSTRUCTORS)
def test_every_reconstructor_rebuilds_features_and_scores_images(kind: str) -> None:
    model = ADTRModel("tf_efficientnet_lite0", pre_trained=False, input_size=SIZE, reconstructor=kind, **TINY)
    model.train()
    features, reconstruction = model(torch.rand(2, 3, *SIZE))
    assert reconstruction.shape == features.shape == (2, 512, 4, 8)
    reconstruction.square().mean().backward()
    trained = [name for name, p in model.reconstructor.named_parameters() if p.grad is not None and p.grad.any()]
    assert "input_proj.weight" in trained
    assert "output_proj.weight" in trained
    out = model.eval()(torch.rand(2, 3, *SIZE))
    assert out.anomaly_map.shape == (2, 1, *SIZE)
    assert torch.isfinite(out.pred_score).all()


def test_ablations_remove_what_they_name() -> None:
    def built(kind: str) -> ADTRReconstructor:
        return ADTRModel(
            "tf_efficientnet_lite0", pre_trained=False, input_size=SIZE, reconstructor=kind, **TINY
        ).reconstructor

    def attention(module: nn.Module) -> int:
        return sum(isinstance(m, nn.MultiheadAttention) for m in module.modules())

    full, no_query, mlp, cnn = (built(kind) for kind in ("transformer", "no_query", "mlp", "cnn"))
    assert hasattr(full, "query_embed")
    assert attention(full) == attention(no_query) == 3  # encoder self, decoder self and cross
    assert not hasattr(no_query, "query_embed")
    assert attention(mlp) == attention(cnn) == 0
    assert not any(isinstance(m, nn.Conv2d) for m in mlp.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in cnn.modules()) == 2


def test_without_query_the_decoder_starts_from_the_encoder_output() -> None:
    reconstructor = ADTRReconstructor(24, 32, kind="no_query", **TINY).eval()
    seen = []
    reconstructor.decoder[0].register_forward_hook(lambda _module, inputs, _output: seen.append(inputs))
    tokens = torch.randn(2, 32, 32)
    with torch.no_grad():
        reconstructor.mix(tokens, (4, 8))
        memory = reconstructor.encoder[0](tokens, reconstructor.pos_embed)
    queries, decoder_memory, _pos, bias = seen[0]
    assert bias is None  # no attention bias unless asked for (the paper's attention)
    torch.testing.assert_close(queries, memory)
    torch.testing.assert_close(decoder_memory, memory)


@pytest.mark.parametrize("module", [ADTR, ADTRPlus])
def test_lightning_modules_build_and_restore_the_chosen_reconstructor(module: type) -> None:
    first = module(backbone="tf_efficientnet_lite0", pre_trained=False, reconstructor="cnn", **TINY)
    assert first.settings.reconstructor == "cnn"
    assert first.model.reconstructor.kind == "cnn"
    restored = module(**first.hparams)
    restored.load_state_dict(first.state_dict())  # strict: the same parameters
    other = module(backbone="tf_efficientnet_lite0", pre_trained=False, reconstructor="mlp", **TINY)
    with pytest.raises(RuntimeError, match="mixer"):
        other.load_state_dict(first.state_dict())


def _one_hot_readout(layer: Attention) -> Attention:
    """Make the values and the output projection of a 16-wide, 2-head layer the identity: with one-hot values, each
    head's output row is then its attention row."""
    with torch.no_grad():
        layer.in_proj_weight[32:] = torch.eye(16)
        layer.in_proj_bias.zero_()
        layer.out_proj.weight.copy_(torch.eye(16))
        layer.out_proj.bias.zero_()
    return layer


def _attention_rows(attention_dropout: str, dropout: float, *, training: bool) -> torch.Tensor:
    """The attention weights of a 2-head layer over 8 keys, read off its output: ``(batch, heads, queries, keys)``.

    Values and output projection are the identity and each key's value is its one-hot index (in each head's
    slice), so every head's output row is its attention row.
    """
    torch.manual_seed(0)
    layer = _one_hot_readout(Attention(16, 2, dropout, attention_dropout)).train(training)  # type: ignore[arg-type]
    queries = torch.randn(64, 5, 16)
    values = torch.eye(8).repeat(1, 2).expand(64, -1, -1)
    with torch.no_grad():
        out = layer(queries, torch.randn(64, 8, 16), values)
    return out.view(64, 5, 2, 8).transpose(1, 2)


def test_key_dropout_drops_whole_keys_per_image_and_head_and_only_in_training() -> None:
    rows = _attention_rows("keys", 0.5, training=True)
    dropped = rows == 0
    assert 0.3 < dropped.float().mean() < 0.7  # about half of the keys, at dropout 0.5
    assert (dropped == dropped[:, :, :1]).all()  # the same keys for every query of an image and head
    assert (dropped[:, 0] != dropped[:, 1]).any()  # drawn per head
    torch.testing.assert_close(rows.sum(-1), torch.ones(64, 2, 5))  # the softmax renormalises: no NaN, no rescale
    # Single weights dropped (the paper's, PyTorch's own): zeros differ between queries, kept weights are rescaled.
    weights = _attention_rows("weights", 0.5, training=True)
    assert ((weights == 0) != (weights == 0)[:, :, :1]).any()
    assert (weights.sum(-1) - 1).abs().max() > 0.1
    evaluated = _attention_rows("keys", 0.5, training=False)
    torch.testing.assert_close(evaluated, _attention_rows("weights", 0.5, training=False))


def test_key_dropout_trains_the_same_network() -> None:
    kwargs = {"in_channels": 24, "num_tokens": 32, **TINY, "dropout": 0.1}
    by_keys = ADTRReconstructor(attention_dropout="keys", **kwargs)
    by_weights = ADTRReconstructor(**kwargs)
    assert by_keys.state_dict().keys() == by_weights.state_dict().keys()  # checkpoints load either way
    by_keys.load_state_dict(by_weights.state_dict())
    features = torch.randn(2, 24, 4, 8)
    by_keys(features).square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in by_keys.parameters())
    with torch.no_grad():
        torch.testing.assert_close(by_keys.eval()(features), by_weights.eval()(features))


def test_float32_attention_is_multihead_attention_with_the_same_parameters() -> None:
    torch.manual_seed(0)
    layer = Attention(16, 2, 0.0, "keys").train()
    query, key, value = (torch.randn(3, n, 16, requires_grad=True) for n in (5, 7, 7))
    mask = torch.zeros(6, 5, 7)
    mask[::2, :, 3] = float("-inf")  # one key masked in every other image-and-head
    reference = nn.MultiheadAttention.forward(layer, query, key, value, attn_mask=mask, need_weights=False)[0]
    ours = layer.attend_in_float32(query, key, value, mask)
    torch.testing.assert_close(ours, reference)
    grads = torch.autograd.grad(ours.square().sum(), (query, key, value, layer.in_proj_weight))
    expected = torch.autograd.grad(reference.square().sum(), (query, key, value, layer.in_proj_weight))
    for grad, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, want)


@pytest.mark.parametrize(
    ("dropout", "attention_dropout", "float32_path"),
    [(0.0, "weights", True), (0.1, "keys", True), (0.1, "weights", False)],
)
def test_cpu_bf16_training_attends_in_float32_unless_weights_are_dropped(
    dropout: float, attention_dropout: str, float32_path: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under CPU bf16 autocast the attention runs in float32 (its fused backward is ~3x faster there); the paper's
    per-weight dropout needs PyTorch's own path."""
    torch.manual_seed(0)
    layer = Attention(16, 2, dropout, attention_dropout).train()  # type: ignore[arg-type]
    calls = []
    original = Attention.attend_in_float32
    monkeypatch.setattr(Attention, "attend_in_float32", lambda self, *a: calls.append(1) or original(self, *a))
    tokens = torch.randn(2, 6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(tokens, tokens, tokens)
    assert bool(calls) == float32_path
    if dropout == 0.0:  # deterministic: the bf16 result is the float32 one up to bf16 rounding
        with torch.no_grad():
            torch.testing.assert_close(out.float(), layer(tokens, tokens, tokens), atol=0.05, rtol=0.05)
    assert out.isfinite().all()
    layer.eval()
    calls.clear()
    with torch.no_grad():
        layer(tokens, tokens, tokens)  # no autocast: PyTorch's own path, as in inference and export
    assert not calls


def test_attention_bias_masks_the_neighbourhood_and_penalises_squared_distance() -> None:
    assert attention_bias((4, 5)) is None  # both off: the paper's attention, no mask at all
    bias = attention_bias((4, 5), neighbor_mask=3, locality=0.5)
    row = bias[7].view(4, 5)  # the query at grid position (1, 2)
    block = torch.zeros(4, 5, dtype=torch.bool)
    block[0:3, 1:4] = True
    assert torch.equal(row.isneginf(), block)
    assert row[3, 0] == -0.5 * (2**2 + 2**2)
    assert row[1, 4] == -0.5 * 2**2
    assert torch.equal(bias, bias.T)


def test_the_locality_penalty_saturates_where_float32_stops_seeing_it() -> None:
    bias = attention_bias((16, 16), locality=1.0)  # the recommended recipe's token grid
    grid = torch.arange(16)
    rows, columns = grid.repeat_interleave(16), grid.repeat(16)
    penalty = -((rows[:, None] - rows[None]).square() + (columns[:, None] - columns[None]).square()).double()
    assert bias.min() == LOCALITY_BIAS_FLOOR
    torch.testing.assert_close(bias.double(), penalty.clamp(min=LOCALITY_BIAS_FLOOR), rtol=0, atol=0)

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 8, 256, 32, dtype=torch.float64).unbind()
    saturated = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.double())
    torch.testing.assert_close(saturated, F.scaled_dot_product_attention(q, k, v, attn_mask=penalty))

    def subnormal_weights(mask: torch.Tensor) -> int:  # what made float32 attention several times slower on x86
        weights = (q.float() @ k.float().transpose(-1, -2) / 32**0.5 + mask.float()).softmax(dim=-1)
        return int(((weights > 0) & (weights < torch.finfo(torch.float32).tiny)).sum())

    assert subnormal_weights(bias) == 0
    assert subnormal_weights(penalty) > 0  # the unsaturated penalty does produce them


def _identity_attention(dropout: float) -> Attention:
    """A one-hot read-out layer (:func:`_one_hot_readout`) whose queries and keys are zero: its logits are the bias."""
    layer = _one_hot_readout(Attention(16, 2, dropout, "keys"))
    with torch.no_grad():
        layer.in_proj_weight[:32] = 0.0
    return layer


def test_biased_attention_follows_the_bias_and_never_sees_masked_keys() -> None:
    torch.manual_seed(0)
    bias = attention_bias((2, 4), neighbor_mask=1, locality=1.0)  # 8 tokens; each query's own key is masked
    tokens, values = torch.randn(64, 8, 16), torch.eye(8).repeat(1, 2).expand(64, -1, -1)
    expected = bias.softmax(dim=-1)[None, :, None].expand(64, 8, 2, 8)
    layer = _identity_attention(dropout=0.5).eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(tokens, tokens, values, bias).view(64, 8, 2, 8), expected)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the float32 attention path takes the same bias
            biased = _identity_attention(dropout=0.0)(tokens, tokens, values, bias)
        torch.testing.assert_close(biased.float().view(64, 8, 2, 8), expected, atol=0.02, rtol=0.02)
        rows = layer.train()(tokens, tokens, values, bias).view(64, 8, 2, 8)  # with whole keys dropped as well
    assert rows.isfinite().all()
    torch.testing.assert_close(rows.sum(-1), torch.ones(64, 8, 2))
    assert (rows.diagonal(dim1=1, dim2=3) == 0).all()  # a query never sees its own key, whatever was dropped
    assert ((rows == 0).sum(-1) > 1).any()  # keys were dropped beside the masked one


@pytest.mark.parametrize("kind", ["transformer", "no_query"])
def test_the_attention_bias_reaches_every_attention_layer(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reconstructor = ADTRReconstructor(24, 32, **TINY, kind=kind, neighbor_mask=3, attention_locality=1.0)  # type: ignore[arg-type]
    seen = []
    original = Attention.forward
    monkeypatch.setattr(Attention, "forward", lambda self, *a: seen.append(a[3]) or original(self, *a))
    reconstructor(torch.randn(2, 24, 4, 8))
    assert len(seen) == 3  # the encoder's self-attention, the decoder's self- and cross-attention
    for bias in seen:
        torch.testing.assert_close(bias, attention_bias((4, 8), 3, 1.0))


@pytest.mark.slow
def test_a_biased_model_exports_to_onnx_with_the_same_maps(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "part", n_train=4)
    model = tiny_adtr(pre_trained=False, neighbor_mask=3, attention_locality=1.0)
    assert (model.model.reconstructor.neighbor_mask, model.model.reconstructor.attention_locality) == (3, 1.0)
    tiny_engine(tmp_path / "results").fit(model, datamodule=mvtec_layout_folder(root, train_batch_size=4, seed=0))
    images = torch.rand(3, 3, 32, 32)
    outputs = onnx_outputs(model, tmp_path / "export", images)
    with torch.no_grad():
        expected = model.eval()(images)
        unbiased = tiny_adtr(pre_trained=False)
        unbiased.load_state_dict(model.state_dict())  # the same weights without the bias give other maps
        other = unbiased.eval()(images)
    np.testing.assert_allclose(outputs["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4, rtol=1e-4)
    assert not np.allclose(outputs["anomaly_map"], other.anomaly_map.numpy(), atol=1e-3)
