"""``http.front`` in the config, and the environment a Ray that vfm starts gets for it (``app.ray_start_env``)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from vfm.service.app import HAPROXY_ENV, HAPROXY_FILES, HAPROXY_PORTS, RAY_ENV, ray_env, ray_start_env
from vfm.service.config import ConfigError, parse_config


def _cfg(front: str | None = None):
    return parse_config({"models": {"tiny_cnn": {}}, **({"http": {"front": front}} if front else {})})


def test_the_front_is_a_checked_choice_defaulting_to_serves_proxy() -> None:
    assert _cfg().http.front == "ray"
    with pytest.raises(ConfigError) as info:
        _cfg("nginx")
    assert "http.front:" in str(info.value) and "'nginx'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_config({"http": {"frnt": "haproxy"}})
    assert "http.frnt: unknown key; did you mean front?" in str(info.value)


def test_the_python_proxy_needs_no_haproxy_setting_and_no_folder() -> None:
    assert ray_env(_cfg()) == RAY_ENV
    with ray_start_env(_cfg()) as folder:
        assert folder is None and not any(key in os.environ for key in HAPROXY_ENV)


def test_haproxy_gets_its_own_folder_and_free_ports_for_the_block_only(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (*HAPROXY_ENV, *HAPROXY_FILES, *HAPROXY_PORTS):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "1")   # a variable already set wins
    assert ray_env(_cfg("haproxy")) == {**RAY_ENV, **HAPROXY_ENV}
    with ray_start_env(_cfg("haproxy")) as folder:
        assert folder is not None and Path(folder).is_dir() and Path(folder).name.startswith("vfm-haproxy-")
        assert {key: os.environ[key] for key in HAPROXY_ENV} == HAPROXY_ENV
        assert all(Path(os.environ[key]).parent == Path(folder) or Path(os.environ[key]) == Path(folder)
                   for key in HAPROXY_FILES)
        assert len(os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"]) < 108   # a unix socket's path limit
        assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "1"
        ports = [int(os.environ[key]) for key in HAPROXY_PORTS if key != "RAY_SERVE_HAPROXY_STATS_PORT"]
        assert len(set(ports)) == len(ports)
        for port in ports:   # free when handed out
            with socket.socket() as s:
                s.bind(("", port))
    try:
        assert not any(key in os.environ for key in (*HAPROXY_ENV, *HAPROXY_FILES))
        assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "1"
    finally:
        Path(folder).rmdir()
