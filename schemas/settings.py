"""Settings loading shared by both daemons: a TOML file, then the environment.

Each process has one pydantic-settings class (edge_agent/config.py,
side_server/config.py); this helper gives them the same precedence
(environment over file over defaults) and the same error messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import tomllib
from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from schemas.errors import SidetuneError

S = TypeVar("S", bound=BaseSettings)


class ConfigError(SidetuneError):
    """A configuration file that is missing or does not validate."""


class FileThenEnv(BaseSettings):
    """Base: environment variables override the TOML file's values."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)


def load_settings(cls: type[S], path: str | Path | None, **overrides: Any) -> S:
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {p}: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    data.update(overrides)
    try:
        return cls(**data)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"invalid configuration{f' in {path}' if path else ''}:\n" + "\n".join(lines)) from None
