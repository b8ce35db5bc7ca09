"""The training levers of the "fast" recipe: feature jitter, feature normalisation, warmup, clipping, the recipe."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import pytest
import torch
from anomalib.data.utils import ValSplitMode

from adtr_anomalib import ADTR, ADTRPlus
from adtr_anomalib.data import mvtec_layout_folder
from adtr_anomalib.models.adtr import lightning_base
from adtr_anomalib.models.adtr.components import FEATURE_STATISTICS, ADTRReconstructor
from adtr_anomalib.models.adtr.components.settings import DEFAULT_RECIPE, DEFAULT_STEPS, RECIPES
from adtr_anomalib.models.adtr.components.training import lr_scheduler
from adtr_anomalib.models.adtr.torch_model import ADTRModel
from tests.conftest import TINY
from tests.helpers import make_folder, tiny_adtr, tiny_engine, tiny_torch_model


def test_feature_jitter_scale_follows_the_token_norm() -> None:
    reconstructor = ADTRReconstructor(in_channels=64, num_tokens=4, feature_jitter=20.0, **TINY)
    tokens = torch.randn(8, 4096, 64) * torch.linspace(0.1, 10, 4096)[None, :, None]
    # Per token, the noise std is feature_jitter * ||token|| / C: channels last, and channels first as the
    # reconstructor's input (8, 64, 4096, 1).
    for features, dim in ((tokens, -1), (tokens[:, :, None, :].movedim(-1, 1).contiguous(), 1)):
        noise = reconstructor.add_jitter(features, dim=dim) - features
        per_token = (0, 2) if dim == -1 else (0, 1)
        ratio = noise.std(dim=per_token).flatten() / (20.0 * features.norm(dim=dim).mean(0).flatten() / 64)
        assert ratio.mean() == pytest.approx(1.0, abs=0.05)
        assert ratio.std() < 0.2


def test_feature_jitter_only_in_training() -> None:
    features = torch.randn(2, 48, 4, 4)
    jittered = ADTRReconstructor(in_channels=48, num_tokens=16, dropout=0.0, feature_jitter=20.0, **TINY)
    clean = ADTRReconstructor(in_channels=48, num_tokens=16, dropout=0.0, **TINY)
    clean.load_state_dict(jittered.state_dict())
    jittered.eval(), clean.eval()
    torch.testing.assert_close(jittered(features), clean(features))
    jittered.train(), clean.train()
    assert not torch.allclose(jittered(features), clean(features))


def _model(normalize: bool) -> ADTRModel:
    return tiny_torch_model(normalize_features=normalize)


def test_normalised_training_features_have_zero_mean_unit_std() -> None:
    model = _model(normalize=True)
    images = torch.rand(12, 3, 32, 32)
    raw = model.extract_features(images)
    assert model.needs_feature_statistics
    model.fit_feature_statistics(model.backbone_features(part) for part in images.split(5))  # batching must not matter
    assert not model.needs_feature_statistics
    normalised = model.extract_features(images)
    torch.testing.assert_close(normalised.mean(dim=(0, 2, 3)), torch.zeros(raw.shape[1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalised.std(dim=(0, 2, 3), correction=0), torch.ones(raw.shape[1]), atol=1e-3, rtol=0)
    expected = (raw - raw.mean(dim=(0, 2, 3), keepdim=True)) / raw.std(dim=(0, 2, 3), correction=0, keepdim=True)
    torch.testing.assert_close(normalised, expected, atol=1e-3, rtol=1e-3)


def test_feature_statistics_travel_with_the_state_dict() -> None:
    fitted = _model(normalize=True)
    fitted.fit_feature_statistics([fitted.backbone_features(torch.rand(4, 3, 32, 32))])
    restored = _model(normalize=False)  # the statistics, not the flag, decide what the network computes
    restored.load_state_dict(fitted.state_dict())
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(restored.extract_features(images), fitted.extract_features(images))
    assert not restored.needs_feature_statistics


def test_empty_training_set_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no images"):
        _model(normalize=True).fit_feature_statistics([])


def test_lr_schedule_warmup_cosine_and_step() -> None:
    def factors(schedule: str, total: int, warmup: int) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = lr_scheduler(optimizer, schedule, total, warmup)
        values = []
        for _ in range(total):
            values.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return values

    cosine = factors("cosine", total=200, warmup=100)
    assert cosine[:3] == pytest.approx([0.01, 0.02, 0.03])  # linear warmup
    assert cosine[99] == pytest.approx(1.0)
    assert cosine[100] == pytest.approx(1.0)  # the decay starts at the peak
    assert cosine[150] == pytest.approx(0.01 + 0.99 * 0.5)
    assert cosine[-1] == pytest.approx(0.01, abs=1e-3)
    assert all(a >= b for a, b in itertools.pairwise(cosine[100:]))
    short = factors("cosine", total=40, warmup=100)  # capped at half of the run
    assert short[19] == pytest.approx(1.0)
    assert short[-1] < 0.05
    step = factors("step", total=100, warmup=0)
    assert step[79] == 1.0
    assert step[80] == pytest.approx(0.1)


def test_fast_recipe_sets_only_what_was_left_at_the_default() -> None:
    model = ADTR(backbone="tf_efficientnet_lite0", recipe="fast", lr=5e-4, pre_trained=False)
    assert model.settings.lr == 5e-4  # given explicitly: wins over the recipe
    for key, value in RECIPES["fast"].items():
        if key != "lr":
            assert getattr(model.settings, key) == value, key
    assert model.model.normalize_features
    assert model.model.reconstructor.feature_jitter == 20.0
    assert model.trainer_arguments["gradient_clip_val"] == 0.1
    paper = ADTR(backbone="tf_efficientnet_lite0", pre_trained=False)
    assert paper.settings.dropout == 0.1
    assert paper.trainer_arguments["gradient_clip_val"] is None
    assert model.model.map_layers == ["blocks.0", "blocks.1", "blocks.2", "blocks.4"]  # not the stride-32 stage
    plus = ADTRPlus(backbone="tf_efficientnet_lite0", recipe="fast", pre_trained=False)
    assert plus.model.normalize_features
    # Other layers: the recipe's map stages (named for the default layers) are not forced on them.
    own = ADTR(backbone="tf_efficientnet_lite0", layers=["blocks.1", "blocks.2"], recipe="fast", pre_trained=False)
    assert own.model.map_layers == ["blocks.1", "blocks.2"]


def _recipe_and_base(recipe: str, base: str) -> tuple[ADTR, ADTR]:
    """Lite0 ADTR with ``recipe`` and with the ``base`` recipe it extends, checked to share every setting of base."""
    derived, parent = (ADTR(backbone="tf_efficientnet_lite0", recipe=r, pre_trained=False) for r in (recipe, base))
    for key in RECIPES[base]:
        assert getattr(derived.settings, key) == getattr(parent.settings, key), key
    return derived, parent


def test_fast_stride8_recipe_is_fast_on_a_stride_8_map_with_as_many_tokens() -> None:
    fine, coarse = _recipe_and_base("fast_stride8", "fast")
    assert (fine.settings.feature_stride, fine.settings.patch_size) == (8, 2)
    assert (coarse.settings.feature_stride, coarse.settings.patch_size) == (16, 1)
    maps = {}
    for name, model in (("fine", fine), ("coarse", coarse)):
        model.eval()
        features = model.model.extract_features(torch.zeros(1, 3, 256, 256))
        maps[name] = features.shape[-2:]
        assert model.model.reconstructor.query_embed.shape[1] == 16 * 16  # the same number of tokens
    assert (maps["fine"], maps["coarse"]) == ((32, 32), (16, 16))


def test_fast_stride8_mlp_recipe_is_fast_stride8_without_attention() -> None:
    mlp, attention = _recipe_and_base("fast_stride8_mlp", "fast_stride8")
    assert (mlp.settings.reconstructor, attention.settings.reconstructor) == ("mlp", "transformer")
    layers = {type(module).__name__ for module in mlp.model.reconstructor.modules()}
    assert "Attention" not in layers
    assert not hasattr(mlp.model.reconstructor, "query_embed")
    assert "Attention" in {type(module).__name__ for module in attention.model.reconstructor.modules()}


def test_fast_stride8_local_recipe_is_fast_stride8_with_local_attention() -> None:
    local, plain = _recipe_and_base("fast_stride8_local", "fast_stride8")
    assert (local.settings.attention_locality, plain.settings.attention_locality) == (1.0, 0.0)
    assert local.model.reconstructor.attention_locality == 1.0
    assert local.settings.reconstructor == "transformer"
    assert local.model.reconstructor.query_embed.shape[1] == 16 * 16  # still the learnable query
    chosen = ADTR(recipe="fast_stride8_local", attention_locality=0.5, pre_trained=False)
    assert chosen.settings.attention_locality == 0.5  # an argument the user sets wins over the recipe


def test_the_demo_offers_every_recipe() -> None:
    from adtr_anomalib.__main__ import RECIPE_NAMES

    assert sorted(RECIPE_NAMES) == sorted(RECIPES)


def test_the_demo_trains_the_recommended_recipe_for_the_recommended_steps() -> None:
    from adtr_anomalib.__main__ import DEMO_RECIPE, DEMO_STEPS

    assert (DEMO_RECIPE, DEMO_STEPS) == (DEFAULT_RECIPE, DEFAULT_STEPS)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"recipe": "fastest"}, "recipe must be one of"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"gradient_clip_val": -0.1}, "gradient_clip_val"),
        ({"gradient_clip_val": math.nan}, "gradient_clip_val"),
        ({"feature_jitter": -1.0}, "feature_jitter"),
        ({"feature_jitter": math.nan}, "feature_jitter"),
    ],
)
def test_bad_recipe_arguments_name_the_parameter(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ADTR(backbone="tf_efficientnet_lite0", pre_trained=False, **kwargs)


def test_training_fits_feature_statistics_once_and_checkpoints_them(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "part", n_train=6, size=48)  # larger than the model's 32 px: pre-processed first
    datamodule = mvtec_layout_folder(root, train_batch_size=4, eval_batch_size=4, seed=0)
    model = tiny_adtr(pre_trained=False, normalize_features=True, gradient_clip_val=0.1, warmup_steps=2)
    engine = tiny_engine(tmp_path / "results", max_epochs=1)
    engine.fit(model=model, datamodule=datamodule)
    assert bool(model.model.feature_statistics_fitted)
    assert engine.trainer.gradient_clip_val == 0.1
    mean = model.model.feature_mean.clone()
    assert mean.abs().sum() > 0
    ckpt = engine.trainer.checkpoint_callback.best_model_path
    restored = ADTR.load_from_checkpoint(ckpt)
    torch.testing.assert_close(restored.model.feature_mean, mean)
    # Trained further from the checkpoint: the statistics are kept, not fitted again on other images.
    model.model.fit_feature_statistics = None  # would raise if called
    engine = tiny_engine(tmp_path / "results", max_epochs=2)
    engine.fit(model=model, datamodule=datamodule, ckpt_path=ckpt)
    torch.testing.assert_close(model.model.feature_mean, mean)


def test_fitting_runs_the_backbone_once_per_training_image(tmp_path: Path) -> None:
    # Feature statistics, every epoch and the map statistics share the feature cache; validation images are extra.
    root = make_folder(tmp_path / "part", n_train=6, size=48)
    datamodule = mvtec_layout_folder(root, train_batch_size=4, eval_batch_size=4, seed=0)
    model = tiny_adtr(pre_trained=False, normalize_features=True, normalize_map=True)
    engine = tiny_engine(tmp_path / "results", max_epochs=2)
    seen: list[int] = []
    scoring: list[bool] = []
    backbone, validation_step = model.model.backbone_features, model.validation_step

    def counted(images: torch.Tensor) -> torch.Tensor:
        if not scoring:  # not scoring a validation image
            seen.append(len(images))
        return backbone(images)

    def scored(*args: object, **kwargs: object) -> object:
        scoring.append(True)
        try:
            return validation_step(*args, **kwargs)
        finally:
            scoring.pop()

    model.model.backbone_features, model.validation_step = counted, scored
    engine.fit(model=model, datamodule=datamodule)
    assert bool(model.model.feature_statistics_fitted)
    assert bool(model.model.map_statistics_fitted)
    assert sum(seen) == len(datamodule.train_data)
    # The map statistics came from standardised cached features: the same as from the images read anew.
    fresh = copy.deepcopy(model.model)
    fresh.fit_map_statistics(
        fresh.extract_features(model.pre_processor(batch.image)) for batch in datamodule.train_dataloader()
    )
    torch.testing.assert_close(fresh.map_mean, model.model.map_mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fresh.map_std, model.model.map_std, atol=1e-4, rtol=1e-4)


def test_checkpoint_from_before_feature_statistics_loads_as_identity(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "part", n_train=4)
    model = tiny_adtr(pre_trained=False)
    engine = tiny_engine(tmp_path / "results")
    engine.fit(model=model, datamodule=mvtec_layout_folder(root, train_batch_size=4, eval_batch_size=4, seed=0))
    path = Path(engine.trainer.checkpoint_callback.best_model_path)
    checkpoint = torch.load(path, weights_only=False)
    for name in FEATURE_STATISTICS:
        del checkpoint["state_dict"][f"model.{name}"]
    saved = checkpoint["hyper_parameters"]
    saved.update(saved.pop("settings"))  # the flat arguments of earlier versions
    for key in ("feature_jitter", "normalize_features", "warmup_steps", "gradient_clip_val", "recipe", "patch_size"):
        saved.pop(key)
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    restored = ADTR.load_from_checkpoint(old)
    assert torch.equal(restored.model.feature_std, torch.ones_like(restored.model.feature_std))
    assert not bool(restored.model.feature_statistics_fitted)


def test_bf16_only_where_the_hardware_computes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_adtr(pre_trained=False)
    dtypes = []
    first_linear = model.model.reconstructor.encoder[0].ffn.net[0]  # the projections run as F.conv2d: no hook
    first_linear.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    features = torch.randn(2, *model.model.extract_features(torch.rand(1, 3, 32, 32)).shape[1:])
    monkeypatch.setattr(lightning_base, "native_bf16", lambda _device: False)
    model.reconstruct_for_training(features)
    monkeypatch.setattr(lightning_base, "native_bf16", lambda _device: True)
    model.reconstruct_for_training(features)
    model.settings.bf16 = False
    model.reconstruct_for_training(features)
    assert dtypes == [torch.float32, torch.bfloat16, torch.float32]


def test_synthetic_validation_keeps_test_images_out_of_normalisation(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "part", n_train=10)
    datamodule = mvtec_layout_folder(root, val_split_mode=ValSplitMode.SYNTHETIC, val_split_ratio=0.2, seed=0)
    datamodule.setup()
    test_paths = set(datamodule.test_data.samples.image_path)
    val_paths = set(datamodule.val_data.samples.image_path)
    assert not test_paths & val_paths
    assert len(datamodule.train_data) == 8
    assert set(datamodule.val_data.samples.label_index) == {0, 1}


def test_bf16_is_native_only_where_the_cpu_has_bf16_instructions(monkeypatch) -> None:
    """oneDNN reports bf16 on every AVX-512 CPU; without AVX-512 BF16 or AMX it emulates it, slower than float32."""
    from adtr_anomalib.models.adtr.components import training

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(training, "cpu_flags", lambda: frozenset({"avx512f", "avx512_vnni"}))
    assert not training.native_bf16(cpu)
    monkeypatch.setattr(training, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16", "amx_tile"}))
    assert training.native_bf16(cpu)
    monkeypatch.setattr(training, "cpu_flags", lambda: None)  # no /proc/cpuinfo: oneDNN's word
    assert training.native_bf16(cpu)
