"""Declarative training stages and the Stage-2/3 trainer (DESIGN section 4).

A :class:`StageSpec` names the parameter groups a stage trains, freezes, and must load from
the previous stage's checkpoint. Groups are named modules of :class:`~ur4rec.models.ur4rec_model.UR4Rec`
(``item_embedding``, ``backbone``, ``experts.visual``, ...), never substrings of keys: the
prototype loaded "keys containing 'sasrec'", missed the item embedding, and froze it random.

* Stage 1: plain SASRec (``item_embedding`` + ``backbone``), :func:`ur4rec.training.trainer.train_stage1`.
* Stage 2: backbone and item embedding frozen (loaded from Stage 1); the experts and the
  alignment heads learn, with the recommendation loss plus the InfoNCE alignment loss.
* Stages 2 and 3: the history-similarity weights (a few scalars) are not trained on the train
  part but fitted on the validation items before every validation (:func:`fit_similarity`).
* Stage 3: router, gate, experts, alignment and memory train, the backbone is fine-tuned
  (``moe.backbone_lr_scale``), the item embedding stays frozen; everything loads from
  Stage 2. Without a valid Stage-2 checkpoint Stage 3 refuses to start unless
  ``skip_stage2=True``; then it loads Stage 1's groups only (the adapters keep their
  feature-preserving initialisation) and ``checkpoint.json`` records ``"skipped": ["stage2"]``.

:func:`load_stage_weights` loads group by group, strictly within each group (every key of
the group present in both, same shapes), reports missing/unexpected keys per group and
raises when a required group did not load. No ``strict=False``.

:func:`train_stage` writes ``RUN/stageN/`` like Stage 1 does (model.safetensors,
checkpoint.json, log.jsonl, metrics.json, valid_ranks.csv, test_ranks.csv) plus ``internals/`` for the app.
Epoch 0 is the loaded model: its validation metric is the value to beat, and ``checkpoint.json``
says ``"epoch": 0`` when no epoch beat it. Training rows are ``moe.rows_per_window`` target
positions of each Stage-1 window, drawn at random each epoch, scored against the target, the
backbone's hardest items and shared uniform negatives (``moe.train_candidates: sampled``,
:func:`sampled_candidates`), or each window's newest target against the batch's other targets
(``in_batch``) or all items (``full``). In every mode the user's own train items other than the
target are left out of a row's softmax: full ranking never asks the model to beat them. A row
reads the memory as of its target: the items just before it (short-term) and the long-term
tier as it stood just before its position.
"""

from __future__ import annotations

import csv
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ur4rec.config import Config
from ur4rec.data.dataset import SequenceDataset
from ur4rec.evaluation.evaluate import build_eval_inputs, eval_mode, evaluate, excluded_items, sample_negatives
from ur4rec.models.losses import (
    UncertaintyWeighting,
    alignment_loss,
    combine_losses,
    load_balancing_loss,
    recommendation_loss,
    surprise_weights,
)
from ur4rec.models.losses import sample_negatives as sample_training_negatives
from ur4rec.models.memory import UserMemory, build_memory, combined_item_features, empty_memory
from ur4rec.models.scoring import score
from ur4rec.models.ur4rec_model import EXPERTS, UR4Rec
from ur4rec.rundir import EpochRanks, append_log, stage_dir, start_stage, write_json, write_ranks
from ur4rec.training.checkpoint import (
    CheckpointError,
    load_strictly,
    read_checkpoint_info,
    read_weights,
    save_checkpoint,
)
from ur4rec.training.trainer import (
    NonFiniteLossError,
    StageResult,
    autocast,
    deterministic_kernels,
    kept_checkpoint,
    learning_rate,
    length_bucketed_batches,
    non_finite_weights,
    set_threads,
    train_stage1,
    training_windows,
)

EXPERT_GROUPS = tuple(f"experts.{name}" for name in EXPERTS)


@dataclass(frozen=True)
class StageSpec:
    name: str
    train: tuple[str, ...]  # groups with requires_grad
    freeze: tuple[str, ...]  # groups without
    load: tuple[str, ...] = ()  # groups that must load from the previous stage's checkpoint
    previous: int | None = None  # the stage whose checkpoint ``load`` reads


STAGES = {
    1: StageSpec("stage1", train=("item_embedding", "backbone"),
                 freeze=("memory", "alignment", *EXPERT_GROUPS, "router", "gate", "similarity")),
    2: StageSpec("stage2", train=(*EXPERT_GROUPS, "alignment"),
                 freeze=("item_embedding", "backbone", "memory", "router", "gate", "similarity"),
                 load=("item_embedding", "backbone"), previous=1),
    3: StageSpec("stage3", train=("backbone", *EXPERT_GROUPS, "alignment", "memory", "router", "gate"),
                 freeze=("item_embedding", "similarity"),
                 load=("item_embedding", "backbone", "memory", "alignment", *EXPERT_GROUPS, "router", "gate",
                       "similarity"),
                 previous=2),
}


def stage_spec(stage: int, skip_stage2: bool = False) -> StageSpec:
    """The spec of ``stage``; Stage 3 with ``skip_stage2`` loads Stage 1's groups from Stage 1."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {stage}")
    spec = STAGES[stage]
    if stage == 3 and skip_stage2:
        return StageSpec(spec.name, spec.train, spec.freeze, load=("item_embedding", "backbone"), previous=1)
    return spec


class StageLoadError(CheckpointError):
    """A required parameter group did not load from the previous stage's checkpoint."""


