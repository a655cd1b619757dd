"""docs/configuration.md is generated from the settings models: current, and no key without a meaning."""
from pathlib import Path

from ama_stream.agent.settings import AgentSettings
from training.config import TrainConfig
from training.configdoc import field_comments, render, rows

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_configuration_reference_is_up_to_date():
    assert DOC.read_text() == render(), "run: python -m training.configdoc > docs/configuration.md"


def test_every_key_has_a_default_and_a_meaning():
    for model in (TrainConfig, AgentSettings):
        table = rows(model)
        assert len(table) > 30
        missing = [key for key, _kind, _default, meaning in table if not meaning.strip()]
        assert not missing, f"keys without a comment in their settings class: {missing}"
    keys = {key for key, *_ in rows(TrainConfig)}
    assert {"data.image_size", "data.test_fraction", "loss.negatives.radial", "loss.aux_bn", "model.gen_shortcut"} <= keys


def test_comments_above_and_beside_a_field_are_both_read():
    from training.config import NegativesSection, LossSection

    assert "radius law" in field_comments(NegativesSection)["radial"]
    assert "running" in field_comments(LossSection)["aux_bn"] and "batch" in field_comments(LossSection)["aux_bn"]
