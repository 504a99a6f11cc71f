"""Daemon configuration: TOML validated into typed dataclasses (DESIGN §8).

Every section is one dataclass; a field's ``metadata["doc"]`` is its description (the same text
as in ``config/default.toml``). Validation is strict, Frigate-style: an unknown key, a wrong type
or a bad value raises :class:`ConfigError` whose message names the key path, e.g.
``sources[1].socket: expected one of sub|pull|rep, got 'pub'``.

Secrets (CurveZMQ keys, the ``[http]`` token) may be written inline, or as ``"env:NAME"`` (read
from the environment) or ``"file:/path"`` (read from a file, e.g. a systemd credential), so that
keys never need to be in the config file itself.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "default.toml"
SYSTEM_CONFIG = Path("/etc/magdr-guard/config.toml")

VIDEO_EXTS = (".mp4", ".mkv", ".avi", ".mov", ".webm")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


class ConfigError(ValueError):
    """A configuration problem; the message starts with the key path."""


def doc(text: str, **kw: Any) -> dict[str, Any]:
    """Field metadata: description plus optional ``min``/``max`` bounds."""
    return {"doc": text, **kw}


@dataclass
class ModelConfig:
    """``[model]``: the generator being guarded and the guard's own models."""

    generator: str = field(default="default", metadata=doc("'default' or a checkpoint path"))
    kind: Literal["", "stargan", "ganimation", "cyclegan"] = field(
        default="", metadata=doc("checkpoint kind; '' sniffs it from the keys")
    )
    condition: dict[str, float] = field(
        default_factory=lambda: {"Blond_Hair": 1.0},
        metadata=doc("the edit applied to every face unless a message header says otherwise"),
    )
    device: str = field(default="auto", metadata=doc("auto | cpu | cuda | cuda:N"))
    parser: str = field(default="default", metadata=doc("'default' | 'landmarks' | path"))
    profile: str = field(default="default", metadata=doc("'default' or a profile JSON path"))
    purifier: str = field(
        default="auto",
        metadata=doc("'auto' (the shipped one, for the default generator) | 'none' | path"),
    )
    image_size: int = field(
        default=0, metadata=doc("face crop side; 0 = the generator's own image_size", min=0)
    )
    threads: int = field(
        default=0, metadata=doc("CPU threads for torch; 0 = torch's default", min=0)
    )


@dataclass
class GuardConfig:
    """``[guard]``: batching and what is pasted back."""

    enabled: bool = field(default=True, metadata=doc("false runs plain G (no detection)"))
    batch_size: int = field(default=8, metadata=doc("faces per guard call", min=1, max=1024))
    batch_timeout_ms: float = field(
        default=50.0, metadata=doc("a partial batch goes after this wait", min=0)
    )
    faces: Literal["detect", "frame"] = field(
        default="detect", metadata=doc("detect faces, or treat each frame as one aligned face")
    )
    max_faces: int = field(default=8, metadata=doc("faces guarded per frame", min=1))
    min_face: int = field(default=32, metadata=doc("smallest face side in pixels", min=1))
    detect_side: int = field(
        default=640, metadata=doc("frames are downscaled to this side for detection", min=64)
    )
    detect_every: int = field(
        default=1, metadata=doc("detect on every Nth frame of a stream, reuse boxes between",
                                min=1, max=100)
    )
    align: bool = field(
        default=True, metadata=doc("align faces on their eyes and mouth (dlib landmarks) as "
                                   "CelebA's are; false: the square around the Haar box")
    )
    temporal_k: int = field(
        default=0, metadata=doc("flag a face track when k of its last temporal_n frames score "
                                "above the threshold; 0 = every frame on its own", min=0)
    )
    temporal_n: int = field(
        default=0, metadata=doc("frames of a face track the temporal rule looks back on", min=0)
    )
    reuse_chains: bool = field(
        default=True, metadata=doc("try a face's Rec-Net chain of the stream's previous frame "
                                   "before searching a new one")
    )
    publish_purified: bool = field(
        default=False, metadata=doc("paste the cleaned input x* instead of the edit y*")
    )
    max_frame_pixels: int = field(
        default=4096 * 4096, metadata=doc("larger frames are rejected", min=1)
    )


