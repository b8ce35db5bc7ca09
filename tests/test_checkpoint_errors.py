"""Mistakes with checkpoints get a message that says what to do, never torch's internals or random predictions."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from adtr_anomalib import ADTR, ADTRPlus
from adtr_anomalib.data import mvtec_layout_folder
from tests.helpers import make_folder, tiny_adtr, tiny_engine


@pytest.fixture(scope="module")
def part(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("part") / "part")


@pytest.fixture(scope="module")
def adtr_checkpoint(part: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    engine = tiny_engine(tmp_path_factory.mktemp("adtr"))
    engine.fit(tiny_adtr(), datamodule=mvtec_layout_folder(part, train_batch_size=4, eval_batch_size=4))
    return Path(engine.trainer.checkpoint_callback.best_model_path)


@pytest.fixture(scope="module")
def adtr_plus_checkpoint(part: Path, adtr_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ADTR+ trained from ``adtr_checkpoint``: the way the message for an ADTR checkpoint names works."""
    engine = tiny_engine(tmp_path_factory.mktemp("adtr_plus"))
    plus = tiny_adtr(model_class=ADTRPlus, adtr_checkpoint=str(adtr_checkpoint))
    engine.fit(plus, datamodule=mvtec_layout_folder(part, train_batch_size=4, eval_batch_size=4))
    assert bool(plus.adtr_checkpoint_loaded)
    return Path(engine.trainer.checkpoint_callback.best_model_path)


def _data(part: Path):
    return mvtec_layout_folder(part, train_batch_size=4, eval_batch_size=4)


def _scored(predictions: list) -> int:
    return sum(len(batch.pred_score) for batch in predictions)


def test_a_text_file_as_checkpoint_is_named_as_not_a_checkpoint(part: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("trained on line 3, 2026-11-30\n")
    with pytest.raises(ValueError, match=r"ckpt_path '.*notes\.txt' is not a checkpoint") as error:
        tiny_engine(tmp_path / "results").test(tiny_adtr(), datamodule=_data(part), ckpt_path=notes)
    assert "weights_only" not in str(error.value)  # not torch's unsafe advice


def test_a_real_checkpoint_still_loads(part: Path, adtr_checkpoint: Path, tmp_path: Path) -> None:
    engine = tiny_engine(tmp_path / "results")
    predictions = engine.predict(tiny_adtr(), datamodule=_data(part), ckpt_path=adtr_checkpoint)
    assert _scored(predictions) == 4  # the check lets real checkpoints through: every test image was scored


def test_adtr_checkpoint_given_to_adtr_plus_says_how_to_start_from_it(
    part: Path, adtr_checkpoint: Path, adtr_plus_checkpoint: Path, tmp_path: Path
) -> None:
    plus = tiny_adtr(model_class=ADTRPlus)
    with pytest.raises(ValueError, match=r"saved by ADTR, not ADTRPlus.*adtr_checkpoint") as error:
        tiny_engine(tmp_path / "results").test(plus, datamodule=_data(part), ckpt_path=adtr_checkpoint)
    assert str(adtr_checkpoint) in str(error.value)
    with pytest.raises(ValueError, match="saved by ADTR, not ADTRPlus"):
        ADTRPlus.load_from_checkpoint(adtr_checkpoint)
    # The way the message names works: the same file as adtr_checkpoint started an ADTR+ fit (the fixture).
    assert bool(ADTRPlus.load_from_checkpoint(adtr_plus_checkpoint).adtr_checkpoint_loaded)


def test_adtr_plus_checkpoint_given_to_adtr_says_to_load_it_as_adtr_plus(
    part: Path, adtr_plus_checkpoint: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"saved by ADTRPlus, not ADTR\..*ADTRPlus.load_from_checkpoint") as error:
        tiny_engine(tmp_path / "results").test(tiny_adtr(), datamodule=_data(part), ckpt_path=adtr_plus_checkpoint)
    assert str(adtr_plus_checkpoint) in str(error.value)
    with pytest.raises(ValueError, match=r"saved by ADTRPlus, not ADTR\..*ADTRPlus\.load_from_checkpoint"):
        ADTR.load_from_checkpoint(adtr_plus_checkpoint)
    # Both ways the message names work: loaded as ADTR+ it scores; its weights start a new ADTR.
    plus = ADTRPlus.load_from_checkpoint(adtr_plus_checkpoint)
    assert _scored(tiny_engine(tmp_path / "plus").predict(plus, datamodule=_data(part))) == 4
    adtr = tiny_adtr()
    adtr.load_network_weights(adtr_plus_checkpoint)
    trained = plus.model.state_dict()
    assert all(torch.equal(value, trained[key]) for key, value in adtr.model.state_dict().items())


@pytest.mark.parametrize("stage", ["test", "predict"])
def test_an_untrained_model_refuses_to_score(part: Path, tmp_path: Path, stage: str) -> None:
    engine = tiny_engine(tmp_path / "results")
    with pytest.raises(RuntimeError, match="has not been trained and no checkpoint was given"):
        getattr(engine, stage)(tiny_adtr(), datamodule=_data(part))


def test_random_weights_on_purpose_only_warn(part: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        predictions = tiny_engine(tmp_path / "results").predict(tiny_adtr(pre_trained=False), datamodule=_data(part))
    assert _scored(predictions) == 4
    assert "has not been trained" in caplog.text


def test_a_loaded_model_scores_without_ckpt_path(part: Path, adtr_checkpoint: Path, tmp_path: Path) -> None:
    model = ADTR.load_from_checkpoint(adtr_checkpoint)
    predictions = tiny_engine(tmp_path / "results").predict(model, datamodule=_data(part))
    assert _scored(predictions) == 4
