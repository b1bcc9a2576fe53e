"""Settings loading shared by both daemons: a TOML file, then the environment.

Each process has one pydantic-settings class (edge_agent/config.py,
side_server/config.py); this helper gives them the same precedence
(environment over file over defaults) and the same error messages.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from schemas.errors import ConfigurationError
from schemas.toml import TOMLDecodeError
from schemas.toml import loads as toml_loads

S = TypeVar("S", bound=BaseSettings)


class ConfigError(ConfigurationError):
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
            data = toml_loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {p}: {e}") from None
        except TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    data.update(overrides)
    try:
        return cls(**data)
    except ValidationError as e:
        lines = [f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"invalid configuration{f' in {path}' if path else ''}: " + "; ".join(lines)) from None


#: The placeholder password the example configs once shipped; a config that holds it is refused.
EXAMPLE_PASSWORDS = frozenset({"change-me", "changeme", "CHANGE-ME"})


def read_secret(what: str, inline: str, path: Path | None, credential: str | None = None) -> str:
    """A password from, in order: systemd's credential ``credential`` (``LoadCredential=NAME:FILE``
    puts it in ``$CREDENTIALS_DIRECTORY``, so the file itself can stay readable by root only),
    then ``path`` (a file, e.g. ``password_file``), then ``inline`` (the TOML or the environment).
    Trailing newlines are dropped; an empty or example password is a configuration error."""
    source, value = "", inline
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if credential and cred_dir and (Path(cred_dir) / credential).is_file():
        source, path = f"systemd credential {credential}", Path(cred_dir) / credential
    elif path is not None:
        source = str(path)
    if path is not None:
        try:
            value = path.read_text(encoding="utf-8").rstrip("\r\n")
        except FileNotFoundError:
            raise ConfigError(f"{what}: password file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{what}: cannot read password file {path}: {e}") from None
    if not value:
        raise ConfigError(f"{what}: no password (set its *password_file*{' or the credential ' + credential if credential else ''})")
    if value in EXAMPLE_PASSWORDS:
        raise ConfigError(f"{what}: the password{' in ' + source if source else ''} is still the example "
                          f"{value!r}; provision a real one (`sidetune broker add-device`)")
    return value
