"""What `vfm finetune train` and `vfm finetune eval` do, as config objects that check themselves.

One config per command (``TrainConfig``, ``EvalConfig``; ``FeatureOptions`` is the part they
share) holds every default once and refuses a bad value or combination in ``__post_init__``, so
``train_run(TrainConfig(...))`` from Python fails with the message the CLI prints: a
``ConfigError``, one line, exit 2. The CLI makes one flag per field, takes its default from
here, and hands the parsed flags over unchanged.

Options that only some heads or optimisers use default to ``None``, "not given": one given
where it does not apply is refused rather than silently ignored, and the derived ``knn`` or
``settings`` hold what the given and default values come to. Torch-free: the `vfm` command
imports this module to build its parser.

    >>> cfg = TrainConfig("tiny_cnn", "digits/", head="mlp", lrs="0.01,0.1", epochs=8)
    >>> cfg.settings.hidden, cfg.out
    ((512, 256), PosixPath('runs/digits-tiny_cnn-mlp'))
"""
from __future__ import annotations

import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vfm.models.head_kinds import HEAD_TYPES, LOSSES, METRICS

from .values import ConfigError, check_choice, check_number, check_numbers, check_optional, shown

HEADS = HEAD_TYPES
OPTIMIZERS = ("sgd", "gd", "lbfgs")
SCHEDULES = ("cosine", "step", "constant")
BATCH_NORMS = ("frozen", "train")     # --unfreeze: the unfrozen blocks' batch-norm statistics
MAX_VIEWS = 7                         # --views: the fixed augmentations there are (finetune.unfreeze.VIEWS)
SUBSETS = ("auto", "test", "all")
BACKENDS = ("torch", "onnx")
DEFAULT_LRS = {"sgd": (0.01, 0.03, 0.1, 0.3), "gd": (0.1, 1.0, 10.0), "lbfgs": (1.0,)}  # lbfgs: a line search
# An MLP by sgd: two rates a decade apart, and a shorter patience. On efficientnet_lite0 features of
# 1,000 Fashion-MNIST images every rate and patience tried ends at the same test accuracy (0.867, 0.01
# chosen), and these fit in about 0.7-0.9x MLPClassifier's time (CPU), where 0.01..0.3 with patience 10
# took 1.2-2x: the stacked heads cost in proportion to the heads still training.
DEFAULT_MLP_LRS = (0.01, 0.1)
DEFAULT_PATIENCE = {"linear": 10, "mlp": 5}
DEFAULT_EPOCHS = {"sgd": 30, "gd": 200, "lbfgs": 200}  # lbfgs: iterations per weight decay
# One head per weight decay (times the learning rates); lbfgs walks the grid from the strongest
# to the weakest, each fit starting from the previous one (a regularisation path).
DEFAULT_WEIGHT_DECAYS = {"sgd": (0.0,), "gd": (0.0,)}
# lbfgs's default grid is relative to the training set's size N, as scikit-learn's C is: its
# objective C * sum(loss) + |w|^2 / 2 is N*C times ours (mean loss + wd/2 |w|^2) at wd = 1 / (N*C).
# By default one fit at C = 1, LogisticRegression's default: its objective, at about its cost (0.8x on
# bench/finetune.py). A grid (--C 0.01,0.1,1,10) is walked as a warm-started path at about twice one
# fit's time; on efficientnet_lite0 features of 1,000 Fashion-MNIST images, over 20 stratified re-splits,
# its choice on validation averaged 0.6 points of test accuracy above C = 1 (0.858 vs 0.853, the spread
# between splits 2.6 points), and on the bench's own split one test image below.
DEFAULT_LBFGS_CS = (1.0,)
LBFGS_GRID_CS = (0.01, 0.1, 1.0, 10.0)  # the grid bench/finetune.py and the README's example walk


def decays_for(n: int, cs: tuple[float, ...] = DEFAULT_LBFGS_CS) -> tuple[float, ...]:
    """The weight decays 1 / (n*C) of scikit-learn's C values on n training samples (strongest first)."""
    return tuple(1.0 / (max(n, 1) * c) for c in sorted(cs))
