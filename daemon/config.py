"""Daemon configuration: TOML validated into typed pydantic models (DESIGN §8).

Every section is one strict pydantic model; a field's ``description`` is its documentation (the
same text as in ``config/default.toml``). Validation is strict, Frigate-style: an unknown key, a
wrong type (``"8"`` is not an integer, ``1`` not a boolean) or a bad value raises
:class:`ConfigError` whose message names the key path, e.g.
``sources[1].socket: expected one of sub|pull|rep, got 'pub'``.

Secrets (CurveZMQ keys, the ``[http]`` token) may be written inline, or as ``"env:NAME"`` (read
from the environment) or ``"file:/path"`` (read from a file, e.g. a systemd credential), so that
keys never need to be in the config file itself.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "default.toml"
SYSTEM_CONFIG = Path("/etc/magdr-guard/config.toml")

VIDEO_EXTS = (".mp4", ".mkv", ".avi", ".mov", ".webm")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


class ConfigError(ValueError):
    """A configuration problem; the message starts with the key path."""


def resolve_secret(value: str) -> str:
    """Resolve ``env:NAME`` / ``file:PATH`` secret references; literal values pass through.

    Raises:
        ValueError: the variable is not set or the file cannot be read (pydantic reports it
            under the field's key path).
    """
    if value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set")
        return os.environ[name].strip()
    if value.startswith("file:"):
        try:
            return Path(value[5:]).read_text().strip()
        except OSError as e:
            raise ValueError(f"cannot read {value[5:]}: {e.strerror}") from None
    return value


Secret = Annotated[str, AfterValidator(resolve_secret)]


class Section(BaseModel):
    """A config section: unknown keys and loose types (``"8"`` for 8, ``1`` for true) refused.

    Assignment is not validated: the CLI and tests set fields of a loaded config directly.
    """

    model_config = ConfigDict(extra="forbid", strict=True)


class ModelConfig(Section):
    """``[model]``: the generator being guarded and the guard's own models."""

    generator: str = Field("default", description="'default' or a checkpoint path")
    kind: Literal["", "stargan", "ganimation", "cyclegan"] = Field(
        "", description="checkpoint kind; '' sniffs it from the keys"
    )
    condition: dict[str, float] = Field(
        default_factory=lambda: {"Blond_Hair": 1.0},
        description="the edit applied to every face unless a message header says otherwise",
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="G and the parser's arithmetic while guarding; auto = bfloat16 "
        "where the device runs it natively (AVX-512 BF16 / AMX CPUs, CUDA)",
    )
    parser: str = Field("default", description="'default' | 'landmarks' | path")
    profile: str = Field("default", description="'default' or a profile JSON path")
    purifier: str = Field(
        "auto", description="'auto' (the shipped one, for the default generator) | 'none' | path"
    )
    purify: Literal["flagged", "all"] = Field(
        "flagged",
        description="faces the purifier cleans: the flagged ones, or every face (an attacker "
        "must then beat P itself; a pass of P and G more per face that passes)",
    )
    image_size: int = Field(
        0, ge=0, description="face crop side; 0 = the generator's own image_size"
    )
    threads: int = Field(0, ge=0, description="CPU threads for torch; 0 = torch's default")


class GuardConfig(Section):
    """``[guard]``: batching and what is pasted back."""

    enabled: bool = Field(True, description="false runs plain G (no detection)")
    batch_size: int = Field(16, ge=1, le=1024, description="faces per guard call")
    batch_timeout_ms: float = Field(50.0, ge=0, description="a partial batch goes after this wait")
    faces: Literal["detect", "frame"] = Field(
        "detect", description="detect faces, or treat each frame as one aligned face"
    )
    max_faces: int = Field(8, ge=1, description="faces guarded per frame")
    min_face: int = Field(32, ge=1, description="smallest face side in pixels")
    detector: Literal["yunet", "haar"] = Field(
        "yunet",
        description="face detector: yunet (boxes + 5 landmarks, shipped) | haar "
        "(OpenCV's cascade; landmarks from dlib)",
    )
    detect_side: int = Field(
        320, ge=64, description="frames are downscaled to this side for detection"
    )
    detect_every: int = Field(
        1,
        ge=1,
        le=100,
        description="detect on every Nth frame of a stream; in between, follow "
        "each face in a window around its last box",
    )
    smooth_landmarks: float = Field(
        0.0,
        ge=0,
        le=1,
        description="One Euro filter cut-off (cycles/frame) on a followed "
        "face's landmarks; 0 = off",
    )
    align: bool = Field(
        True,
        description="align faces on their eyes and mouth as CelebA's are (YuNet's "
        "landmarks, or dlib's behind Haar); false: the square around the box",
    )
    temporal_k: int = Field(
        0,
        ge=0,
        description="flag a face track when k of its last temporal_n frames score "
        "above the threshold; 0 = every frame on its own",
    )
    temporal_n: int = Field(
        0, ge=0, description="frames of a face track the temporal rule looks back on"
    )
    reuse_chains: bool = Field(
        True,
        description="try a face's Rec-Net chain of the stream's previous frame before "
        "searching a new one",
    )
    publish_purified: bool = Field(
        False, description="paste the cleaned input x* instead of the edit y*"
    )
    edit_lowpass: float = Field(
        1.5,
        ge=0,
        le=8,
        description="paste the input plus G's edit low-passed by a Gaussian of "
        "this σ (face pixels), which drops a small G's checkerboard; "
        "0 = G's own pixels",
    )
    paste_mask: Literal["region", "window", "square"] = Field(
        "region",
        description="region: add the edit inside the regions it targets (face "
        "parser) within a soft disc; window: the whole disc; square: "
        "the crop's pixels, square-feathered (before 2026-12)",
    )
    region_every: int = Field(
        5,
        ge=1,
        le=100,
        description="paste_mask = region: parse a stream's faces every Nth "
        "frame; in between each face reuses its last regions",
    )
    max_frame_pixels: int = Field(4096 * 4096, ge=1, description="larger frames are rejected")


#: The ``[guard]`` keys of what is pasted back into the frame: SIGHUP applies them live
#: (``Service.reload``) and every batch carries them to the Ray replicas (``RayEngine._send``).
PASTE_KEYS = ("publish_purified", "edit_lowpass")


class EngineConfig(Section):
    """``[engine]``: where the guard runs: in this process, or on replicas in a Ray cluster."""

    backend: Literal["local", "ray"] = Field(
        "local", description="local | ray (guard replicas on a Ray cluster)"
    )
    address: str = Field(
        "",
        description="ray: '' starts a Ray instance on this machine; 'auto' joins a running "
        "cluster; 'HOST:PORT'; 'ray://HOST:10001'",
    )
    replicas: int = Field(
        1,
        ge=1,
        le=1024,
        description="guard workers; each loads G, the parser and the profile once",
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; fractions share a GPU")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica")
    max_inflight: int = Field(
        2, ge=1, le=64, description="batches queued per replica (backpressure)"
    )


class FolderSourceConfig(Section):
    """``[[sources]] kind = "folder"``: a watched inbox."""

    kind: Literal["folder"] = "folder"
    path: str = Field(description="the inbox folder")
    work: str = Field("", description="claimed files; '' = <work_dir>/claimed/<i>")
    failed: str = Field("", description="failed inputs; '' = failed/ beside the inbox")
    polling: bool = Field(False, description="poll instead of inotify (NFS, SMB)")
    stable_s: float = Field(1.0, ge=0, description="with polling: size must be stable this long")


class ZmqSourceConfig(Section):
    """``[[sources]] kind = "zmq"``: frames from ZeroMQ (DESIGN §6)."""

    kind: Literal["zmq"] = "zmq"
    endpoint: str = Field(description="e.g. tcp://127.0.0.1:5555")
    socket: Literal["sub", "pull", "rep"] = Field("sub", description="socket type")
    bind: bool = Field(False, description="bind instead of connect")
    protocol: Literal["magdr-v1", "imagezmq"] = Field("magdr-v1", description="format")
    topic: str = Field("frame.", description="SUB prefix filter (magdr-v1)")
    stream: str = Field("", description="imagezmq stream id; '' = the message text")
    color: Literal["bgr", "rgb"] = Field(
        "bgr", description="channel order of imagezmq arrays (OpenCV sends bgr)"
    )
    queue_size: int = Field(32, ge=1, description="frames waiting for the guard")
    policy: Literal["", "drop-oldest", "drop-newest", "block"] = Field(
        "", description="when the queue is full; '' = drop-oldest for sub, else block"
    )
    max_message_bytes: int = Field(
        64 << 20, ge=1, description="ZMQ_MAXMSGSIZE; larger messages are refused"
    )
    hwm: int = Field(100, ge=0, description="ZMQ_RCVHWM")
    curve_secret_key: Secret = Field("", description="own Z85 secret key")
    curve_server_key: Secret = Field(
        "", description="the server's Z85 public key (connecting side)"
    )
    curve_client_keys: list[str] = Field(
        default_factory=list,
        description="binding side: Z85 public keys of the clients let in; [] = any client that "
        "knows the server key",
    )

    @property
    def effective_policy(self) -> str:
        """The configured policy, or the socket's natural one."""
        return self.policy or ("drop-oldest" if self.socket == "sub" else "block")


class FolderSinkConfig(Section):
    """``[[sinks]] kind = "folder"``: cleaned videos and verdict files."""

    kind: Literal["folder"] = "folder"
    path: str = Field(description="the outbox folder")
    codec: str = Field("auto", description="video codec; auto picks per container")
    crf: int = Field(18, ge=0, le=63, description="x264/vp9 quality (lower = better)")


class ZmqSinkConfig(Section):
    """``[[sinks]] kind = "zmq"``: a PUB socket with verdict and clean-frame topics."""

    kind: Literal["zmq"] = "zmq"
    endpoint: str = Field(description="e.g. tcp://127.0.0.1:5556")
    bind: bool = Field(True, description="bind (usual for PUB) or connect")
    hwm: int = Field(100, ge=0, description="ZMQ_SNDHWM; counted drops past it")
    frames: bool = Field(True, description="publish clean.<stream> frames too")
    format: Literal["jpeg", "png", "rgb24"] = Field("jpeg", description="frame format")
    jpeg_quality: int = Field(90, ge=1, le=100, description="1-100")
    curve_secret_key: Secret = Field("", description="own Z85 secret key")
    curve_server_key: Secret = Field("", description="server key (connecting)")
    curve_client_keys: list[str] = Field(
        default_factory=list, description="binding side: subscribers' public keys let in"
    )


class LoggingConfig(Section):
    """``[logging]``."""

    level: Literal["debug", "info", "warning", "error"] = Field("info", description="")
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console on a TTY, JSON lines otherwise"
    )