@dataclass
class EngineConfig:
    """``[engine]``: where the guard runs: in this process, or on replicas in a Ray cluster."""

    backend: Literal["local", "ray"] = field(
        default="local", metadata=doc("local | ray (guard replicas on a Ray cluster)")
    )
    address: str = field(
        default="", metadata=doc("ray: '' starts a Ray instance on this machine; 'auto' joins "
                                 "a running cluster; 'HOST:PORT'; 'ray://HOST:10001'")
    )
    replicas: int = field(
        default=1, metadata=doc("guard workers; each loads G, the parser and the profile once",
                                min=1, max=1024)
    )
    num_gpus: float = field(
        default=0.0, metadata=doc("GPUs per replica; fractions share a GPU", min=0)
    )
    num_cpus: float = field(default=1.0, metadata=doc("CPUs per replica", min=0))
    max_inflight: int = field(
        default=2, metadata=doc("batches queued per replica (backpressure)", min=1, max=64)
    )


@dataclass
class FolderSourceConfig:
    """``[[sources]] kind = "folder"``: a watched inbox."""

    kind: Literal["folder"] = "folder"
    path: str = field(default="", metadata=doc("the inbox folder", required=True))
    work: str = field(default="", metadata=doc("claimed files; '' = <work_dir>/claimed/<i>"))
    failed: str = field(default="", metadata=doc("failed inputs; '' = failed/ beside the inbox"))
    polling: bool = field(default=False, metadata=doc("poll instead of inotify (NFS, SMB)"))
    stable_s: float = field(
        default=1.0, metadata=doc("with polling: size must be stable this long", min=0)
    )


@dataclass
class ZmqSourceConfig:
    """``[[sources]] kind = "zmq"``: frames from ZeroMQ (DESIGN §6)."""

    kind: Literal["zmq"] = "zmq"
    endpoint: str = field(default="", metadata=doc("e.g. tcp://127.0.0.1:5555", required=True))
    socket: Literal["sub", "pull", "rep"] = field(default="sub", metadata=doc("socket type"))
    bind: bool = field(default=False, metadata=doc("bind instead of connect"))
    protocol: Literal["magdr-v1", "imagezmq"] = field(default="magdr-v1", metadata=doc("format"))
    topic: str = field(default="frame.", metadata=doc("SUB prefix filter (magdr-v1)"))
    stream: str = field(default="", metadata=doc("imagezmq stream id; '' = the message text"))
    color: Literal["bgr", "rgb"] = field(
        default="bgr", metadata=doc("channel order of imagezmq arrays (OpenCV sends bgr)")
    )
    queue_size: int = field(default=32, metadata=doc("frames waiting for the guard", min=1))
    policy: Literal["", "drop-oldest", "drop-newest", "block"] = field(
        default="", metadata=doc("when the queue is full; '' = drop-oldest for sub, else block")
    )
    max_message_bytes: int = field(
        default=64 << 20, metadata=doc("ZMQ_MAXMSGSIZE; larger messages are refused", min=1)
    )
    hwm: int = field(default=100, metadata=doc("ZMQ_RCVHWM", min=0))
    curve_secret_key: str = field(default="", metadata=doc("own Z85 secret key", secret=True))
    curve_server_key: str = field(
        default="", metadata=doc("the server's Z85 public key (connecting side)", secret=True)
    )
    curve_client_keys: list[str] = field(
        default_factory=list,
        metadata=doc("binding side: Z85 public keys of the clients let in; [] = any client "
                     "that knows the server key"),
    )

    @property
    def effective_policy(self) -> str:
        """The configured policy, or the socket's natural one."""
        return self.policy or ("drop-oldest" if self.socket == "sub" else "block")


@dataclass
class FolderSinkConfig:
    """``[[sinks]] kind = "folder"``: cleaned videos and verdict files."""

    kind: Literal["folder"] = "folder"
    path: str = field(default="", metadata=doc("the outbox folder", required=True))
    codec: str = field(default="auto", metadata=doc("video codec; auto picks per container"))
    crf: int = field(default=18, metadata=doc("x264/vp9 quality (lower = better)", min=0, max=63))