DEFAULT_HIDDEN = (512, 256)
_TRAINED = ("linear", "mlp")  # the heads an optimiser trains

# A config field's flag where it is not "--" + the field name with dashes.
_FLAGS = {"ks": "--k", "lrs": "--lr", "cs": "--C", "use_cache": "--no-cache", "progress": "--quiet", "run": "RUN"}


def flag(name: str) -> str:
    """The CLI flag of a config field, as messages name it: ``lrs`` -> ``--lr``."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def default_of(cls: type, name: str, otherwise: Any = MISSING) -> Any:
    """The default of field ``name`` of dataclass ``cls``; ``otherwise`` for a field without one
    (a ``KeyError`` if not given, as for a name that is no field)."""
    spec = {f.name: f for f in fields(cls)}[name]
    if spec.default_factory is not MISSING:
        return spec.default_factory()
    if spec.default is not MISSING:
        return spec.default
    if otherwise is MISSING:
        raise KeyError(f"{cls.__name__}.{name} has no default")
    return otherwise


@dataclass
class RayOptions:
    """Feature extraction with Ray Data (``features_ray``)."""

    address: str                # "local" starts Ray in this process; else ray.init(address=...)
    actors: int | None = None   # pool size; default: one per GPU, else 2
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0

    def __post_init__(self) -> None:
        self.actors = check_optional("--ray-actors", self.actors, int, low=1)
        self.gpus_per_actor = check_optional("--ray-gpus", self.gpus_per_actor, float, low=0)
        self.cpus_per_actor = check_number("cpus_per_actor", self.cpus_per_actor, float, low=0, low_open=True)


@dataclass
class FeatureOptions:
    """How features are made and cached; the same for train and eval."""

    device: str = "auto"              # the backbone's device: auto, cpu, cuda or cuda:N
    backend: str = "torch"            # torch, or onnx: the backbone's export (`vfm export`) on ONNX Runtime
    repository: Path | None = None    # onnx: where the exports are (None: $VFM_MODEL_REPOSITORY or ./model_repository)
    workers: int | None = None        # DataLoader processes that read and resize images (None: 1 per 4 cores)
    cache_dir: Path | None = None     # None: $VFM_CACHE/features
    use_cache: bool = True            # False: neither read nor write the feature cache (--no-cache)
    extract_batch_size: int = 64      # images per backbone forward pass
    ray_address: str | None = None    # extract with Ray Data: a cluster address, auto, or local (start Ray here)
    ray_actors: int | None = None     # Ray: actors in the pool (None: one per GPU, else 2)
    ray_gpus: float | None = None     # Ray: GPUs per actor (None: 1 on a GPU cluster, else 0)
    threads: int | None = None        # torch threads for extraction and training (None: torch's, 1 for small heads)
    progress: bool = True             # False: no progress bars (--quiet)
    ray: RayOptions | None = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.cache_dir is not None and not self.use_cache:
            raise ConfigError("--cache-dir and --no-cache contradict each other")
        self.cache_dir = Path(self.cache_dir).expanduser() if self.cache_dir is not None else None
        self.extract_batch_size = check_number("--extract-batch-size", self.extract_batch_size, int, low=1)
        self.backend = check_choice("--backend", self.backend, BACKENDS)
        if self.repository is not None:
            if self.backend != "onnx":
                raise ConfigError("--repository is for --backend onnx")
            self.repository = Path(self.repository).expanduser()
        self.workers = check_optional("--workers", self.workers, int, low=0)
        self.threads = check_optional("--threads", self.threads, int, low=1)
        if self.ray_address is None:
            for name in ("ray_actors", "ray_gpus"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{flag(name)} needs --ray-address")
        else:
            self.ray = RayOptions(self.ray_address.strip(), self.ray_actors, self.ray_gpus)
            self.ray_actors, self.ray_gpus = self.ray.actors, self.ray.gpus_per_actor

    def cache_folder(self) -> Path | None:
        """Where features are cached; ``None`` with --no-cache."""
        if not self.use_cache:
            return None
        from vfm.models.weights import cache_dir

        return self.cache_dir or cache_dir() / "features"


@dataclass
class KNNSettings:
    """A k-NN head; of several k, the best on validation is kept."""

    ks: tuple[int, ...] = (5,)
    metric: str = "cosine"              # cosine | l2

    def __post_init__(self) -> None:
        self.ks = check_numbers("--k", self.ks, int, low=1)
        self.metric = check_choice("--metric", self.metric, METRICS)


@dataclass
class TrainSettings:
    """How ``train.train_heads`` trains linear and MLP heads; a ``None`` resolves by head or optimiser."""

    head: str = "linear"                 # linear | mlp
    hidden: tuple[int, ...] | None = None  # mlp hidden widths; None: DEFAULT_HIDDEN for mlp, () for linear
    dropout: float = 0.0                 # mlp with sgd: after each hidden layer
    loss: str = "ce"                     # ce | hinge | squared
    optimizer: str = "sgd"               # sgd | gd | lbfgs
    lrs: tuple[float, ...] | None = None  # one head per rate; None: DEFAULT_LRS[optimizer] (mlp sgd: DEFAULT_MLP_LRS)
    epochs: int | None = None            # gd: iterations; lbfgs: iterations per weight decay; None: DEFAULT_EPOCHS
    batch_size: int = 64
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: tuple[float, ...] | None = None  # one head per value (x lrs); None: DEFAULT_WEIGHT_DECAYS
    cs: tuple[float, ...] | None = None  # lbfgs: weight decays 1/(N*C), scikit-learn's C (None: DEFAULT_LBFGS_CS)
    schedule: str = "cosine"             # cosine | step | constant
    step_epochs: int | None = None       # step schedule: x0.1 every this many epochs (None: epochs // 3)
    patience: int | None = None          # sgd: stop a head after this many epochs without improvement; 0: off;
                                         # None: DEFAULT_PATIENCE[head]
    tol: float = 1e-4                    # gd: gradient-norm tolerance; lbfgs: largest gradient entry
    seed: int = 0
    threads: int | None = None           # torch threads while training; None: 1 for small steps, else torch's

    def __post_init__(self) -> None:
        self.head = check_choice("--head", self.head, _TRAINED)
        self.loss = check_choice("--loss", self.loss, LOSSES)
        self.optimizer = check_choice("--optimizer", self.optimizer, OPTIMIZERS)
        self.schedule = check_choice("--schedule", self.schedule, SCHEDULES)
        if self.hidden is None:
            self.hidden = DEFAULT_HIDDEN if self.head == "mlp" else ()
        if self.head == "linear":
            if self.hidden:
                raise ConfigError("--hidden does not apply to --head linear (it is for: mlp)")
            self.hidden = ()
        else:  # an MLP without hidden layers would be a linear head under another name
            self.hidden = check_numbers("--hidden", self.hidden, int, unique=False, low=1)
        self.dropout = check_number("--dropout", self.dropout, float, 0, 1, high_open=True)
        if self.optimizer != "sgd" and self.dropout > 0:
            raise ConfigError(f"--dropout needs --optimizer sgd: full-batch {self.optimizer} would not see a "
                              "falling loss through noise")
        if self.optimizer == "lbfgs" and self.lrs is not None and tuple(self.lrs) != DEFAULT_LRS["lbfgs"]:
            raise ConfigError("--lr does not apply to --optimizer lbfgs (its line search finds each step; it is "
                              "for: sgd, gd)")
        default_lrs = DEFAULT_MLP_LRS if (self.head, self.optimizer) == ("mlp", "sgd") else DEFAULT_LRS[self.optimizer]
        self.lrs = check_numbers("--lr", default_lrs if self.lrs is None else self.lrs, float,
                                 low=0, low_open=True)
        self.epochs = check_number("--epochs", DEFAULT_EPOCHS[self.optimizer] if self.epochs is None
                                   else self.epochs, int, low=1)
        self.batch_size = check_number("--batch-size", self.batch_size, int, low=1)
        self.momentum = check_number("--momentum", self.momentum, float, 0, 1, high_open=True)
        self.nesterov = bool(self.nesterov)
        if self.nesterov and self.momentum == 0:
            raise ConfigError("--nesterov needs a --momentum above 0")
        if self.cs is not None:
            if self.optimizer != "lbfgs":
                raise ConfigError(f"--C does not apply to --optimizer {self.optimizer} (it is for: lbfgs)")
            if self.weight_decay is not None:
                raise ConfigError("--C and --weight-decay both set the weight decays: give one")
            self.cs = check_numbers("--C", self.cs, float, low=0, low_open=True)
        if self.weight_decay is not None or self.optimizer != "lbfgs":  # lbfgs's default waits for N: resolve()
            self.weight_decay = check_numbers("--weight-decay", DEFAULT_WEIGHT_DECAYS[self.optimizer]
                                              if self.weight_decay is None else self.weight_decay, float, low=0)
        self.step_epochs = check_optional("--step-epochs", self.step_epochs, int, low=1)
        if self.step_epochs is not None and self.schedule != "step":
            raise ConfigError("--step-epochs is for --schedule step")
        self.patience = check_number("--patience", DEFAULT_PATIENCE[self.head] if self.patience is None
                                     else self.patience, int, low=0)
        self.tol = check_number("--tol", self.tol, float, low=0, low_open=True)
        self.seed = check_number("--seed", self.seed, int, low=0)
        self.threads = check_optional("--threads", self.threads, int, low=1)

    @property
    def relative_decay(self) -> bool:
        """lbfgs without --weight-decay: weight decays 1 / (N*C), C in ``cs`` (default DEFAULT_LBFGS_CS),
        set by ``resolve(N)``."""
        return self.weight_decay is None

    def resolve(self, n: int) -> "TrainSettings":
        """Fix a relative weight-decay grid for ``n`` training samples (in place; no-op when given)."""
        if self.weight_decay is None:
            self.weight_decay = decays_for(n, DEFAULT_LBFGS_CS if self.cs is None else self.cs)
        return self

    def grid(self) -> list[tuple[float, float]]:
        """(learning rate, weight decay) of each head trained in the one pass, in head order."""
        if self.weight_decay is None:
            raise ValueError("the relative weight-decay grid needs the training set's size: call resolve(n)")
        return [(lr, wd) for lr in self.lrs for wd in self.weight_decay]

    def head_name(self, lr: float, weight_decay: float | None = None) -> str:
        """DINOv2-style: the name says what the head is, e.g. mlp512-256_ce_sgd_lr0.1_wd0."""
        wd = (self.weight_decay[0] if self.weight_decay else 0.0) if weight_decay is None else weight_decay
        arch = self.head + ("-".join(map(str, self.hidden)) if self.head == "mlp" else "")
        drop = f"_drop{self.dropout:g}" if self.dropout else ""
        rate = "" if self.optimizer == "lbfgs" else f"_lr{lr:g}"
        return f"{arch}{drop}_{self.loss}_{self.optimizer}{rate}_wd{wd:g}"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["hidden"], out["lrs"] = list(self.hidden), list(self.lrs)
        out["weight_decay"] = None if self.weight_decay is None else list(self.weight_decay)
        out["cs"] = None if self.cs is None else list(self.cs)
        out.pop("threads")  # how fast, not what is learned
        return out


# TrainConfig field -> (heads, optimisers) it applies to; the order is the order of the checks.
_APPLIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ks": (("knn",), OPTIMIZERS), "metric": (("knn",), OPTIMIZERS),
    "hidden": (("mlp",), OPTIMIZERS), "dropout": (("mlp",), ("sgd",)),
    "loss": (_TRAINED, OPTIMIZERS), "optimizer": (_TRAINED, OPTIMIZERS), "lrs": (_TRAINED, ("sgd", "gd")),
    "epochs": (_TRAINED, OPTIMIZERS), "weight_decay": (_TRAINED, OPTIMIZERS), "cs": (_TRAINED, ("lbfgs",)),
    "resume": (_TRAINED, OPTIMIZERS),
    "batch_size": (_TRAINED, ("sgd",)), "momentum": (_TRAINED, ("sgd",)), "nesterov": (_TRAINED, ("sgd",)),
    "schedule": (_TRAINED, ("sgd",)), "step_epochs": (_TRAINED, ("sgd",)), "patience": (_TRAINED, ("sgd",)),
    "tol": (_TRAINED, ("gd", "lbfgs")),
}
_KNN_FIELDS = ("ks", "metric")
_TRAINING_FIELDS = ("hidden", "dropout", "loss", "optimizer", "lrs", "epochs", "batch_size", "momentum", "nesterov",
                    "weight_decay", "cs", "schedule", "step_epochs", "patience", "tol")


@dataclass
class TrainConfig:
    """`vfm finetune train`: data -> frozen backbone features -> heads -> evaluation -> a run folder."""

    backbone: str                        # a zoo backbone, or pixels[:SIZE][:rgb] (a raw-pixel baseline)
    data: str                            # an ImageFolder folder, a .csv manifest or idx:FOLDER
    out: Path | None = None              # the run folder; None: runs/<data>-<backbone>-<head>
    head: str = "linear"                 # knn | linear | mlp
    ks: tuple[int, ...] | None = None    # knn (KNNSettings)
    metric: str | None = None            # knn
    hidden: tuple[int, ...] | None = None  # mlp (TrainSettings, as are the rest down to tol)
    dropout: float | None = None         # mlp with sgd
    loss: str | None = None              # linear, mlp
    optimizer: str | None = None         # linear, mlp
    lrs: tuple[float, ...] | None = None  # linear, mlp
    epochs: int | None = None            # linear, mlp
    batch_size: int | None = None        # sgd
    momentum: float | None = None        # sgd
    nesterov: bool = False               # sgd
    weight_decay: tuple[float, ...] | None = None  # linear, mlp: one head per value
    cs: tuple[float, ...] | None = None  # lbfgs: weight decays 1/(N*C), one head per C
    schedule: str | None = None          # sgd
    step_epochs: int | None = None       # sgd, step schedule
    patience: int | None = None          # sgd
    tol: float | None = None             # gd, lbfgs
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train,val,test: for splits the data does not give
    seed: int = 0                        # seeds the splits, initial weights and shuffling
    limit: int | None = None             # at most this many examples in all, stratified
    classes: tuple[str, ...] | None = None  # keep only these classes
    resume: bool = False                 # linear, mlp: continue the interrupted run in out
    overwrite: bool = False              # replace the run in out
    delta: float = 0.05                  # the test-error bound holds with probability 1 - delta
    normalize: bool = False              # L2-normalise the backbone's features (recorded in head.json)
    unfreeze: int | None = None          # train the backbone's last N blocks with the head (finetune.unfreeze)
    backbone_lr: float | None = None     # --unfreeze: the blocks' learning rate (None: each lr / 10)
    augment: bool = False                # --unfreeze: flips and shifts (then nothing is cached)
    views: int = 0                       # --unfreeze: fixed augmented views of each training image, cached
    label_smoothing: float = 0.0         # --unfreeze: the ce loss's label smoothing
    batch_norm: str = "frozen"           # --unfreeze: frozen (the pre-trained statistics) | train (batch statistics)
    head_epochs: int = 0                 # --unfreeze: epochs of the head alone on the frozen features first (LP-FT)
    mixup: float = 0.0                   # --unfreeze: mixup of the blocks' inputs, Beta(a, a) weights (0: off)
    unpooled: int | None = None          # the head on the activations entering the last N blocks, unpooled; a model
    features: FeatureOptions = field(default_factory=FeatureOptions)
    knn: KNNSettings | None = field(init=False, default=None, repr=False, compare=False)
    settings: TrainSettings | None = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.backbone, self.data = _required("backbone", self.backbone), _required("data", self.data)
        self.head = check_choice("--head", self.head, HEADS)
        optimizer = None
        if self.head != "knn":
            optimizer = check_choice("--optimizer", default_of(TrainSettings, "optimizer") if self.optimizer is None
                                     else self.optimizer, OPTIMIZERS)
        self._refuse_what_does_not_apply(optimizer)
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other")
        self.split = _check_split(self.split)
        self.seed = check_number("--seed", self.seed, int, low=0)
        self.limit = check_optional("--limit", self.limit, int, low=3)  # one example for each split
        self.classes = _check_classes(self.classes)
        self.delta = check_number("--delta", self.delta, float, 0, 1, low_open=True, high_open=True)
        self.resume, self.overwrite, self.normalize = bool(self.resume), bool(self.overwrite), bool(self.normalize)
        self.out = default_run_dir(self.data, self.backbone, self.head) if self.out is None \
            else Path(self.out).expanduser()
        if self.head == "knn":
            self.knn = KNNSettings(**self._given(_KNN_FIELDS))
            self._normalise_given(self.knn, _KNN_FIELDS)
        else:
            self.settings = TrainSettings(head=self.head, seed=self.seed, threads=self.features.threads,
                                          **self._given(_TRAINING_FIELDS))
            self._normalise_given(self.settings, _TRAINING_FIELDS)
        self._check_unfreeze()

    def _check_unfreeze(self) -> None:
        self.unfreeze = check_optional("--unfreeze", self.unfreeze, int, low=1)
        self._check_unpooled()
        self.backbone_lr = check_optional("--backbone-lr", self.backbone_lr, float, low=0, low_open=True)
        self.augment = bool(self.augment)
        self.views = check_number("--views", self.views, int, 0, MAX_VIEWS)
        self.label_smoothing = check_number("--label-smoothing", self.label_smoothing, float, 0, 1, high_open=True)
        self.batch_norm = check_choice("--batch-norm", self.batch_norm, BATCH_NORMS)
        self.head_epochs = check_number("--head-epochs", self.head_epochs, int, low=0)
        self.mixup = check_number("--mixup", self.mixup, float, 0, 10)
        if self.unfreeze is None:
            for name in ("backbone_lr", "augment", "views", "label_smoothing", "head_epochs", "mixup"):
                if getattr(self, name):
                    raise ConfigError(f"{flag(name)} needs --unfreeze N")
            if self.batch_norm != "frozen":
                raise ConfigError("--batch-norm needs --unfreeze N")
            return
        if self.augment and self.views:
            raise ConfigError("--views caches fixed augmented views; --augment draws new ones every epoch: give one")
        if self.head == "knn" or self.settings.optimizer != "sgd" or self.settings.loss != "ce":
            raise ConfigError("--unfreeze trains the blocks with the head by sgd on the ce loss: use --head linear "
                              "or mlp, --optimizer sgd, --loss ce")
        self._refuse_with("--unfreeze", "the blocks train on PyTorch")
        if self.settings.weight_decay is not None and len(self.settings.weight_decay) > 1:
            raise ConfigError("--unfreeze trains with one --weight-decay; give a single value")

    def _check_unpooled(self) -> None:
        self.unpooled = check_optional("--unpooled", self.unpooled, int, low=0)
        if self.unpooled is None:
            return
        if self.head == "knn":
            raise ConfigError("--unpooled writes a model with a trained head: use --head linear or mlp")
        self._refuse_with("--unpooled", "its activations come from PyTorch")

    def _refuse_with(self, option: str, why_not_onnx: str) -> None:
        """--resume, --normalize, --ray-address and --backend onnx do not apply with ``option`` (a model run)."""
        for name, given in (("resume", self.resume), ("normalize", self.normalize),
                            ("ray_address", self.features.ray_address), ("backend", self.features.backend != "torch")):
            if given:
                raise ConfigError(f"{flag(name)} does not apply with {option}"
                                  + (f" ({why_not_onnx})" if name == "backend" else ""))

    def _refuse_what_does_not_apply(self, optimizer: str | None) -> None:
        for name, (heads, optimizers) in _APPLIES.items():
            value = getattr(self, name)
            if value is None or (name in ("nesterov", "resume") and not value):  # not given
                continue
            if self.head not in heads:
                raise ConfigError(f"{flag(name)} does not apply to --head {self.head} (it is for: {', '.join(heads)})")
            if optimizer is not None and optimizer not in optimizers:
                raise ConfigError(f"{flag(name)} does not apply to --optimizer {optimizer} "
                                  f"(it is for: {', '.join(optimizers)})")

    def _given(self, names: tuple[str, ...]) -> dict[str, Any]:
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def _normalise_given(self, settings: Any, names: tuple[str, ...]) -> None:
        # What was given, as the settings read it ("0.1,1" -> (0.1, 1.0)); not given stays None.
        for name, value in self._given(names).items():
            setattr(self, name, getattr(settings, name))


@dataclass
class EvalConfig:
    """`vfm finetune eval`: a saved head on data, its own test split or all of it."""

    run: Path                            # a run folder, or any folder with head.json and head.safetensors
    data: str                            # as for train
    subset: str = "auto"                 # test: the data's own test split; all; auto: test if the data has one
    limit: int | None = None             # at most this many examples, stratified
    seed: int = 0                        # seeds the --limit subset
    delta: float = 0.05                  # the bound holds with probability 1 - delta
    out: Path | None = None              # the report folder; None: RUN/eval-<data>
    update: bool = False                 # record the new metrics in RUN/head.json (what the service lists)
    features: FeatureOptions = field(default_factory=FeatureOptions)

    def __post_init__(self) -> None:
        self.run = Path(_required("run", self.run)).expanduser()
        self.update = bool(self.update)
        self.data = _required("data", self.data)
        self.subset = check_choice("--subset", self.subset, SUBSETS)
        self.limit = check_optional("--limit", self.limit, int, low=1)
        self.seed = check_number("--seed", self.seed, int, low=0)
        self.delta = check_number("--delta", self.delta, float, 0, 1, low_open=True, high_open=True)
        self.out = default_eval_dir(self.run, self.data) if self.out is None else Path(self.out).expanduser()


def _required(name: str, value: Any) -> str:
    text = "" if value is None else str(value).strip()
    if not text:
        raise ConfigError(f"{flag(name)} is required (see --help)")
    return text


def _check_split(split: Any) -> tuple[float, float, float]:
    values = check_numbers("--split", split, float, unique=False, low=0, high=1)
    if len(values) != 3:
        raise ConfigError(f"--split {shown(values)!r}: give three fractions train,val,test")
    if abs(sum(values) - 1) > 1e-6 or values[0] <= 0 or values[1] <= 0:
        raise ConfigError(f"--split {shown(values)}: three fractions that sum to 1, with train and val above 0 "
                          "(heads are chosen on validation)")
    return values


def _check_classes(classes: Any) -> tuple[str, ...] | None:
    if classes is None:
        return None
    names = tuple(c.strip() for c in (classes.split(",") if isinstance(classes, str) else map(str, classes)))
    if len(names) < 2 or any(not n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"--classes {','.join(names)!r}: give at least two distinct class names, comma-separated")
    return names


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def default_run_dir(data: str, backbone: str, head: str) -> Path:
    """runs/<data>-<backbone>-<head>, each part named by its last path component."""
    def part(text: str) -> str:
        return _slug(Path(text.split(":", 1)[-1]).name or text) or "data"

    return Path("runs") / f"{part(data)}-{part(backbone)}-{head}"


def default_eval_dir(run: Path, data: str) -> Path:
    """RUN/eval-<data>, the data spec made a folder name."""
    return run / f"eval-{_slug(data.strip('/'))[-60:] or 'data'}"