class StageOrderError(CheckpointError):
    """A stage started without the valid previous-stage checkpoint it needs."""


# --------------------------------------------------------------------------- groups and loading


def group_of(key: str, groups) -> str | None:
    """The group (a module name) that owns parameter/state key ``key``: the longest matching prefix."""
    owners = [group for group in groups if key.startswith(group + ".")]
    return max(owners, key=len) if owners else None


def apply_stage(model: UR4Rec, spec: StageSpec) -> dict[str, list[torch.nn.Parameter]]:
    """Set requires_grad per group; return the trainable parameters by group.

    Every parameter must belong to a group the spec trains or freezes.
    """
    groups = model.parameter_groups()
    trainable: dict[str, list[torch.nn.Parameter]] = {name: [] for name in spec.train if name in groups}
    for key, parameter in model.named_parameters():
        group = group_of(key, groups)
        if group is None or (group not in spec.train and group not in spec.freeze):
            raise ValueError(f"{spec.name}: parameter {key!r} is in no trained or frozen group")
        parameter.requires_grad_(group in spec.train)
        if group in spec.train:
            trainable[group].append(parameter)
    return {name: params for name, params in trainable.items() if params}


@dataclass
class LoadReport:
    loaded: dict[str, int] = field(default_factory=dict)  # group -> tensors loaded
    missing: dict[str, list[str]] = field(default_factory=dict)  # group -> keys the checkpoint lacks
    unexpected: dict[str, list[str]] = field(default_factory=dict)  # group -> keys the model lacks
    mismatched: dict[str, list[str]] = field(default_factory=dict)  # group -> keys with another shape
    not_loaded: list[str] = field(default_factory=list)  # checkpoint keys outside the required groups

    def as_dict(self) -> dict:
        return {"loaded": self.loaded, "missing": self.missing, "unexpected": self.unexpected,
                "mismatched": self.mismatched, "not_loaded": self.not_loaded}


def load_stage_weights(model: UR4Rec, previous_stage_dir: Path, spec: StageSpec) -> LoadReport:
    """Load ``spec.load`` groups from ``previous_stage_dir/model.safetensors``, strictly per group.

    Raises :class:`StageLoadError` naming every missing, unexpected or reshaped key when a
    required group does not load completely (nothing is loaded then).
    """
    path = Path(previous_stage_dir) / "model.safetensors"
    try:
        saved = read_weights(previous_stage_dir, read_checkpoint_info(previous_stage_dir))
    except CheckpointError as error:
        raise StageLoadError(f"{spec.name}: {error}") from error
    state = model.state_dict()
    groups = model.parameter_groups()
    required = [group for group in spec.load if group in groups]
    report = LoadReport()
    for group in required:
        expected = {key for key in state if group_of(key, groups) == group}
        present = {key for key in saved if group_of(key, groups) == group}
        report.missing[group] = sorted(expected - present)
        report.unexpected[group] = sorted(present - expected)
        report.mismatched[group] = sorted(key for key in expected & present if saved[key].shape != state[key].shape)
        report.loaded[group] = len(expected & present) - len(report.mismatched[group])
    report.not_loaded = sorted(key for key in saved if group_of(key, groups) not in required)
    # A group that holds no weights in this model (e.g. the gate when moe.gate=none) has nothing to load.
    failed = [group for group in required if report.missing[group] or report.unexpected[group]
              or report.mismatched[group] or (report.loaded[group] == 0 and any(
                  group_of(key, groups) == group for key in state))]
    if failed:
        details = "; ".join(f"{group}: missing {report.missing[group]}, unexpected {report.unexpected[group]}, "
                            f"shape mismatch {report.mismatched[group]}" for group in failed)
        raise StageLoadError(f"{spec.name}: required group(s) {failed} did not load from {path} ({details})")
    with torch.no_grad():
        for key in state:
            if group_of(key, groups) in required:
                state[key].copy_(saved[key])  # state_dict tensors share storage with the model
    return report


# What the loaded weights compute with but their shapes do not show: a checkpoint trained under another
# value loads without a shape error and computes something else (the heads split the same matrices).
SAME_AS_PREVIOUS = {1: ("model.num_heads",), 2: ("model.num_heads", "moe.semantic_heads")}