@dataclass
class ZmqSinkConfig:
    """``[[sinks]] kind = "zmq"``: a PUB socket with verdict and clean-frame topics."""

    kind: Literal["zmq"] = "zmq"
    endpoint: str = field(default="", metadata=doc("e.g. tcp://127.0.0.1:5556", required=True))
    bind: bool = field(default=True, metadata=doc("bind (usual for PUB) or connect"))
    hwm: int = field(default=100, metadata=doc("ZMQ_SNDHWM; counted drops past it", min=0))
    frames: bool = field(default=True, metadata=doc("publish clean.<stream> frames too"))
    format: Literal["jpeg", "png", "rgb24"] = field(default="jpeg", metadata=doc("frame format"))
    jpeg_quality: int = field(default=90, metadata=doc("1-100", min=1, max=100))
    curve_secret_key: str = field(default="", metadata=doc("own Z85 secret key", secret=True))
    curve_server_key: str = field(default="", metadata=doc("server key (connecting)", secret=True))
    curve_client_keys: list[str] = field(
        default_factory=list, metadata=doc("binding side: subscribers' public keys let in")
    )


@dataclass
class LoggingConfig:
    """``[logging]``."""

    level: Literal["debug", "info", "warning", "error"] = field(default="info", metadata=doc(""))
    format: Literal["auto", "json", "console"] = field(
        default="auto", metadata=doc("auto: console on a TTY, JSON lines otherwise")
    )


@dataclass
class MetricsConfig:
    """``[metrics]``: deprecated; read as ``[http]`` (which now serves ``/metrics``)."""

    enabled: bool = field(default=False, metadata=doc("serve /metrics"))
    host: str = field(default="127.0.0.1", metadata=doc("listen address"))
    port: int = field(default=9464, metadata=doc("listen port; 0 = any", min=0, max=65535))


@dataclass
class HttpConfig:
    """``[http]``: the operator page, its JSON API and ``/metrics``."""

    enabled: bool = field(default=False, metadata=doc("serve /, /api/* and /metrics"))
    host: str = field(default="127.0.0.1", metadata=doc("listen address; any other than "
                                                        "loopback needs a token"))
    port: int = field(default=9464, metadata=doc("listen port; 0 = any", min=0, max=65535))
    token: str = field(default="", metadata=doc("bearer token; 'env:NAME' | 'file:/path'",
                                                secret=True))


@dataclass
class DaemonConfig:
    """``[daemon]``: state and supervision."""

    work_dir: str = field(default="/var/lib/magdr-guard", metadata=doc("state folder"))
    rescan_s: float = field(default=30.0, metadata=doc("inbox rescan period", min=0.1))
    watchdog: bool = field(default=True, metadata=doc("ping systemd's watchdog when progressing"))
    drain_timeout_s: float = field(default=30.0, metadata=doc("max drain time on stop", min=0))
    max_batch_s: float = field(
        default=600.0, metadata=doc("a guard call longer than this counts as a stall", min=1)
    )
    keep_inputs: bool = field(default=False, metadata=doc("move done inputs to <work_dir>/done"))


SourceConfig = FolderSourceConfig | ZmqSourceConfig
SinkConfig = FolderSinkConfig | ZmqSinkConfig


