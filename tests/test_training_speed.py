"""The training-speed script skips emulated bf16 on CPUs without native bf16 unless asked (minutes per product)."""

from __future__ import annotations

import sys

import pytest
import torch

from benchmarks import training_speed


@pytest.mark.parametrize("emulated", [False, True])
def test_emulated_bf16_is_timed_only_on_request(
    emulated: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    peaks_measured: list[torch.dtype] = []
    steps_prepared: list[bool] = []

    def peak(dtype: torch.dtype) -> float:
        peaks_measured.append(dtype)
        return 100.0 if dtype == torch.float32 else 1.0

    def prepare(**settings: object) -> tuple[object, float]:
        steps_prepared.append(bool(settings["bf16"]))
        return (lambda: None), 2.0  # 2 GFLOP per image

    monkeypatch.setattr(training_speed, "native_bf16", lambda device: False)
    monkeypatch.setattr(training_speed, "matmul_peak", peak)
    monkeypatch.setattr(training_speed, "prepare", prepare)
    monkeypatch.setattr(training_speed, "fastest_interleaved", lambda steps, rounds: [0.5] * len(steps))
    monkeypatch.setattr(training_speed, "timed", lambda step: (None, 4.0))
    monkeypatch.setattr(sys, "argv", ["training_speed.py", *(["--emulated-bf16"] if emulated else [])])

    training_speed.main()

    assert (torch.bfloat16 in peaks_measured) is emulated
    assert any(steps_prepared) is emulated  # the "bf16 forced" row
    last = capsys.readouterr().out.strip().splitlines()[-1]
    # 16 images in 0.5 s at 2 GFLOP each: 64 GFLOP/s, 64% of the fp32 peak of 100.
    assert "32.0 img/s, 64.0 GFLOP/s, 64.0% of the fp32 matmul peak" in last
    assert ("6400.0% of the emulated bf16 peak" in last) is emulated


def test_compile_adds_the_recommended_recipe_under_torch_compile_as_a_row(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    prepared: list[dict[str, object]] = []
    monkeypatch.setattr(training_speed, "native_bf16", lambda device: True)
    monkeypatch.setattr(training_speed, "matmul_peak", lambda dtype: 100.0)
    monkeypatch.setattr(training_speed, "prepare", lambda **kwargs: prepared.append(kwargs) or ((lambda: None), 2.0))
    monkeypatch.setattr(training_speed, "fastest_interleaved", lambda steps, rounds: [0.5] * len(steps))
    monkeypatch.setattr(sys, "argv", ["training_speed.py", "--compile"])

    training_speed.main()

    [compiled] = [settings for settings in prepared if settings.get("compiled")]
    assert {k: v for k, v in compiled.items() if k != "compiled"} in prepared  # the same recipe, eager, beside it
    assert f"{training_speed.RECOMMENDED}, torch.compile" in capsys.readouterr().out
