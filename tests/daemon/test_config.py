from __future__ import annotations

import re
from pathlib import Path

import pytest

from daemon import config as C
from daemon.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


def _err(table: dict) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(table)
    return str(e.value)


class TestDefaultToml:
    def test_parses(self):
        cfg = load_config(ROOT / "config" / "default.toml")
        assert cfg.guard.enabled and cfg.model.generator == "default"
        assert cfg.sources[0].kind == "folder" and cfg.sinks[0].kind == "folder"

    def test_matches_model_defaults(self):
        cfg = load_config(ROOT / "config" / "default.toml")
        for section in ("model", "guard", "engine", "logging", "http", "daemon"):
            assert getattr(cfg, section) == getattr(C.Config(), section), section

    def test_every_key_documented(self):
        text = (ROOT / "config" / "default.toml").read_text()
        for cls in (
            C.ModelConfig,
            C.GuardConfig,
            C.FolderSourceConfig,
            C.ZmqSourceConfig,
            C.FolderSinkConfig,
            C.ZmqSinkConfig,
            C.LoggingConfig,
            C.HttpConfig,
            C.EngineConfig,
            C.DaemonConfig,
        ):
            for name in cls.model_fields:
                assert re.search(rf"^#? ?{name} = ", text, re.M), f"{cls.__name__}.{name}"


class TestErrors:
    def test_bad_socket_names_key_path(self):
        msg = _err(
            {
                "sources": [
                    {"kind": "folder", "path": "in"},
                    {"kind": "zmq", "endpoint": "tcp://127.0.0.1:1", "socket": "pub"},
                ],
                "sinks": [{"kind": "folder", "path": "out"}],
            }
        )
        assert msg == "sources[1].socket: expected one of sub|pull|rep, got 'pub'"

    def test_unknown_key(self):
        assert _err({"guard": {"batchsize": 4}}).startswith("guard.batchsize: unknown key")

    def test_unknown_section(self):
        assert _err({"gaurd": {}}).startswith("gaurd: unknown key")

    def test_wrong_type(self):
        assert (
            _err({"guard": {"batch_size": "8"}}) == "guard.batch_size: expected an integer, got '8'"
        )
        assert _err({"guard": {"enabled": 1}}) == "guard.enabled: expected a boolean, got 1"

    def test_range(self):
        assert _err({"guard": {"batch_size": 0}}).startswith("guard.batch_size: expected a value")

    @pytest.mark.parametrize("k, n", [(3, 2), (0, 3)])
    def test_temporal_rule_needs_k_of_n(self, k, n):
        msg = _err({"guard": {"temporal_k": k, "temporal_n": n}})
        assert msg.startswith("guard.temporal_k: expected 1 <= temporal_k <= temporal_n")

    def test_temporal_rule_is_local_only(self):
        msg = _err({"guard": {"temporal_k": 1, "temporal_n": 2}, "engine": {"backend": "ray"}})
        assert msg == "guard.temporal_k: the temporal rule needs [engine] backend = 'local'"

    def test_purifying_every_face_needs_a_purifier(self):
        msg = _err({"model": {"purify": "all", "purifier": "none"}})
        assert msg == "model.purify: 'all' needs a purifier, got purifier = 'none'"
        assert parse_config({"model": {"purify": "flagged", "purifier": "none"}}).model.purify

    def test_align_is_a_boolean(self):
        assert _err({"guard": {"align": "yes"}}) == "guard.align: expected a boolean, got 'yes'"

    def test_condition_values(self):
        assert (
            _err({"model": {"condition": {"Blond_Hair": "yes"}}})
            == "model.condition.Blond_Hair: expected a number, got 'yes'"
        )

    def test_missing_kind_and_required(self):
        assert _err({"sinks": [{"path": "x"}]}).startswith("sinks[0].kind: expected one of")
        assert _err({"sinks": [{"kind": "zmq"}]}) == "sinks[0].endpoint: required"

    def test_paths_through_lists_and_kinds(self):
        # pydantic's locations carry the chosen kind ('zmq'); the key path does not
        assert _err(
            {"sources": [{"kind": "zmq", "endpoint": "tcp://127.0.0.1:1", "zz": 1}]}
        ).startswith("sources[0].zz: unknown key (known: bind, color, curve_client_keys, ")
        assert _err({"sinks": 3}) == "sinks: expected an array, got 3"
        assert _err({"sinks": [3]}) == "sinks[0]: expected a table, got 3"
        assert (
            _err(
                {
                    "sinks": [
                        {"kind": "zmq", "endpoint": "tcp://127.0.0.1:1", "curve_client_keys": [1]}
                    ]
                }
            )
            == "sinks[0].curve_client_keys[0]: expected a string, got 1"
        )
        assert (
            _err({"daemon": {"rescan_s": 0}})
            == "daemon.rescan_s: expected a value in [0.1, ∞], got 0.0"
        )

    def test_internal_fields_are_not_keys(self):
        assert _err({"path": "x"}).startswith("path: unknown key (known: daemon, engine, ")
        assert "deprecated" not in _err({"deprecated": []}).partition("known:")[2]

    def test_field_docs(self):
        assert C.field_docs(C.GuardConfig)["batch_size"] == "faces per guard call"

    def test_folder_source_needs_folder_sink(self):
        assert "needs a folder sink" in _err({"sources": [{"kind": "folder", "path": "in"}]})

    def test_endpoint_shape(self):
        assert _err({"sinks": [{"kind": "zmq", "endpoint": "localhost:1"}]}).startswith(
            "sinks[0].endpoint: expected transport://address"
        )

    def test_engine(self):
        cfg = parse_config(
            {
                "engine": {
                    "backend": "ray",
                    "address": "ray://head:10001",
                    "replicas": 4,
                    "num_gpus": 0.25,
                }
            }
        )
        assert (cfg.engine.replicas, cfg.engine.num_gpus, cfg.engine.num_cpus) == (4, 0.25, 1.0)
        for ok in ("", "auto", "10.0.0.5:6379", "ray://head:10001"):
            assert parse_config({"engine": {"address": ok}}).engine.address == ok
        assert (
            _err({"engine": {"backend": "dask"}})
            == "engine.backend: expected one of local|ray, got 'dask'"
        )
        assert _err({"engine": {"address": "head"}}).startswith(
            "engine.address: expected '', 'auto', HOST:PORT or ray://HOST:PORT"
        )
        assert _err({"engine": {"replicas": 0}}).startswith("engine.replicas: expected a value")
        assert _err({"engine": {"num_gpus": 1.5}}).startswith("engine.num_gpus: a fraction")
        assert (
            _err({"engine": {"max_inflight": 2.0}})
            == "engine.max_inflight: expected an integer, got 2.0"
        )

    def test_file_errors(self, tmp_path):
        with pytest.raises(ConfigError, match="no such file"):
            load_config(tmp_path / "nope.toml")
        (tmp_path / "bad.toml").write_text("[model\n")
        with pytest.raises(ConfigError, match="not valid TOML"):
            load_config(tmp_path / "bad.toml")