@dataclass
class Config:
    """The whole configuration file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sources: list[SourceConfig] = field(default_factory=list)
    sinks: list[SinkConfig] = field(default_factory=list)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    path: str = field(default="", metadata=doc("the file this came from", internal=True))
    deprecated: list[str] = field(
        default_factory=list, metadata=doc("lines for the log at start-up", internal=True))


_KINDS: dict[str, dict[str, type]] = {
    "sources": {"folder": FolderSourceConfig, "zmq": ZmqSourceConfig},
    "sinks": {"folder": FolderSinkConfig, "zmq": ZmqSinkConfig},
}


def _type_name(t: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}.get(
        t, getattr(t, "__name__", str(t))
    )


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            shown = "|".join(repr(c) if c == "" else str(c) for c in choices)
            raise ConfigError(f"{key}: expected one of {shown}, got {value!r}")
        return value
    if origin is dict:
        _, vt = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return {str(k): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (it,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected an array, got {value!r}")
        return [_convert(v, it, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    # TOML's bool is not an int here; an int is fine where a float is expected.
    ok = (
        isinstance(value, bool)
        if tp is bool
        else isinstance(value, tp) and not isinstance(value, bool)
        if tp is not float
        else isinstance(value, int | float) and not isinstance(value, bool)
    )
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


def _build(cls: type, table: Any, key: str) -> Any:
    """Build dataclass ``cls`` from a TOML table, rejecting unknown keys."""
    if not isinstance(table, dict):
        raise ConfigError(f"{key or 'config'}: expected a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    prefix = f"{key}." if key else ""
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(fields))})"
        )
    kw: dict[str, Any] = {}
    for name, f in fields.items():
        path = f"{prefix}{name}"
        if name not in table:
            if f.metadata.get("required"):
                raise ConfigError(f"{path}: required")
            continue
        tp = hints[name]
        if name in _KINDS:
            kw[name] = [_build_kind(name, v, f"{path}[{i}]") for i, v in enumerate(table[name])]
            continue
        value = _convert(table[name], tp, path)
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if lo is not None and value < lo or hi is not None and value > hi:
            raise ConfigError(f"{path}: expected a value in [{lo}, {hi or '∞'}], got {value!r}")
        if f.metadata.get("secret"):
            value = resolve_secret(value, path)
        kw[name] = value
    return cls(**kw)


def _build_kind(section: str, table: Any, key: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: expected a table, got {table!r}")
    kinds = _KINDS[section]
    kind = table.get("kind")
    if kind not in kinds:
        raise ConfigError(f"{key}.kind: expected one of {'|'.join(kinds)}, got {kind!r}")
    return _build(kinds[kind], table, key)


def resolve_secret(value: str, key: str) -> str:
    """Resolve ``env:NAME`` / ``file:PATH`` secret references; literal values pass through."""
    if value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise ConfigError(f"{key}: environment variable {name} is not set")
        return os.environ[name].strip()
    if value.startswith("file:"):
        try:
            return Path(value[5:]).read_text().strip()
        except OSError as e:
            raise ConfigError(f"{key}: cannot read {value[5:]}: {e.strerror}") from None
    return value


def _check_engine(e: EngineConfig) -> None:
    host, _, port = e.address.removeprefix("ray://").rpartition(":")
    if e.address not in ("", "auto") and not (host and port.isdigit()):
        raise ConfigError(f"engine.address: expected '', 'auto', HOST:PORT or ray://HOST:PORT, "
                          f"got {e.address!r}")
    if e.num_gpus > 1 and e.num_gpus != int(e.num_gpus):
        raise ConfigError(f"engine.num_gpus: a fraction shares one GPU; above 1 expected a whole "
                          f"number, got {e.num_gpus}")


def _check(cfg: Config) -> None:
    """Cross-field rules (the ones a single field cannot express)."""
    _check_engine(cfg.engine)
    g = cfg.guard
    if g.temporal_k > g.temporal_n or (g.temporal_n and not g.temporal_k):
        raise ConfigError(f"guard.temporal_k: expected 1 <= temporal_k <= temporal_n when "
                          f"temporal_n is set, got {g.temporal_k} of {g.temporal_n}")
    if g.temporal_k and cfg.engine.backend != "local":
        # tracks hear their faces' verdicts in frame order, in this process
        raise ConfigError("guard.temporal_k: the temporal rule needs [engine] backend = 'local'")
    folders_in = [i for i, s in enumerate(cfg.sources) if s.kind == "folder"]
    folder_sinks = [i for i, s in enumerate(cfg.sinks) if s.kind == "folder"]
    if len(folder_sinks) > 1:
        raise ConfigError(f"sinks[{folder_sinks[1]}]: at most one folder sink")
    if folders_in and not folder_sinks:
        raise ConfigError(f"sources[{folders_in[0]}]: a folder source needs a folder sink")
    for i, s in enumerate(cfg.sources + cfg.sinks):
        section = "sources" if i < len(cfg.sources) else "sinks"
        j = i if i < len(cfg.sources) else i - len(cfg.sources)
        if s.kind == "zmq":
            if "://" not in s.endpoint:
                raise ConfigError(f"{section}[{j}].endpoint: expected transport://address, "
                                  f"got {s.endpoint!r}")
            for name in ("curve_secret_key", "curve_server_key"):
                v = getattr(s, name)
                if v and len(v) != 40:
                    raise ConfigError(f"{section}[{j}].{name}: expected a 40-character Z85 key")
            bind = getattr(s, "bind", False)
            if s.curve_server_key and bind:
                raise ConfigError(f"{section}[{j}].curve_server_key: only for connecting sockets")
            if s.curve_server_key and not s.curve_secret_key:
                raise ConfigError(f"{section}[{j}].curve_secret_key: required with "
                                  "curve_server_key")
            for k, key in enumerate(s.curve_client_keys):
                if len(key) != 40:
                    raise ConfigError(f"{section}[{j}].curve_client_keys[{k}]: expected a "
                                      "40-character Z85 public key")
            if s.curve_client_keys and not (bind and s.curve_secret_key):
                raise ConfigError(f"{section}[{j}].curve_client_keys: only for a binding socket "
                                  "with curve_secret_key")
    outs = {s.path for s in cfg.sinks if s.kind == "folder"}
    for i, s in enumerate(cfg.sources):
        if s.kind == "folder" and s.path in outs:
            raise ConfigError(f"sources[{i}].path: the inbox cannot be the outbox")
    paths = [s.path for s in cfg.sources if s.kind == "folder"]
    if len(set(paths)) != len(paths):
        raise ConfigError("sources: two folder sources watch the same path")
    if cfg.http.enabled and not cfg.http.token and not is_loopback(cfg.http.host):
        raise ConfigError(f"http.token: required when http.host is not a loopback address "
                          f"(got {cfg.http.host!r}); 'env:NAME' or 'file:/path'")


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any address
        return False


def _read_deprecated(cfg: Config, table: dict[str, Any]) -> None:
    """``[metrics]`` moved under ``[http]``: read it as ``[http]`` and say so in the log."""
    if "metrics" not in table:
        return
    if "http" in table:
        raise ConfigError("metrics: deprecated and [http] is set; move its keys to [http]")
    m = cfg.metrics
    cfg.http = HttpConfig(enabled=m.enabled, host=m.host, port=m.port)
    cfg.deprecated.append("[metrics] is deprecated: its keys were read as [http], which serves "
                          "/metrics beside the operator page; rename the section")


def _resolve_paths(cfg: Config, base: Path) -> None:
    """Relative paths in a file are relative to the file's folder, as users expect."""

    def fix(p: str) -> str:
        return str((base / p).resolve()) if p and not Path(p).is_absolute() else p

    for name in ("generator", "parser", "profile", "purifier"):
        v = getattr(cfg.model, name)
        if "/" in v or v.endswith((".pt", ".pth", ".ckpt", ".json")):
            setattr(cfg.model, name, fix(v))
    cfg.daemon.work_dir = fix(cfg.daemon.work_dir)
    for s in cfg.sources:
        if s.kind == "folder":
            s.path, s.work, s.failed = fix(s.path), fix(s.work), fix(s.failed)
    for s in cfg.sinks:
        if s.kind == "folder":
            s.path = fix(s.path)


def parse_config(table: dict[str, Any], base: Path | None = None, path: str = "") -> Config:
    """Validate a parsed TOML table into :class:`Config`.

    Args:
        table: the TOML document as a dict.
        base: folder relative paths are taken from (the config file's folder).
        path: the file name, kept for reload and messages.

    Raises:
        ConfigError: naming the key path of the first problem.
    """
    cfg = _build(Config, table, "")
    _read_deprecated(cfg, table)
    _check(cfg)
    _resolve_paths(cfg, base or Path.cwd())
    cfg.path = path
    return cfg


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file.

    Raises:
        ConfigError: the file is missing, not TOML, or invalid; the message names the key path.
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return parse_config(table, p.resolve().parent, str(p))


def field_docs(cls: type) -> dict[str, str]:
    """``{key: description}`` of a section, for ``--help`` text and the default.toml test."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}