def check_previous_stage(run_dir: Path, spec: StageSpec, fingerprint: str, skip_stage2: bool = False,
                         config: Config | None = None, features=None) -> Path:
    """The previous stage's directory, once its checkpoint is known to be valid for this data (and,
    when given, for ``config``'s settings of :data:`SAME_AS_PREVIOUS` and for ``features``)."""
    previous = stage_dir(run_dir, spec.previous)
    hint = ""
    if spec.name == "stage3" and not skip_stage2:
        hint = (" Train stage 2 first, or skip it (`ur4rec train --skip-stage2`, skip_stage2=True in Python) "
                "to start stage 3 from stage 1; the skip is recorded in checkpoint.json.")
    try:
        info = read_checkpoint_info(previous)
    except CheckpointError as error:
        raise StageOrderError(f"{spec.name} needs a valid stage-{spec.previous} checkpoint: {error}.{hint}") from error
    problem = None
    if info.get("stage") != spec.previous:
        problem = f"its checkpoint.json says stage {info.get('stage')}"
    elif info.get("data_fingerprint") != fingerprint:
        problem = f"it was trained on data {info.get('data_fingerprint')}, not {fingerprint}"
    elif not (previous / "model.safetensors").exists():
        problem = "model.safetensors is missing"
    elif not (previous / "metrics.json").exists():  # the next `train` of it would delete it (rundir.start_stage)
        problem = "it never finished (no metrics.json: it stopped before its final evaluation); train it again"
    elif features is not None and info.get("features_fingerprint", features_fingerprint(features)) \
            != features_fingerprint(features):  # a Stage-1 checkpoint has none: it uses no features
        problem = (f"it was trained with other features ({info['features_fingerprint']}, these are "
                   f"{features_fingerprint(features)})")
    elif config is not None:
        for key in SAME_AS_PREVIOUS[spec.previous]:
            section, name = key.split(".")
            theirs, ours = info["config"].get(section, {}).get(name), getattr(getattr(config, section), name)
            if theirs is not None and theirs != ours:
                problem = f"it was trained with {key} {theirs}, this config has {ours}"
                break
    if problem:
        raise StageOrderError(f"{spec.name} needs a valid stage-{spec.previous} checkpoint in {previous}: "
                              f"{problem}.{hint}")
    return previous


# --------------------------------------------------------------------------- building and rebuilding


def build_user_memory(dataset: SequenceDataset, features, config: Config) -> UserMemory:
    """Every user's memory from the train part only."""
    moe = config.moe
    if not moe.memory:
        return empty_memory(dataset.n_users)
    sequences = [dataset.train_sequence(user) for user in range(dataset.n_users)]
    return build_memory(sequences, combined_item_features(features), moe.long_term_capacity, moe.novelty_threshold,
                        moe.memory_half_life)


def build_ur4rec(config: Config, dataset: SequenceDataset, features) -> UR4Rec:
    """The model, its memory and its collaborative similarity, from the train part only."""
    sequences = [dataset.train_sequence(user) for user in range(dataset.n_users)]
    return UR4Rec(config, dataset.n_items, dataset.n_users, features, build_user_memory(dataset, features, config),
                  sequences)


def features_fingerprint(features) -> str:
    """sha256 of the feature arrays: a checkpoint is only rebuilt with the features it was trained on."""
    digest = hashlib.sha256()
    for name in ("item_text", "item_text_mask", "user_text", "user_text_mask", "item_image", "item_image_mask"):
        array = getattr(features, name)
        digest.update(name.encode())
        if array is not None:
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def load_stage_model(stage_directory: Path, features, dataset: SequenceDataset) -> tuple[UR4Rec, dict]:
    """Rebuild a Stage-2/3 model from checkpoint.json (config, n_items, n_users) + features + the
    dataset's train part (memory), and load its weights strictly."""
    stage_directory = Path(stage_directory)
    info = read_checkpoint_info(stage_directory)
    if info.get("data_fingerprint") != dataset.fingerprint:
        raise CheckpointError(f"{stage_directory} was trained on data {info.get('data_fingerprint')}, "
                              f"not on {dataset.fingerprint}")
    if info.get("features_fingerprint") != features_fingerprint(features):
        run = stage_directory.parent
        raise CheckpointError(
            f"{stage_directory} was trained with other features ({info.get('features_fingerprint')}, these are "
            f"{features_fingerprint(features)}): {run / 'features' / 'manifest.json'} now names other feature sets. "
            f"Build the ones it used again with the text and features settings of its checkpoint.json "
            f"(`ur4rec features text|image --config C --run-dir {run}`, C holding those settings)")
    if (info["n_items"], info["n_users"]) != (dataset.n_items, dataset.n_users):
        raise CheckpointError(f"{stage_directory}: n_items/n_users differ from the dataset")
    config = Config.from_dict(info["config"], source=str(stage_directory / "checkpoint.json"))
    model = build_ur4rec(config, dataset, features)
    load_strictly(model, read_weights(stage_directory, info), stage_directory / "model.safetensors")
    return model, info


# --------------------------------------------------------------------------- training


