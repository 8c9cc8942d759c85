"""The service config: one YAML file, validated by pydantic, the one source of every setting.

    >>> cfg = load_config("configs/default.yaml")
    >>> cfg.models["efficientnet_lite0"].max_batch_size
    8

Keys under ``models`` are the names the service serves a model under (the URL path); ``model``
names the registry entry and defaults to the key, so one registry model can be served twice
with different settings (``tiny_cnn`` and ``tiny_cnn_onnx``). Mistakes raise ``ConfigError``
whose lines name the key (``vfm.models.tiny_cnn.max_batch_size: ...``) and suggest close names.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A config that cannot be served; one line per problem, each naming its key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Autoscaling(_Strict):
    """Ray Serve autoscaling: replicas between ``min`` and ``max``, aiming at ``target_ongoing_requests``."""

    min: int = Field(1, ge=0)
    max: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "Autoscaling":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self

    def to_serve(self) -> dict[str, Any]:
        return {"min_replicas": self.min, "max_replicas": self.max, "initial_replicas": max(self.min, 1),
                "target_ongoing_requests": self.target_ongoing_requests}


class ModelConfig(_Strict):
    """How one model is served: its backend and device, batching, replicas and queue limits."""

    model: str | None = Field(None, description="registry name; defaults to the key under `models`")
    backend: Literal["torch", "onnx"] = "torch"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    weights: str | None = Field(None, description="local path, hf:org/name or https://...#sha256=")
    max_batch_size: int = Field(8, ge=1, le=1024, description="the most images in one model call")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, le=10, description="how long a request that finds the model idle waits for company; requests "
                                      "that queue while the model runs go in its next call without waiting")
    replicas: int | None = Field(None, ge=1)
    autoscaling: Autoscaling | None = None
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per replica (`ray start --resources`), e.g. {a100: 0.5}")
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(128, ge=-1, description="-1: unbounded")
    request_timeout_s: float | None = Field(None, gt=0, description="overrides the service-wide timeout")
    health_check_period_s: float = Field(10.0, gt=0)
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="torch backend: float16/bfloat16 need a CUDA device; onnx backend: float16 runs "
                               "the NAME.float16 export (`vfm export NAME --dtype float16`)")
    quantize: Literal["int8"] | None = Field(
        None, description="onnx backend: int8 runs the NAME.int8 export (`vfm export NAME --quantize int8`)")
    auto_export: bool = Field(False, description="onnx backend: export into model_repository on first use")
    options: dict[str, Any] = Field(default_factory=dict, description="more runner options, e.g. pooling, num_threads")
    decode_in: Literal["replica", "ingress"] = Field(
        "replica", description="where image bytes are decoded; replica measured faster (bench/serve.py)")

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError("give `replicas` or `autoscaling`, not both")
        if self.quantize is not None and (self.backend != "onnx" or self.dtype != "float32"):
            raise ValueError(f"quantize: {self.quantize} needs backend: onnx (and dtype float32): it runs the "
                             f"model's {self.quantize} export")
        onnx_half = self.backend == "onnx" and self.dtype == "float16"
        if self.dtype != "float32" and not onnx_half and (self.backend != "torch" or self.device == "cpu"):
            raise ValueError(f"dtype {self.dtype} needs backend: torch on a CUDA device (device: cuda or auto), "
                             "or (float16) backend: onnx and a float16 export")
        if self.device.startswith("cuda") and self.num_gpus <= 0:
            raise ValueError(f"device {self.device!r} needs num_gpus > 0 (Ray hides GPUs from replicas without one)")
        reserved = sorted({"CPU", "GPU", "memory", "object_store_memory"} & set(self.resources))
        if reserved:
            raise ValueError(f"resources may not name {', '.join(reserved)}; use num_cpus / num_gpus")
        if any(v < 0 for v in self.resources.values()):
            raise ValueError("resources must be >= 0")
        return self

    def serve_options(self) -> dict[str, Any]:
        """Options for ``Deployment.options(...)``."""
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                  **({"resources": dict(self.resources)} if self.resources else {})},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "health_check_period_s": self.health_check_period_s,
        }
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.to_serve()
        else:
            opts["num_replicas"] = self.replicas or 1
        return opts


class Limits(_Strict):
    """What one request may ask for; beyond these the answer is 413 or 422."""

    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(40_000_000, ge=1)
    max_top_k: int = Field(100, ge=1)
    max_detections: int = Field(1000, ge=1)
    max_points: int = Field(64, ge=1)
    max_prompts: int = Field(16, ge=1)
    max_points_per_side: int = Field(64, ge=1, description="segment everything: the largest grid (n x n points)")
    max_images_per_request: int = Field(32, ge=1, description="predict, embed, head predict: the most images in "
                                        "one request's `images` list")


class IngressConfig(_Strict):
    """The HTTP front deployment (FastAPI) that parses requests and calls the model deployments."""

    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, ge=0)
    max_ongoing_requests: int = Field(512, ge=1)


class HttpConfig(_Strict):
    """What listens on host:port and hands each request to the ingress."""

    front: Literal["ray", "haproxy"] = Field(
        "ray", description="ray: Serve's HTTP proxy (a Python actor) calls the ingress; haproxy: Ray's HAProxy "
                           "listens and forwards to the ingress replicas' own HTTP servers (Serve's direct "
                           "ingress), one Python hop fewer")


class ServiceConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    address: str | None = Field(None, description="join this Ray cluster (auto, ray://...); none: start one")
    app_name: str = Field("vfm", pattern=r"^[A-Za-z0-9_.-]+$")
    request_timeout_s: float = Field(30.0, gt=0)
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 503 answers")
    limits: Limits = Limits()
    api_key_env: str | None = Field("VFM_API_KEY", description="environment variable holding the API key")
    api_key_scope: Literal["admin", "all"] = Field("admin", description="routes that need the key when it is set")
    cors_origins: list[str] = Field(default_factory=list, description="browser origins allowed by CORS; none: off")
    heads_dir: str = "heads"
    models_dir: str | None = Field(None, description="published fine-tuned models (`vfm finetune publish`), looked "
                                   "for before $VFM_MODELS_DIR and ~/.local/share/vfm/models")
    model_repository: str = Field("model_repository", description="ONNX exports (`vfm export`), for backend: onnx")
    sam_cache_size: int = Field(32, ge=1, description="SAM image embeddings kept per replica (LRU)")
    metrics_flush_s: float = Field(1.0, gt=0, le=60)
    access_log: bool = Field(False, description="one log line per HTTP request (Serve's access log); "
                             "`vfm serve --access-log` turns it on too")
    http: HttpConfig = HttpConfig()
    ingress: IngressConfig = IngressConfig()
    models: dict[str, ModelConfig] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _names(cls, models: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        for name in models:
            if not re.fullmatch(r"[A-Za-z0-9_.\-/]+", name) or name.startswith("/") or name.endswith("/"):
                raise ValueError(f"served name {name!r} may only hold letters, digits, '_', '-', '.' and inner '/'")
        return models

    def registry_name(self, served: str) -> str:
        return self.models[served].model or served

    def timeout_for(self, served: str) -> float:
        return self.models[served].request_timeout_s or self.request_timeout_s

    def api_key(self) -> str | None:
        """The API key, read from the variable the config names (never stored in the config)."""
        if not self.api_key_env:
            return None
        return os.environ.get(self.api_key_env) or None


# ---- loading & error messages -------------------------------------------------------------

def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


_SECTIONS: dict[str, type[BaseModel]] = {"": ServiceConfig, "limits": Limits, "ingress": IngressConfig,
                                        "http": HttpConfig,
                                        "models.*": ModelConfig, "models.*.autoscaling": Autoscaling}


def _section_of(loc: tuple) -> type[BaseModel] | None:
    key = ".".join("*" if i == 1 and loc[0] == "models" else str(p) for i, p in enumerate(loc[:-1]))
    return _SECTIONS.get(key)


def _explain(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            section = _section_of(loc)
            close = difflib.get_close_matches(str(loc[-1]), _field_names(section), n=3) if section else []
            msg = "unknown key" + (f"; did you mean {' or '.join(close)}?" if close else "")
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], (dict, list)):
            msg += f" (got {err['input']!r})"
        lines.append(f"{key}: {msg}")
    return lines


def check_model_names(cfg: ServiceConfig) -> list[str]:
    """Every served model must name a registered model; the error lists close names."""
    from vfm.models import UnknownModel, get_spec
    from vfm.models.published import use_models_dir

    use_models_dir(cfg.models_dir)
    problems = []
    for served in cfg.models:
        try:
            get_spec(cfg.registry_name(served))
        except UnknownModel as exc:
            key = f"models.{served}" + (".model" if cfg.models[served].model else "")
            problems.append(f"{key}: {exc}")
    return problems


def parse_config(data: dict[str, Any] | None, source: str = "config", check_models: bool = True,
                 **overrides: Any) -> ServiceConfig:
    """Validate a config mapping; ``overrides`` (host, port, address) replace top-level keys when not None."""
    data = dict(data or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = ServiceConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source} is not valid:\n  " + "\n  ".join(_explain(exc))) from None
    if check_models:
        problems = check_model_names(cfg)
        if problems:
            raise ConfigError(f"{source} is not valid:\n  " + "\n  ".join(problems))
    return cfg


def load_config(path: str | Path | None = None, check_models: bool = True, **overrides: Any) -> ServiceConfig:
    """Read and validate a YAML config (the default config when ``path`` is None)."""
    import yaml

    path = Path(path) if path else DEFAULT_CONFIG
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"Cannot read config {path}: {exc.strerror or exc}.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, not {type(data).__name__}.")
    return parse_config(data, source=str(path), check_models=check_models, **overrides)