class MetricsConfig(Section):
    """``[metrics]``: deprecated; read as ``[http]`` (which now serves ``/metrics``)."""

    enabled: bool = Field(False, description="serve /metrics")
    host: str = Field("127.0.0.1", description="listen address")
    port: int = Field(9464, ge=0, le=65535, description="listen port; 0 = any")


class HttpConfig(Section):
    """``[http]``: the operator page, its JSON API and ``/metrics``."""

    enabled: bool = Field(False, description="serve /, /api/* and /metrics")
    host: str = Field(
        "127.0.0.1", description="listen address; any other than loopback needs a token"
    )
    port: int = Field(9464, ge=0, le=65535, description="listen port; 0 = any")
    token: Secret = Field("", description="bearer token; 'env:NAME' | 'file:/path'")


class DaemonConfig(Section):
    """``[daemon]``: state and supervision."""

    work_dir: str = Field("/var/lib/magdr-guard", description="state folder")
    rescan_s: float = Field(30.0, ge=0.1, description="inbox rescan period")
    watchdog: bool = Field(True, description="ping systemd's watchdog when progressing")
    drain_timeout_s: float = Field(30.0, ge=0, description="max drain time on stop")
    max_batch_s: float = Field(
        600.0, ge=1, description="a guard call longer than this counts as a stall"
    )
    keep_inputs: bool = Field(False, description="move done inputs to <work_dir>/done")