def window_positions(dataset: SequenceDataset, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """For the windows of :func:`~ur4rec.training.trainer.training_windows`, in the same order:
    (W,) user of each window and (W, max_len) train position of each target (0 at padding)."""
    users, times = [], []
    for user in range(dataset.n_users):
        n_targets = len(dataset.train_sequence(user)) - 1
        for end in range(n_targets, 0, -max_len):
            start = max(0, end - max_len)
            row = np.zeros(max_len, dtype=np.int64)
            row[max_len - (end - start):] = np.arange(start + 1, end + 1)  # target y[i] is train item i + 1
            users.append(user)
            times.append(row)
    return np.array(users, dtype=np.int64), np.stack(times)


def _checked_windows(dataset: SequenceDataset, max_len: int):
    inputs, targets = training_windows(dataset, max_len)
    users, times = window_positions(dataset, max_len)
    offsets = np.cumsum([0] + [len(dataset.train_sequence(u)) for u in range(dataset.n_users)])
    flat = np.concatenate([dataset.train_sequence(u) for u in range(dataset.n_users)])
    expected = np.where(times > 0, flat[offsets[users][:, None] + times], 0) if len(users) == len(targets) else None
    if expected is None or not np.array_equal(expected, targets):
        raise RuntimeError("training_windows changed its layout; update stages.window_positions to match")
    return inputs, targets, users, times


def recent_items(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, T) left-padded inputs -> (B, T, size): at position p, the ``size`` inputs up to and
    including p (oldest first, 0 = padding), i.e. the items just before the target y[:, p]."""
    return F.pad(x, (size - 1, 0)).unfold(1, size, 1) if size else x[:, :, None][:, :, :0]


def sampled_candidates(model: UR4Rec, states: torch.Tensor, targets: torch.Tensor, window: torch.Tensor,
                       hard: int, uniform: int, generator=None,
                       exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, d) states, (N,) targets, (N, L) items of each row's window -> candidates (N, 1 + H + K)
    (the target first) and a (N, 1 + H + K) mask of candidates to leave out of the softmax.

    Hard negatives: the ``hard`` items the backbone scores highest that are not in the row's
    window (its history, its future and the target) nor in ``exclude`` ((N, V + 1) bool: in
    training, all of the row's user's train items, since a window holds only max_len of them),
    i.e. the items full ranking must beat: it leaves the user's seen items out, and the items the
    user rates later are no negatives. Uniform: ``uniform`` items shared by the batch; copies of
    the target, of the row's hard negatives and of an earlier draw, and for each row the items
    ``exclude`` marks, are left out of its softmax, so no item counts twice in a row's softmax.
    """
    N = targets.size(0)
    candidates, left_out = [targets[:, None]], [torch.zeros(N, 1, dtype=torch.bool, device=targets.device)]
    if hard > 0:
        with torch.no_grad():
            own = score(states, model.item_vectors()).float()  # (N, V + 1) the backbone's scores
            own[:, 0] = float("-inf")
            own.scatter_(1, window, float("-inf"))
            if exclude is not None:
                own.masked_fill_(exclude, float("-inf"))
            values, items = own.topk(min(hard, model.n_items), dim=1)  # (N, H)
        candidates.append(items)
        left_out.append(values == float("-inf"))  # fewer items outside the window than H
    if uniform > 0:
        negatives = torch.randint(1, model.n_items + 1, (uniform,), generator=generator, device=targets.device)
        earlier, earlier_out = torch.cat(candidates, 1), torch.cat(left_out, 1)  # (N, 1 + H) target, hard
        # (N, K): a copy of the target or of one of the row's hard negatives, or a repeated draw
        own_items = ((negatives[None, :, None] == earlier[:, None, :]) & ~earlier_out[:, None, :]).any(2)
        own_items = own_items | (negatives[:, None] == negatives[None, :]).tril(-1).any(1)[None]
        candidates.append(negatives[None].expand(N, -1))
        if exclude is not None:
            own_items = own_items | exclude[:, negatives]
        left_out.append(own_items)
    return torch.cat(candidates, 1), torch.cat(left_out, 1)


def training_losses(model: UR4Rec, x, y, t, users, config: Config, generator=None, train_router: bool = True,
                    train_backbone: bool = False):
    """Named losses of one batch of windows: (B, W) inputs x, targets y, target positions t, (B,) users.

    ``recommendation``: softmax cross-entropy of each target against its candidates
    (``moe.train_candidates``), false negatives masked; ``alignment``: InfoNCE between the
    targets' multimodal projections and ID embeddings, weighted by 1 + alpha * surprise;
    ``load_balance`` (when the router trains and the gate is on); ``backbone`` (when the backbone trains): the
    Stage-1 objective (``train.loss``, a softmax over all items by default) on the backbone's
    own scores at every target. The sampled ``recommendation`` term then trains the residual
    (experts, router, gate, and the backbone only through the router and fusion inputs): its
    gradient to the base scores is removed, because a softmax over the target and sampled
    negatives is a weaker objective for full ranking than the softmax over all items that
    trained Stage 1 (Klenitskiy & Vasilev, "Turning Dross Into Gold Loss: is BERT4Rec really
    better than SASRec?", RecSys 2023).
    """
    moe = config.moe
    states, _ = model.encode(x)  # (B, W, d)
    if moe.train_candidates == "sampled":
        positions = y > 0  # every target, or rows_per_window of them drawn at random
        if 0 < moe.rows_per_window < y.size(1):
            draw = torch.rand(y.shape, generator=generator, device=y.device).masked_fill(~positions, -1.0)
            keep = draw.topk(moe.rows_per_window, dim=1).indices  # (B, R)
            positions = torch.zeros_like(positions).scatter_(1, keep, True) & positions
    elif moe.train_candidates in ("in_batch", "full"):
        positions = torch.zeros_like(y, dtype=torch.bool)
        positions[:, -1] = True  # the newest target of each window: windows end on a real target
    else:
        raise ValueError(f"moe.train_candidates must be sampled, in_batch or full, got {moe.train_candidates!r}")
    targets = y[positions]  # (N,)
    row_batch = torch.arange(len(y), device=y.device)[:, None].expand_as(y)[positions]  # (N,) window of each row
    width = max(model.memory.short_term_size, moe.similarity_window if moe.similarity else 0)
    recent = recent_items(x, width)[positions]  # (N, W) the items just before each target
    rows = model.read_memory(users[row_batch], states[positions], recent, before=t[positions])
    N = targets.size(0)
    arange = torch.arange(N, device=targets.device)
    if moe.train_candidates == "sampled":
        window = torch.cat([x, y], 1)[row_batch]  # (N, 2W) each row's window: history, future, target
        exclude = None if model.train_items is None else model.train_items[users[row_batch]]
        candidates, false_negative = sampled_candidates(model, rows.states, targets, window, moe.hard_negatives,
                                                        moe.num_negatives, generator, exclude)
        positive = torch.zeros(N, dtype=torch.long, device=targets.device)
    elif moe.train_candidates == "in_batch":
        candidates = targets[None].expand(N, N)  # (N, N)
        positive = arange
        own = torch.eye(N, dtype=torch.bool, device=targets.device)
        false_negative = (candidates == targets[:, None]) & ~own
        if model.train_items is not None:  # another row's target the user rated: no negative either
            false_negative |= model.train_items[users[row_batch]][:, targets] & ~own
    else:
        candidates = torch.arange(1, model.n_items + 1, device=targets.device)  # (V,) shared
        positive = targets - 1
        false_negative = None
        if model.train_items is not None:  # the user's other train items: no negatives
            false_negative = model.train_items[users[row_batch], 1:].clone()
            false_negative[arange, positive] = False
    out = model.score_rows(rows, candidates)
    logits = out.scores.float()
    if train_backbone:  # the base scores learn from the "backbone" term only (see the docstring)
        own = out.base_scores.float()  # (N, C): LN(h) . e_c + the (fixed) similarity terms
        logits = logits - own + own.detach()
    if false_negative is not None:
        logits = logits.masked_fill(false_negative, torch.finfo(logits.dtype).min)
    losses = {"recommendation": F.cross_entropy(logits, positive)}

    has_content = model.item_content_mask[targets]
    if moe.alignment_weight > 0 and bool(has_content.any()):
        items = targets[has_content]
        projections = model.alignment(model.item_image[items], model.item_text[items],
                                      model.item_image_mask[items], model.item_text_mask[items])  # (n, d)
        surprise = out.novelty[arange, positive][has_content]  # novelty of the target w.r.t. the memory
        losses["alignment"] = alignment_loss(projections, model.item_embedding(items), items,
                                             moe.alignment_temperature, surprise_weights(surprise, moe.surprise_alpha))
    if train_backbone:
        all_states = states[y > 0]  # (N', d) every target, whatever train_candidates is
        all_targets = y[y > 0]
        negatives = None
        if config.train.loss != "ce":
            negatives = sample_training_negatives(all_targets, model.n_items, config.train.num_negatives, generator)
        losses["backbone"] = recommendation_loss(config.train.loss, all_states, all_targets, model.item_vectors(),
                                                 negatives, config.train.label_smoothing)
    # with the gate off (g = 0) the router weighs nothing: a load-balancing term would only move it and, through
    # its input, the backbone, so the gate_off ablation would differ from the full model by more than the experts
    if train_router and model.expert_names and moe.load_balance_weight > 0 and moe.gate != "none":
        losses["load_balance"] = load_balancing_loss(out.router_weights[arange, positive], out.available[arange, positive])
    return losses


def _loss_weights(config: Config) -> dict[str, float]:
    return {"recommendation": 1.0, "alignment": config.moe.alignment_weight,
            "load_balance": config.moe.load_balance_weight, "backbone": 1.0}


def train_multimodal_epoch(model: UR4Rec, optimizer, trainable: dict, windows, config: Config, rng, generator,
                           epoch: int, uncertainty: UncertaintyWeighting | None = None) -> dict[str, float]:
    """One epoch over the windows; returns the mean of every named loss term and ``total``."""
    inputs, targets, users, times = windows
    model.train()
    for name, module in model.parameter_groups().items():
        if name not in trainable:
            module.eval()  # a frozen backbone keeps its dropout off
    lengths = (inputs > 0).sum(1)
    device = config.train.device
    sums: dict[str, float] = {}
    count = 0
    batches = length_bucketed_batches(lengths, config.train.batch_size, rng)
    epochs = config.moe.stage_epochs or config.train.epochs  # what a cosine schedule decays over, as train_stage runs
    for step, rows in enumerate(batches):
        width = int(lengths[rows].max())
        x, y, t = (torch.from_numpy(array[rows, -width:]).to(device) for array in (inputs, targets, times))
        u = torch.from_numpy(users[rows]).to(device)
        with autocast(config):
            losses = training_losses(model, x, y, t, u, config, generator, "router" in trainable,
                                     "backbone" in trainable)
            terms = combine_losses(losses, _loss_weights(config), uncertainty)
        for name, value in terms.items():
            if not torch.isfinite(value):
                raise NonFiniteLossError(f"loss term {name!r} is {value.item()} at epoch {epoch}, step {step}")
        for group in optimizer.param_groups:  # the trainer's warm-up/cosine schedule, scaled per group
            group["lr"] = learning_rate(config, epoch, step, len(batches), epochs) * group["lr_scale"]
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        if config.train.grad_clip > 0:
            for parameters in trainable.values():  # per group: the straight-through expert gradient
                torch.nn.utils.clip_grad_norm_(parameters, config.train.grad_clip)  # cannot starve the backbone
        optimizer.step()
        n = len(rows)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.item() * n
        count += n
    return {name: value / count for name, value in sums.items()}


@torch.no_grad()
def similarity_fit_inputs(model: UR4Rec, inputs, config: Config, rows: torch.Tensor):
    """What the similarity weights are fitted on, for the users at ``rows`` of ``inputs``:
    (base (N, V+1) scores without the similarity terms, -inf where the ranking leaves an item
    out; terms (N, S, V+1); targets (N,)). The weights then enter as ``base + w . terms``.
    Put the model in eval mode first (dropout would make the scores noise)."""
    similarity = model.similarity
    device = similarity.weight.device
    current = similarity.weight.detach().float()
    bases, terms, targets = [], [], []
    for start in range(0, len(rows), config.eval.batch_size):
        batch = rows[start : start + config.eval.batch_size]
        users, histories = inputs.users[batch].to(device), inputs.input_ids[batch].to(device)
        term = similarity.terms(users, histories)  # (B, S, V + 1)
        base = model.score_all(users, histories).float() - torch.einsum("k,bkv->bv", current, term)
        target = inputs.targets[batch].to(device)
        excluded = excluded_items(inputs, batch, base.size(1), config.eval.exclude_seen, target)
        bases.append(base.masked_fill(excluded, float("-inf")))
        terms.append(term)
        targets.append(target)
    return torch.cat(bases), torch.cat(terms), torch.cat(targets)


def fit_similarity_weights(base: torch.Tensor, terms: torch.Tensor, targets: torch.Tensor,
                           initial: torch.Tensor) -> torch.Tensor:
    """(S,) weights minimising the cross-entropy of ``targets`` under ``base + w . terms``
    (L-BFGS from ``initial``); inputs as :func:`similarity_fit_inputs` returns them."""
    # float64: in float32 the loss's changes near the optimum fall below L-BFGS's tolerance, and it
    # could stop where it started (the previous validation's weights) with a gradient left
    base, terms = base.double(), terms.double()
    weight = initial.detach().double().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(base + torch.einsum("k,bkv->bv", weight, terms), targets)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach().to(initial.dtype)


@torch.no_grad()
def fit_similarity(model: UR4Rec, inputs, config: Config, max_users: int = 4096) -> dict[str, float]:
    """Fit the history-similarity weights on held-out items (stacking); returns them by source.

    Minimises the cross-entropy of each validation target under a softmax over the items the
    ranking considers (the user's seen items left out, as in evaluation), over the weights
    only, everything else fixed (L-BFGS; at most ``max_users`` users, a fixed sample). Why not
    the train part: the backbone was trained on those items and scores them far more surely
    than held-out ones (NDCG@10 0.22 against 0.12 on ML-100K), so there a side signal looks
    nearly useless and its fitted weight comes out 4-8x too small (measured, docs/experiments.md).
    One scalar per source fitted on 943 users, like the blend weight of `benchmarks/text_signal_ml100k.py`;
    test items are never used. Fitting on the validation users flatters their own figure by
    about 0.001 NDCG@10 on ML-100K (`benchmarks/similarity_flattery.py`).
    """
    if not hasattr(model, "similarity"):
        return {}
    similarity = model.similarity
    users_all = torch.arange(len(inputs.users))
    if len(users_all) > max_users:
        users_all = torch.from_numpy(np.sort(np.random.default_rng(0).choice(len(users_all), max_users, replace=False)))
    with eval_mode(model):
        base, terms, targets = similarity_fit_inputs(model, inputs, config, users_all)
    weight = fit_similarity_weights(base, terms, targets, similarity.weight)
    similarity.weight.copy_(weight)
    return {name: float(value) for name, value in zip(similarity.sources, weight)}


def _gate_value(model: UR4Rec) -> float:
    return float(model.gate.value.detach().float().mean())


def model_state(model: UR4Rec) -> dict:
    """The gate value and the similarity weights of ``model``, as the training history records
    them for each epoch (``ur4rec evaluate`` checks the kept epoch's against the saved weights)."""
    state = {"gate": _gate_value(model)}
    if hasattr(model, "similarity"):
        state["similarity_weights"] = {name: float(value) for name, value in
                                       zip(model.similarity.sources, model.similarity.weight.detach())}
    return state


def train_stage(config: Config, dataset: SequenceDataset, features, run_dir: Path, stage: int,
                skip_stage2: bool = False) -> StageResult:
    """Train ``stage`` (1, 2 or 3) to early stopping and write ``RUN/stageN/`` (see the module docstring)."""
    if stage == 1:
        return train_stage1(config, dataset, run_dir)
    spec = stage_spec(stage, skip_stage2)
    previous = check_previous_stage(run_dir, spec, dataset.fingerprint, skip_stage2, config, features)
    set_threads(config)
    torch.manual_seed(config.train.seed)
    rng = np.random.default_rng(config.train.seed)
    device = config.train.device
    generator = torch.Generator(device=device).manual_seed(config.train.seed)
    model = build_ur4rec(config, dataset, features)
    report = load_stage_weights(model, previous, spec)
    # what the data may refuse (too few unseen items to sample) before the finished stages move aside
    windows = _checked_windows(dataset, config.data.max_len)
    negatives = sample_negatives(dataset, config.eval.num_sampled_negatives, config.eval.sample_seed)
    valid_inputs = build_eval_inputs(dataset, "valid", config.data.max_len, negatives)
    out = start_stage(run_dir, stage, config)
    log_path = out / "log.jsonl"
    model.to(device)
    trainable = apply_stage(model, spec)
    uncertainty = None
    if config.moe.loss_weighting == "uncertainty":
        uncertainty = UncertaintyWeighting(list(_loss_weights(config))).to(device)
    elif config.moe.loss_weighting != "fixed":
        raise ValueError(f"moe.loss_weighting must be fixed or uncertainty, got {config.moe.loss_weighting!r}")
    lr = config.train.learning_rate
    param_groups = [{"params": params, "lr_scale": config.moe.backbone_lr_scale if name == "backbone" else 1.0}
                    for name, params in trainable.items()]
    if uncertainty is not None:
        param_groups.append({"params": list(uncertainty.parameters()), "lr_scale": 1.0})
    optimizer = torch.optim.AdamW(param_groups, lr=lr, weight_decay=config.train.weight_decay)

    skipped = ["stage2"] if stage == 3 and skip_stage2 else []
    base_info = {
        "stage": stage, "config": config.to_dict(), "data_fingerprint": dataset.fingerprint,
        "features_fingerprint": features_fingerprint(features), "n_items": dataset.n_items,
        "n_users": dataset.n_users, "loaded_from": {"stage": spec.previous, "groups": list(report.loaded)},
        "load_report": report.as_dict(), "skipped": skipped,
    }
    gate_history = [{"epoch": 0, "gate": _gate_value(model)}]
    epochs = config.moe.stage_epochs or config.train.epochs
    # Epoch 0 = the loaded weights (similarity weights fitted): the stage keeps them unless an epoch
    # beats them on validation (continued training first regresses from a validation maximum).
    weights = fit_similarity(model, valid_inputs, config)
    result = evaluate(model, valid_inputs, config.eval, device)
    epoch_ranks = EpochRanks(out / "valid_ranks_by_epoch.csv", dataset)
    epoch_ranks.add(0, result.rank_full)
    best_value = result.metrics["full"][config.eval.select_metric]
    best_epoch, waited, epoch_seconds = 0, 0, []
    save_checkpoint(out, model, {**base_info, "epoch": 0, "similarity_weights": weights, "best": {
        "metric": f"valid/full/{config.eval.select_metric}", "value": best_value}})
    start_all = time.perf_counter()
    label = f"stage {spec.name.removeprefix('stage')}"  # as Stage 1's bar and the CLI's summary
    bar = tqdm(range(1, epochs + 1), desc=label, unit="epoch", disable=not config.train.progress)
    for epoch in bar:
        start = time.perf_counter()
        try:
            with deterministic_kernels(device):
                losses = train_multimodal_epoch(model, optimizer, trainable, windows, config, rng, generator, epoch,
                                                uncertainty)
        except NonFiniteLossError as error:
            raise NonFiniteLossError(f"{error}; {kept_checkpoint(out, best_epoch)}") from None
        epoch_seconds.append(time.perf_counter() - start)
        gate_history.append({"epoch": epoch, "gate": _gate_value(model)})
        record = {"epoch": epoch, "seconds": round(epoch_seconds[-1], 4), "train_loss": losses["total"],
                  "losses": {k: v for k, v in losses.items() if k != "total"}, "gate": gate_history[-1]["gate"],
                  "lr": max(group["lr"] for group in optimizer.param_groups)}
        if uncertainty is not None:
            record["log_variances"] = {k: float(v) for k, v in uncertainty.log_variances.items()}
        improved = False
        if epoch % config.train.eval_every == 0 or epoch == epochs:
            try:
                weights = fit_similarity(model, valid_inputs, config)
                result = evaluate(model, valid_inputs, config.eval, device)
            except FloatingPointError as error:
                raise non_finite_weights(error, epoch, out, best_epoch) from None
            epoch_ranks.add(epoch, result.rank_full)
            valid = record["valid"] = result.metrics
            if weights:
                record["similarity_weights"] = weights
            value = valid["full"][config.eval.select_metric]
            improved = value > best_value
            if improved:
                best_value, best_epoch, waited = value, epoch, 0
            else:
                waited += 1
            bar.set_postfix(loss=f"{losses['total']:.4f}", gate=f"{gate_history[-1]['gate']:.4g}",
                            **{config.eval.select_metric: f"{value:.4f}"})
        append_log(log_path, record)  # before the checkpoint: a stop while it is written keeps the epoch's line
        write_json(out / "internals" / "gate.json", {"gate": gate_history})
        if improved:
            save_checkpoint(out, model, {**base_info, "epoch": epoch, "similarity_weights": weights, "best": {
                "metric": f"valid/full/{config.eval.select_metric}", "value": best_value}})
        if waited >= config.train.patience:
            break
    total_seconds = time.perf_counter() - start_all

    metrics, _ = evaluate_multimodal_stage(run_dir, dataset, features, config, stage)
    return StageResult(best_epoch, best_value, len(epoch_seconds), float(np.mean(epoch_seconds)),
                       total_seconds, metrics)


# --------------------------------------------------------------------------- evaluation and internals


def evaluate_multimodal_stage(run_dir: Path, dataset: SequenceDataset, features, config: Config, stage: int,
                              into: Path | None = None) -> tuple[dict, dict]:
    """Reload the stage's best checkpoint, evaluate it on validation and test, and write
    metrics.json, the ranks files and the internals into ``into`` (the stage directory unless
    given: ``ur4rec evaluate`` writes elsewhere and compares, :mod:`ur4rec.reproduce`).

    Returns the metrics and :func:`model_state` of the reloaded weights (what ``evaluate``
    checks the training history's kept epoch against)."""
    out = stage_dir(run_dir, stage)
    into = out if into is None else Path(into)
    into.mkdir(parents=True, exist_ok=True)
    model, _ = load_stage_model(out, features, dataset)
    device = config.train.device
    model.to(device)
    negatives = sample_negatives(dataset, config.eval.num_sampled_negatives, config.eval.sample_seed)
    metrics, results = {}, {}
    for split in ("valid", "test"):
        inputs = build_eval_inputs(dataset, split, config.data.max_len, negatives)
        results[split] = (inputs, evaluate(model, inputs, config.eval, device))
        metrics[split] = results[split][1].metrics
    for split, (_, result) in results.items():
        write_ranks(into / f"{split}_ranks.csv", dataset, split, result.rank_full, result.rank_sampled)
    inputs, test = results["test"]
    write_internals(into / "internals", model, dataset, inputs, test.rank_full, config)
    write_json(into / "metrics.json", metrics)  # last: it marks the stage finished (rundir.start_stage)
    return metrics, model_state(model)


@torch.no_grad()
def write_internals(folder: Path, model: UR4Rec, dataset: SequenceDataset, inputs, rank_full: np.ndarray,
                    config: Config, top: int = 10) -> None:
    """router_weights.csv and expert_contributions.csv (each test user's target and top-10),
    attention.npz (backbone and cross-modal maps for a sample of users). gate.json is written
    during training."""
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    device = config.train.device
    names = list(model.expert_names)
    sources = list(model.similarity.sources) if hasattr(model, "similarity") else []
    k = min(top, model.n_items)
    all_candidates, router_rows, contribution_rows = [], [], []
    for start in range(0, len(inputs.users), config.eval.batch_size):
        batch = slice(start, start + config.eval.batch_size)
        users, histories = inputs.users[batch].to(device), inputs.input_ids[batch].to(device)
        scores = model.score_all(users, histories).float()  # (B, n_items + 1)
        targets = inputs.targets[batch].to(device)
        excluded = excluded_items(inputs, batch, scores.size(1), config.eval.exclude_seen, targets)  # as in evaluation
        best = scores.masked_fill(excluded, float("-inf")).topk(k, dim=1).indices  # (B, k)
        candidates = torch.cat([targets[:, None], best], 1)  # (B, 1 + k) target first
        all_candidates.append(candidates)
        out = model(users, histories, candidates, details=True)
        weights = out.router_weights.float().cpu().numpy()  # (B, 1 + k, E)
        parts = np.stack([out.scores.float().cpu().numpy(), out.backbone_scores.float().cpu().numpy()]
                         + [out.expert_scores[name].float().cpu().numpy() for name in names]
                         + [out.similarity_scores[name].float().cpu().numpy() for name in sources], -1)  # (B, 1+k, 2+E+S)
        for row, user in enumerate(users.tolist()):
            for column, item in enumerate(candidates[row].tolist()):
                key = [dataset.user_raw_ids[user], dataset.item_raw_ids[item], "target" if column == 0 else "top",
                       int(rank_full[user]) if column == 0 else column]
                router_rows.append(key + [round(float(w), 6) for w in weights[row, column]])
                contribution_rows.append(key + [round(float(v), 6) for v in parts[row, column]])
    header = ["user_id", "item_id", "role", "rank"]
    _write_csv(folder / "router_weights.csv", header + names, router_rows)
    _write_csv(folder / "expert_contributions.csv", header + ["score", "backbone"] + names
               + [f"similarity_{name}" for name in sources], contribution_rows)

    sample = np.random.default_rng(config.train.seed).choice(
        len(inputs.users), size=min(config.moe.attention_sample_users, len(inputs.users)), replace=False)
    sample = torch.from_numpy(np.sort(sample))
    users, histories = inputs.users[sample].to(device), inputs.input_ids[sample].to(device)
    candidates = torch.cat(all_candidates)[sample.to(device)]  # (S, 1 + k)
    out = model(users, histories, candidates, need_weights=True, details=False)
    arrays = {"users": users.cpu().numpy(), "input_ids": histories.cpu().numpy(), "candidates": candidates.cpu().numpy(),
              "memory_items": out.memory_items.cpu().numpy(), "memory_slots": out.memory_slots.cpu().numpy()}
    for layer, weights in enumerate(out.attentions):
        arrays[f"backbone_layer{layer}"] = weights.float().cpu().numpy()  # (S, nh, T, T)
    for name, weights in out.cross_attentions.items():
        arrays[f"cross_{name}"] = weights.float().cpu().numpy()  # visual (S,C,K), semantic (S,C,K,nh), fusion (S,C,2)
    np.savez_compressed(folder / "attention.npz", **arrays)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
