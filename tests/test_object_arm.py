"""The identity-shortcut experiment's object arm: a bolt missing from a part photographed in a fixed pose.

A missing bolt leaves plain plate where the bolt belongs, so only a model that knows what belongs where finds it.
The arm is a fair test only if its two references behave so: rebuilding each token from its neighbours must miss the
missing bolts, and the training images' mean token at each position must find them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.identity_shortcut import (
    BOLTS,
    TokenSet,
    attention,
    make_part_dataset,
    neighbour_errors,
    position_errors,
    score,
    token_errors,
    token_set,
    train,
)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> TokenSet:
    return token_set(make_part_dataset(tmp_path_factory.mktemp("part"), n_train=16, n_test_good=4, n_test_missing=4))


def test_the_part_set_has_a_masked_missing_bolt_per_defect(tmp_path: Path) -> None:
    root = make_part_dataset(tmp_path, n_train=2, n_test_good=1, n_test_missing=3)
    assert len(list((root / "test" / "missing_bolt").glob("*.png"))) == 3
    assert len(list((root / "ground_truth" / "missing_bolt").glob("*_mask.png"))) == 3
    assert make_part_dataset(tmp_path, n_train=2, n_test_good=1, n_test_missing=3) == root  # reused, not rebuilt
    assert len(BOLTS) == 4


def test_a_neighbour_model_misses_the_missing_bolt_and_a_position_model_finds_it(tokens: TokenSet) -> None:
    neighbour = score(neighbour_errors(tokens.test), tokens)["token_AUROC"]
    position = score(position_errors(tokens), tokens)["token_AUROC"]
    energy = score(token_errors(None, tokens.test), tokens)["token_AUROC"]
    assert neighbour < 0.5  # the empty place looks like the plate around it: scored below normal tokens
    assert position > 0.95
    assert energy < 0.5  # and a missing bolt has less feature energy than a present one: no help either


@pytest.mark.slow
def test_adtr_s_query_attention_learns_where_the_bolts_belong(tokens: TokenSet) -> None:
    """Trained on the good parts, ADTR's reconstructor (learnable query) finds the missing bolts; the same model
    untrained (the control) does not."""
    torch.manual_seed(0)
    model = attention(tokens.train.shape[1], tokens.train.shape[-2:].numel())
    untrained = score(token_errors(model.eval(), tokens.test), tokens)["token_AUROC"]
    train(model, tokens.train, steps=150, lr=3e-3, seed=0)
    trained = score(token_errors(model, tokens.test), tokens)["token_AUROC"]
    assert untrained < 0.5
    assert trained > 0.95