SourceConfig = Annotated[FolderSourceConfig | ZmqSourceConfig, Field(discriminator="kind")]
SinkConfig = Annotated[FolderSinkConfig | ZmqSinkConfig, Field(discriminator="kind")]

# Set by parse_config, never read from the file.
_INTERNAL = {"path", "deprecated"}


class Config(Section):
    """The whole configuration file."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sources: list[SourceConfig] = Field(default_factory=list)
    sinks: list[SinkConfig] = Field(default_factory=list)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    path: str = Field("", description="the file this came from")
    deprecated: list[str] = Field(default_factory=list, description="lines for the log at start-up")


_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "string_type": "a string",
    "list_type": "an array",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}


def _choices(values: tuple[Any, ...]) -> str:
    return "|".join(repr(v) if v == "" else str(v) for v in values)


def _unknown(key: str, section: type[BaseModel]) -> str:
    known = ", ".join(sorted(set(section.model_fields) - _INTERNAL))
    return f"{key}: unknown key (known: {known})"


def _message(err: Any) -> str:
    """One pydantic error as ``key.path: what was expected, got what``."""
    # Walk the location through the models: the key path, and the type, field and section at it.
    key, tp, info, owner = "", Config, None, Config
    for part in err["loc"]:
        if get_origin(tp) is Annotated:  # a discriminated list item
            tp = get_args(tp)[0]
        if isinstance(part, int):
            key, tp = f"{key}[{part}]", get_args(tp)[0]
        elif get_origin(tp) is dict:
            key, tp = f"{key}.{part}", get_args(tp)[1]
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            owner, info = tp, tp.model_fields.get(part)
            key, tp = f"{key}.{part}" if key else part, info and info.annotation
        else:  # pydantic names the chosen kind of a source or sink; the key path does not
            tp = {c.model_fields["kind"].default: c for c in get_args(tp)}[part]
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    kind, value = err["type"], err["input"]
    if kind.startswith("union_tag"):
        kinds = [c.model_fields["kind"].default for c in get_args(tp)]
        return f"{key}.kind: expected one of {_choices(kinds)}, got {value.get('kind')!r}"
    if kind == "missing":
        return f"{key}: required"
    if kind == "extra_forbidden":
        return _unknown(key, owner)
    if kind == "literal_error":
        return f"{key}: expected one of {_choices(get_args(tp))}, got {value!r}"
    if kind in _EXPECTED:
        return f"{key or 'config'}: expected {_EXPECTED[kind]}, got {value!r}"
    if kind in ("greater_than_equal", "less_than_equal"):
        lo = next((m.ge for m in info.metadata if hasattr(m, "ge")), None)
        hi = next((m.le for m in info.metadata if hasattr(m, "le")), None)
        value = float(value) if tp is float else value
        return f"{key}: expected a value in [{lo}, {hi or '∞'}], got {value!r}"
    if kind == "value_error":  # a secret that cannot be resolved
        return f"{key}: {err['ctx']['error']}"
    return f"{key}: {err['msg']}"


def _build(table: dict[str, Any]) -> Config:
    """Validate a TOML table into :class:`Config`; the first problem as a :class:`ConfigError`."""
    internal = sorted(_INTERNAL & set(table))
    if internal:  # set by parse_config, not keys of the file
        raise ConfigError(_unknown(internal[0], Config))
    try:
        return Config.model_validate(table)
    except ValidationError as e:
        # An unknown key is reported before a bad value, as a reader scans a table.
        errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
        raise ConfigError(_message(errors[0])) from None


def _check_engine(e: EngineConfig) -> None:
    host, _, port = e.address.removeprefix("ray://").rpartition(":")
    if e.address not in ("", "auto") and not (host and port.isdigit()):
        raise ConfigError(
            f"engine.address: expected '', 'auto', HOST:PORT or ray://HOST:PORT, got {e.address!r}"
        )
    if e.num_gpus > 1 and e.num_gpus != int(e.num_gpus):
        raise ConfigError(
            f"engine.num_gpus: a fraction shares one GPU; above 1 expected a whole "
            f"number, got {e.num_gpus}"
        )


def _check(cfg: Config) -> None:
    """Cross-field rules (the ones a single field cannot express)."""
    _check_engine(cfg.engine)
    g = cfg.guard
    if g.temporal_k > g.temporal_n or (g.temporal_n and not g.temporal_k):
        raise ConfigError(
            f"guard.temporal_k: expected 1 <= temporal_k <= temporal_n when "
            f"temporal_n is set, got {g.temporal_k} of {g.temporal_n}"
        )
    if g.temporal_k and cfg.engine.backend != "local":
        # tracks hear their faces' verdicts in frame order, in this process
        raise ConfigError("guard.temporal_k: the temporal rule needs [engine] backend = 'local'")
    if cfg.model.purify == "all" and cfg.model.purifier == "none":
        raise ConfigError("model.purify: 'all' needs a purifier, got purifier = 'none'")
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
                raise ConfigError(
                    f"{section}[{j}].endpoint: expected transport://address, got {s.endpoint!r}"
                )
            for name in ("curve_secret_key", "curve_server_key"):
                v = getattr(s, name)
                if v and len(v) != 40:
                    raise ConfigError(f"{section}[{j}].{name}: expected a 40-character Z85 key")
            bind = getattr(s, "bind", False)
            if s.curve_server_key and bind:
                raise ConfigError(f"{section}[{j}].curve_server_key: only for connecting sockets")
            if s.curve_server_key and not s.curve_secret_key:
                raise ConfigError(
                    f"{section}[{j}].curve_secret_key: required with curve_server_key"
                )
            for k, key in enumerate(s.curve_client_keys):
                if len(key) != 40:
                    raise ConfigError(
                        f"{section}[{j}].curve_client_keys[{k}]: expected a "
                        "40-character Z85 public key"
                    )
            if s.curve_client_keys and not (bind and s.curve_secret_key):
                raise ConfigError(
                    f"{section}[{j}].curve_client_keys: only for a binding socket "
                    "with curve_secret_key"
                )
    outs = {s.path for s in cfg.sinks if s.kind == "folder"}
    for i, s in enumerate(cfg.sources):
        if s.kind == "folder" and s.path in outs:
            raise ConfigError(f"sources[{i}].path: the inbox cannot be the outbox")
    paths = [s.path for s in cfg.sources if s.kind == "folder"]
    if len(set(paths)) != len(paths):
        raise ConfigError("sources: two folder sources watch the same path")
    if cfg.http.enabled and not cfg.http.token and not is_loopback(cfg.http.host):
        raise ConfigError(
            f"http.token: required when http.host is not a loopback address "
            f"(got {cfg.http.host!r}); 'env:NAME' or 'file:/path'"
        )


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
    cfg.deprecated.append(
        "[metrics] is deprecated: its keys were read as [http], which serves "
        "/metrics beside the operator page; rename the section"
    )


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
    cfg = _build(table)
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


def field_docs(cls: type[BaseModel]) -> dict[str, str]:
    """``{key: description}`` of a section, for ``--help`` text and the default.toml test."""
    return {name: f.description or "" for name, f in cls.model_fields.items()}
