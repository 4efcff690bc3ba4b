"""Server configuration: defaults < TOML < GRADMIX_* environment < flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from gradmix.server.config import ServerConfig, ServerConfigError, load_config


def test_defaults_match_the_documented_ports() -> None:
    config = load_config(["--insecure"], env={})
    assert config == ServerConfig(insecure=True)
    assert (config.host, config.port, config.metrics_port) == ("127.0.0.1", 50551, 9551)
    assert config.debounce_seconds == 0.05


def test_precedence_toml_then_env_then_flags(tmp_path: Path) -> None:
    toml = tmp_path / "server.toml"
    toml.write_text('store = "/data/toml"\nport = 1000\nmetrics_port = 2000\n'
                    'debounce_seconds = 0.5\n[policy]\nname = "surrogate"\ntemperature = 0.3\n')
    env = {"GRADMIX_PORT": "1001", "GRADMIX_METRICS_PORT": "2001", "GRADMIX_FLOOR": "0.02",
           "GRADMIX_INSECURE": "1"}
    config = load_config(["--config", str(toml), "--port", "1002"], env=env)
    assert config.store == "/data/toml"           # TOML over the default
    assert config.metrics_port == 2001             # env over TOML
    assert config.port == 1002                     # flag over env
    assert config.debounce_seconds == 0.5
    assert config.policy == "surrogate" and config.temperature == 0.3 and config.floor == 0.02
    assert config.policy_defaults() == {"policy": "surrogate", "temperature": 0.3, "floor": 0.02}


def test_config_file_from_the_environment(tmp_path: Path) -> None:
    toml = tmp_path / "s.toml"
    toml.write_text('host = "0.0.0.0"\n')
    assert load_config(["--insecure"], env={"GRADMIX_CONFIG": str(toml)}).host == "0.0.0.0"


@pytest.mark.parametrize(("argv", "env", "message"), [
    (["--port", "70000"], {}, "port"),
    (["--port", "http"], {}, "port must be int"),
    ([], {"GRADMIX_DEBOUNCE_SECONDS": "-1"}, "debounce_seconds"),
    (["--policy", "best"], {}, "policy"),
    (["--log-level", "LOUD"], {}, "log_level"),
    (["--smoothing", "1.5"], {}, "smoothing"),
    ([], {"GRADMIX_TEMPERATURE": "-1"}, "temperature"),
    (["--insecure", "--stale-pending-anchors", "-1"], {}, "stale_pending_anchors"),
    (["--insecure"], {"GRADMIX_STALE_PENDING_SECONDS": "nan"}, "stale_pending_seconds"),
    (["--insecure", "--untrained-loss-fraction", "1.5"], {}, "untrained_loss_fraction"),
    (["--insecure", "--max-watchers", "0"], {}, "max_watchers"),
    (["--insecure", "--max-pending-calls", "9999"], {}, "max_pending_calls"),
    (["--insecure", "--max-watchers", "100", "--max-pending-calls", "2147483648"], {},
     "max_pending_calls"),
])
def test_bad_values_are_refused_with_the_setting_named(argv: list[str], env: dict[str, str],
                                                       message: str) -> None:
    with pytest.raises(ServerConfigError, match=message):
        load_config(argv, env=env)


def test_unknown_toml_keys_are_refused(tmp_path: Path) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text("prot = 1\n")
    with pytest.raises(ServerConfigError, match="prot"):
        load_config(["--config", str(toml)], env={})


def test_toml_booleans_set_boolean_settings(tmp_path: Path) -> None:
    toml = tmp_path / "server.toml"
    toml.write_text('insecure = true\n')
    assert load_config(["--config", str(toml)], env={}).insecure is True
    toml.write_text('[tls]\ncert = "c.pem"\nkey = "k.pem"\nmetrics = true\n[auth]\ntokens = "x"\n')
    config = load_config(["--config", str(toml)], env={})
    assert config.tls_metrics is True and not config.insecure
    toml.write_text('[tls]\ncert = "c.pem"\nkey = "k.pem"\nmetrics = 1\n')
    with pytest.raises(ServerConfigError, match="tls_metrics must be bool"):
        load_config(["--config", str(toml)], env={})


def test_stale_and_untrained_settings_load_and_default() -> None:
    config = load_config(["--insecure", "--stale-pending-anchors", "0"],
                         env={"GRADMIX_STALE_PENDING_SECONDS": "60",
                              "GRADMIX_UNTRAINED_LOSS_FRACTION": "0"})
    assert (config.stale_pending_anchors, config.stale_pending_seconds,
            config.untrained_loss_fraction) == (0, 60.0, 0.0)
    default = load_config(["--insecure"], env={})
    assert (default.stale_pending_anchors, default.stale_pending_seconds,
            default.untrained_loss_fraction) == (2, 21600.0, 0.9)
    assert default.stale_policy().halvings(3, 0.0) == 1
