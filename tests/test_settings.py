"""Settings precedence (YAML < env < command line) and one-line errors."""
import pytest

from ama_stream.settings import AmaSettings, Section, SettingsError, load_settings, masked, parse_overrides


class Kafka(Section):
    bootstrap: str = "localhost:9092"
    password: str | None = None


class Limits(Section):
    max_batch: int = 64
    classes: list[str] = []


class Example(AmaSettings):
    kafka: Kafka = Kafka()
    limits: Limits = Limits()
    device: str = "auto"


def test_precedence_yaml_then_env_then_cli(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kafka: {bootstrap: 'yaml:1'}\nlimits: {max_batch: 8}\ndevice: cpu\n")
    assert load_settings(Example, cfg).limits.max_batch == 8
    monkeypatch.setenv("AMA_LIMITS__MAX_BATCH", "16")
    monkeypatch.setenv("AMA_DEVICE", "cuda:0")
    s = load_settings(Example, cfg)
    assert (s.kafka.bootstrap, s.limits.max_batch, s.device) == ("yaml:1", 16, "cuda:0")
    s = load_settings(Example, cfg, parse_overrides(["limits.max_batch=32", "limits.classes=[good]"]))
    assert (s.limits.max_batch, s.limits.classes, s.device) == (32, ["good"], "cuda:0")


def test_settings_are_frozen():
    s = load_settings(Example)
    with pytest.raises(Exception):
        s.device = "cpu"


@pytest.mark.parametrize(
    "yaml_text, match",
    [
        ("limits: {max_batsh: 3}\n", r"limits\.max_batsh: unknown key"),
        ("limits: {max_batch: many}\n", r"limits\.max_batch: .*integer.*'many'"),
        ("- a\n- b\n", "mapping"),
        ("kafka: {bootstrap: [unclosed\n", "not valid YAML at line"),
    ],
)
def test_bad_config_files_get_one_line_errors(tmp_path, yaml_text, match):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(SettingsError, match=match) as exc:
        load_settings(Example, cfg)
    assert "\n" not in str(exc.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(SettingsError, match="config file not found"):
        load_settings(Example, tmp_path / "nope.yaml")


def test_override_syntax_errors():
    with pytest.raises(SettingsError, match="dotted.key=value"):
        parse_overrides(["novalue"])
    with pytest.raises(SettingsError, match="dotted.key=value"):
        parse_overrides(["a..b=1"])
    with pytest.raises(SettingsError, match="sub-keys"):
        parse_overrides(["a=1", "a.b=2"])


def test_masking_of_secrets():
    data = {"kafka": {"bootstrap": "h:1", "sasl_plain_password": "hunter2", "ssl_password": None}}
    assert masked(data) == {"kafka": {"bootstrap": "h:1", "sasl_plain_password": "***", "ssl_password": None}}


def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    """A 'billion laughs' document is a few hundred bytes; expanded it would exhaust memory."""
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9))
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb)
    with pytest.raises(SettingsError, match=r"bomb.yaml is not valid YAML at line 2.*aliases .* are not accepted"):
        load_settings(Example, path)
    with pytest.raises(SettingsError, match="not valid YAML"):
        parse_overrides(["limits.classes=[*a]"])


def test_oversize_and_deeply_nested_configs_are_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("device: cpu\n" + "#" * (1 << 20))
    with pytest.raises(SettingsError, match="larger than"):
        load_settings(Example, big)
    deep = tmp_path / "deep.yaml"
    deep.write_text("device: " + "[" * 100_000 + "]" * 100_000)
    with pytest.raises(SettingsError, match="deep.yaml"):
        load_settings(Example, deep)


def test_a_misspelled_top_level_environment_variable_is_refused(monkeypatch):
    """AMA_GROUPID=x was ignored in silence while a misspelled nested key is refused; now both are."""
    monkeypatch.setenv("AMA_DEVCE", "cpu")
    with pytest.raises(SettingsError, match="AMA_DEVCE is not an ama-stream setting.*did you mean AMA_DEVICE"):
        load_settings(Example)
    monkeypatch.delenv("AMA_DEVCE")
    monkeypatch.setenv("AMA_TRAIN__EPOCHS", "5")  # another command's key: one shell may hold both
    monkeypatch.setenv("AMA_CACHE_DIR", "off")  # a tool switch
    assert load_settings(Example).device == "auto"


def test_the_known_keys_of_other_commands_match_their_models():
    from ama_stream.agent.settings import AgentSettings
    from ama_stream.settings import AGENT_KEYS, TRAIN_KEYS
    from training.config import TrainConfig

    assert TRAIN_KEYS == set(TrainConfig.model_fields) and AGENT_KEYS == set(AgentSettings.model_fields)
