"""Settings: built once from flags, `HUBD_*` environment variables and TOML files, then passed down.

Precedence (highest first): explicit keyword arguments (the CLI's flags), environment, the user's
`$XDG_CONFIG_HOME/hubd/config.toml` (default `~/.config/hubd/config.toml`), the machine's `/etc/hubd/hubd.toml`,
the embedded defaults. `HUBD_CONFIG` names one file that replaces both file layers. Every field has a default,
so `hubd` runs with no configuration at all; `hubd config` shows each effective setting and where it came from.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

from hubd_client.paths import default_cache_dir, default_socket
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings.exceptions import SettingsError

from hubd.errors import BadRequest

#: Hosts a download may be redirected to by default: the public hubs and the storage they redirect to.
DEFAULT_ALLOWED_HOSTS = (
    "tfhub.dev",
    "www.tfhub.dev",
    "kaggle.com",
    "www.kaggle.com",
    "storage.googleapis.com",
    "*.storage.googleapis.com",
    "*.googleusercontent.com",
)


#: The machine's configuration file, below the user's; the system unit names it with HUBD_CONFIG.
SYSTEM_CONFIG = Path("/etc/hubd/hubd.toml")

#: Variables read outside Settings (by the CLI, the server's logging or the client library), with their defaults.
OTHER_VARIABLES = {
    "HUBD_CONFIG": ("the user's and the machine's files", "One TOML file to read instead of both file layers."),
    "HUBD_LOG_LEVEL": ("info", "The daemon's log level (debug adds an access log); `serve --log-level`."),
    "HUBD_SYSTEM": (
        "off (on as root)",
        "1: be the machine's daemon though not root (/run/hubd/hubd.sock, all users).",
    ),
    "HUBD_SOCKET_OWNER": ("root, hubd and yourself", "Clients: one more user trusted to own the socket."),
    "HUBD_CLIENT_CONNECT_TIMEOUT": ("2", "Clients: seconds to connect to the daemon."),
    "HUBD_CLIENT_TIMEOUT": ("10", "Clients: seconds to the first byte of an answer."),
    "HUBD_CLIENT_IDLE_TIMEOUT": ("60", "Clients: seconds a progress stream may stay silent."),
    "HUBD_TFHUB": ("off", "1: `import tensorflow_hub` resolves and loads through hubd."),
}


def config_files(environ: Mapping[str, str] = os.environ, system: Path = SYSTEM_CONFIG) -> list[Path]:
    """The TOML files settings may come from, highest precedence first (a file that does not exist is skipped)."""
    named = environ.get("HUBD_CONFIG")
    if named:
        return [Path(named)]
    xdg = environ.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if Path(xdg).is_absolute() else Path.home() / ".config"  # XDG: a relative value is ignored
    return [base / "hubd" / "config.toml", system]


class Settings(BaseSettings):
    """Everything the engine needs to know, validated once."""

    model_config = SettingsConfigDict(env_prefix="HUBD_", extra="forbid", validate_default=True)
    system_config: ClassVar[Path] = SYSTEM_CONFIG

    cache_dir: Path = Field(default_factory=default_cache_dir, description="Root of the machine-wide cache.")
    offline: bool = Field(False, description="Serve only what is cached; never touch the network.")
    mirror: str | None = Field(
        None, description="A hosting-protocol server to fetch tfhub.dev and Kaggle handles from instead."
    )
    mirror_key_file: Path | None = Field(
        None, description="Shared key (same file on both hubds) a LAN mirror signs its archive sha256 claims with."
    )
    object_store: str | None = Field(
        None,
        description="s3://BUCKET/PREFIX shared by hubd hosts (AWS_* variables): looked in before upstream, "
        "uploaded to after a fetch; everything read from it is verified.",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_ALLOWED_HOSTS),
        description="Host patterns downloads may be redirected to (fnmatch syntax).",
    )
    http_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Hosts that may be reached over plain http (the mirror's always may)."
    )
    max_extract_bytes: int = Field(64 * 2**30, gt=0, description="Cap on the bytes one archive may unpack to.")
    max_members: int = Field(200_000, gt=0, description="Cap on the number of members in one archive.")
    connect_timeout: float = Field(15.0, gt=0)
    read_timeout: float = Field(60.0, gt=0, description="Seconds without a byte before a download is retried.")
    retries: int = Field(5, ge=0, description="Retries of a dropped or failed download.")
    backoff_base: float = Field(0.5, ge=0, description="First retry delay; doubles each time, with jitter.")
    min_rate: int = Field(
        4096, ge=0, description="Bytes/s a download must average over a window, or it fails (0: no minimum)."
    )
    min_rate_window: float = Field(30.0, gt=0, description="Seconds over which HUBD_MIN_RATE is averaged.")
    max_fetches: int = Field(8, ge=1, description="Downloads running at once; more wait their turn.")
    max_fetches_per_user: int = Field(4, ge=1, description="Downloads one uid may run at once; more wait.")
    fsync: bool = Field(True, description="fsync published files; off only for throwaway caches.")
    inflate_threads: str = Field(
        "auto",
        description="Threads inflating a download of 32 MiB or more: auto (every core up to 8, on 4 or more; "
        "else one), 0 (always stream on one), or N (spool, then rapidgzip on N).",
    )

    socket: Path = Field(default_factory=default_socket, description="Unix socket of the daemon's API.")
    url: str | None = Field(
        None, description="Reach the daemon over loopback TCP instead (http://127.0.0.1:PORT)."
    )
    listen: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Loopback TCP listeners, HOST:PORT (127.0.0.1, [::1] or localhost)."
    )
    admin_group: str | None = Field(None, description="Group whose members may delete, collect and pin.")
    trust_foreign_namespaces: bool = Field(
        False, description="Let root or admins in another user or PID namespace (a container) act as admins."
    )
    socket_group: str | None = Field(
        None, description="Group that may use the socket (0660); default hubd-users for the system daemon."
    )
    token_file: Path | None = Field(None, description="File holding the admin token for TCP requests.")
    manifests: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="Manifest files the daemon prefetches and watches."
    )
    watch_cache: bool = Field(True, description="Watch published entries and re-verify any that change.")
    max_watches: int = Field(
        8192, ge=1, description="inotify watches the cache watcher places at most; the scrub covers the rest."
    )
    scrub_interval: float = Field(
        60.0, gt=0, description="Seconds between two batches of the periodic scrub of unwatched entries."
    )
    max_size: int | None = Field(
        None, gt=0, description="Quota for published models (bytes, or '50G'); least recently used go first."
    )
    max_spool_bytes: int | None = Field(
        None,
        gt=0,
        description="Cap on resume spools in partial/ (bytes, or '2G'); default a tenth of the quota, or 8 GiB.",
    )
    gc_grace: float = Field(600.0, ge=0, description="Seconds an entry stays safe from eviction after a resolve.")
    tfhub_view: bool = Field(True, description="Keep tfhub_modules/ laid out like tensorflow_hub's cache.")
    mirror_listen: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Serve the TF Hub hosting protocol for cached models on HOST:PORT."
    )
    prefetch_concurrency: int = Field(
        4,
        ge=1,
        le=64,
        description="Models of one manifest fetched at once, at most; beyond the first only while a core is idle.",
    )
    max_connections: int = Field(512, ge=1, description="Open API connections at once; more are refused (503).")
    max_connections_per_user: int = Field(
        64, ge=1, description="Open API connections one uid may hold on the socket; more are refused (503)."
    )
    header_timeout: float = Field(
        10.0, gt=0, description="Seconds a client has to send a request's line and headers (and its body)."
    )
    idle_timeout: float = Field(30.0, gt=0, description="Seconds an idle keep-alive connection stays open.")
    stream_heartbeat: float = Field(
        5.0, gt=0, description="Seconds of silence after which a progress stream sends a blank keep-alive line."
    )

    @field_validator("mirror")
    @classmethod
    def _mirror_is_http(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        assert value is not None
        if not value.startswith(("http://", "https://")):
            raise ValueError("the mirror must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("object_store")
    @classmethod
    def _object_store_is_s3(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        assert value is not None
        if not value.startswith("s3://") or len(value) <= len("s3://") or value[5] == "/":
            raise ValueError("the object store must be s3://BUCKET/PREFIX")
        return value.rstrip("/")

    @field_validator("inflate_threads", mode="before")
    @classmethod
    def _threads_or_auto(cls, value: Any) -> str:
        text = str(value).strip().lower()
        if text != "auto" and not (text.isdigit() and int(text) <= 1024):
            raise ValueError("inflate_threads is auto, 0 (stream) or a number of threads")
        return text if text == "auto" else str(int(text))

    @field_validator("max_size", "max_extract_bytes", "min_rate", "max_spool_bytes", mode="before")
    @classmethod
    def _parse_size(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_size(value)
        return value

    @field_validator("allowed_hosts", "http_hosts", "listen", "manifests", "mirror_listen", mode="before")
    @classmethod
    def _split_comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        files = config_files(system=getattr(settings_cls, "system_config", SYSTEM_CONFIG))
        return (init_settings, env_settings, *(TomlConfigSettingsSource(settings_cls, toml_file=f) for f in files))


_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """'50G', '512M', '1.5T', '1000' (bytes); binary units, an optional 'iB'/'B' suffix."""
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (cleaned[:-1], cleaned[-1]) if cleaned and cleaned[-1] in _UNITS else (cleaned, "")
    try:
        return int(float(number) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 50G, 512M)") from None


def load_settings(**overrides: Any) -> Settings:
    """Build settings, dropping unset overrides, and turn validation errors into one readable error."""
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except tomllib.TOMLDecodeError as exc:
        where = next((str(f) for f in config_files() if _not_toml(f)), "a configuration file")
        raise BadRequest(f"{where} is not valid TOML: {exc}", f"fix or remove {where}") from None
    except SettingsError as exc:
        raise BadRequest(f"invalid configuration: {exc}", "check the HUBD_* variables") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
        )
        files = " and ".join(str(f) for f in config_files())
        raise BadRequest(
            f"invalid configuration: {problems}", f"check the flags, HUBD_* variables and {files}"
        ) from None


def _not_toml(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            tomllib.load(f)
    except tomllib.TOMLDecodeError:
        return True
    except OSError:
        return False
    return False


@dataclass(frozen=True)
class Effective:
    """One setting as `hubd config` shows it."""

    name: str
    env: str
    value: Any
    source: str
    """"flag", "env", the path of the TOML file it came from, or "default"."""


def effective(
    settings: Settings, flags: Mapping[str, Any], environ: Mapping[str, str] = os.environ
) -> list[Effective]:
    """Each field of `settings` with the layer that set it, in the order Settings reads them."""
    given = {key for key, value in flags.items() if value is not None}
    env_names = {key.upper() for key in environ}
    layers: list[tuple[str, dict[str, Any]]] = []
    for path in config_files(environ, type(settings).system_config):
        if path.is_file():
            with path.open("rb") as f:
                layers.append((str(path), tomllib.load(f)))
    out = []
    for name in Settings.model_fields:
        env = f"HUBD_{name.upper()}"
        if name in given:
            source = "flag"
        elif env in env_names:
            source = "env"
        else:
            source = next((path for path, data in layers if name in data), "default")
        out.append(Effective(name, env, getattr(settings, name), source))
    for env, (default, _) in OTHER_VARIABLES.items():
        set_to = next((value for key, value in environ.items() if key.upper() == env), None)
        out.append(
            Effective(env.removeprefix("HUBD_").lower(), env, set_to or default, "env" if set_to else "default")
        )
    return out