class TestSecretsAndPaths:
    KEY = "JTKVSB%%)wK0E.X)V>+}o?pNmC{O&4W4b!Ni{Lh6"

    def _zmq(self, key: str) -> dict:
        return {
            "sinks": [{"kind": "zmq", "endpoint": "tcp://127.0.0.1:1", "curve_secret_key": key}]
        }

    def test_env_and_file(self, tmp_path, monkeypatch):
        monkeypatch.setenv("MAGDR_TEST_KEY", self.KEY)
        assert parse_config(self._zmq("env:MAGDR_TEST_KEY")).sinks[0].curve_secret_key == self.KEY
        (tmp_path / "k").write_text(self.KEY + "\n")
        assert (
            parse_config(self._zmq(f"file:{tmp_path / 'k'}")).sinks[0].curve_secret_key == self.KEY
        )

    def test_missing_env(self, monkeypatch):
        monkeypatch.delenv("MAGDR_NOPE", raising=False)
        assert (
            _err(self._zmq("env:MAGDR_NOPE"))
            == "sinks[0].curve_secret_key: environment variable MAGDR_NOPE is not set"
        )

    def test_unreadable_file(self, tmp_path):
        missing = tmp_path / "nope"
        assert _err(self._zmq(f"file:{missing}")) == (
            f"sinks[0].curve_secret_key: cannot read {missing}: No such file or directory"
        )

    def test_bad_key_length(self):
        assert "40-character Z85" in _err(self._zmq("short"))

    def test_relative_paths(self, tmp_path):
        (tmp_path / "c.toml").write_text(
            '[model]\ngenerator = "w/G.pt"\n[[sources]]\nkind = "folder"\npath = "in"\n'
            '[[sinks]]\nkind = "folder"\npath = "out"\n'
        )
        cfg = load_config(tmp_path / "c.toml")
        assert cfg.model.generator == str(tmp_path / "w" / "G.pt")
        assert cfg.sources[0].path == str(tmp_path / "in")


class TestHttp:
    def test_other_address_needs_token(self, monkeypatch):
        assert _err({"http": {"enabled": True, "host": "0.0.0.0"}}).startswith(
            "http.token: required when http.host is not a loopback address (got '0.0.0.0')"
        )
        monkeypatch.setenv("MAGDR_TEST_TOKEN", "s3cret\n")
        cfg = parse_config(
            {"http": {"enabled": True, "host": "0.0.0.0", "token": "env:MAGDR_TEST_TOKEN"}}
        )
        assert cfg.http.token == "s3cret"

    @pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
    def test_loopback_needs_none(self, host):
        assert parse_config({"http": {"enabled": True, "host": host}}).http.host == host

    def test_deprecated_metrics_read_as_http(self):
        cfg = parse_config({"metrics": {"enabled": True, "port": 0}})
        assert (cfg.http.enabled, cfg.http.host, cfg.http.port) == (True, "127.0.0.1", 0)
        assert cfg.deprecated and "[metrics] is deprecated" in cfg.deprecated[0]
        assert parse_config({"http": {"enabled": True}}).deprecated == []
        assert _err({"metrics": {}, "http": {}}).startswith("metrics: deprecated and [http]")
