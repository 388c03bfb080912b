"""The score registry: one list of OOD scores that validation, the report's table of
every score and the assessment all read."""

from __future__ import annotations

import pytest
import torch

from moonprune.assessment import ModelLogits, score_table
from moonprune.errors import ConfigError
from moonprune.reliability import SCORES, Score, ScoreRegistry
from moonprune.reliability.scores import check_score, compute_score, is_feature_score


def test_every_score_is_registered_with_what_it_reads() -> None:
    assert SCORES.names("logits") == ["msp", "energy", "max_logit", "unknown"]
    assert SCORES.names("features") == ["mahalanobis", "mahalanobis++", "knn"]
    assert SCORES.names() == SCORES.names("logits") + SCORES.names("features")
    assert is_feature_score("knn") and not is_feature_score("energy")
    assert set(SCORES.describe()) == set(SCORES.names())


def test_availability_follows_the_head_and_the_features() -> None:
    assert SCORES.available(has_unknown_head=False, has_features=False) == [
        "msp", "energy", "max_logit"
    ]  # fmt: skip
    assert "unknown" in SCORES.available(has_unknown_head=True, has_features=False)
    assert SCORES.available(True, True) == SCORES.names()


def test_unknown_names_get_a_hint() -> None:
    with pytest.raises(ConfigError, match="did you mean 'mahalanobis\\+\\+'"):
        check_score("mahalanobis+")


def test_registry_refuses_inconsistent_entries() -> None:
    registry = ScoreRegistry()
    fn = SCORES.get("msp").fn
    registry.register(Score("a", "first", "logits", fn))
    registry.register(Score("a", "first", "logits", fn))  # the same entry again is fine
    with pytest.raises(ConfigError, match="already registered"):
        registry.register(Score("a", "other", "logits", fn))
    with pytest.raises(ConfigError, match="needs fn"):
        registry.register(Score("b", "no function", "logits"))
    with pytest.raises(ConfigError, match="needs fn"):
        registry.register(Score("c", "feature with fn", "features", fn))


def test_a_registered_score_reaches_the_table_of_every_score(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def second_logit(logits: torch.Tensor, k: int, t: float) -> torch.Tensor:
        return logits[:, :k].sort(dim=-1).values[:, -2]

    monkeypatch.setitem(
        SCORES._scores, "second", Score("second", "2nd logit", "logits", second_logit)
    )
    torch.manual_seed(0)
    test, ood = torch.randn(20, 3), {"far": torch.randn(10, 3) + 1.0}
    logits = ModelLogits(test=test, val=test, ood=ood)
    table = score_table(logits, 3, 1.0, 0.95)
    assert set(table) == {"msp", "energy", "max_logit", "second"}  # no K+1 head: no unknown
    assert torch.equal(compute_score(test, 3, "second"), second_logit(test, 3, 1.0))
