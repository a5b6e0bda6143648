"""The relay's configuration: one TOML file, validated once into frozen models.

- :mod:`relay.config.models`: the sections and their checks (unknown keys are errors);
- :mod:`relay.config.values`: the value types — durations, secrets, listen addresses;
- :mod:`relay.config.load`: reading the file, the ``CHERT_RELAY__<SECTION>__<KEY>``
  environment overrides, and one :class:`~relay.errors.ConfigError` listing every
  problem with its key path.

The models and the loader are imported from here (``from relay.config import Config,
load_config``); the value types from :mod:`relay.config.values`.
"""

from relay.config.load import (
    DEFAULT_CONFIG_PATHS,
    ENV_PREFIX,
    config_path,
    load_config,
    parse_config,
)
from relay.config.models import (
    MIN_TOKEN_CHARS,
    AdminConfig,
    AdminTokenConfig,
    ApiConfig,
    Config,
    EventLogConfig,
    PollConfig,
    RedisConfig,
    RelaySection,
    ServerConfig,
    TelemetryConfig,
    TenantConfig,
    WorkerConfig,
)
from relay.config.sinks import SinkConfig

__all__ = [
    "DEFAULT_CONFIG_PATHS",
    "ENV_PREFIX",
    "MIN_TOKEN_CHARS",
    "AdminConfig",
    "AdminTokenConfig",
    "ApiConfig",
    "Config",
    "EventLogConfig",
    "PollConfig",
    "RedisConfig",
    "RelaySection",
    "ServerConfig",
    "SinkConfig",
    "TelemetryConfig",
    "TenantConfig",
    "WorkerConfig",
    "config_path",
    "load_config",
    "parse_config",
]
