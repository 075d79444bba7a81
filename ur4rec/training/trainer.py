"""Centralised Stage-1 training: a few named functions, not a class hierarchy.

Every train interaction is a target exactly once per epoch. Each user's train sequence
``s_1..s_m`` gives inputs ``s_1..s_{m-1}`` and targets ``s_2..s_m``, cut from the end into
windows of ``max_len`` (the newest window is full; the oldest may be shorter and is
left-padded). Windows are batched by length so a batch carries little padding, and batches
are shuffled. Padded targets (id 0) are outside the loss.

Items that share a timestamp have no order in the data (half of ML-100K's consecutive pairs:
users rated many films in the same second), so with ``train.shuffle_ties`` each epoch puts
them in a fresh random order (:func:`shuffle_ties`) instead of always training on the split's
fixed tie-break order. ``train.tie_gap`` widens "tied" to items at most that many seconds
after the one before them (ML-100K's config uses 60: most users rated in one sitting).
Validation and test inputs keep the split's order.

After each evaluation the best model (validation ``eval.select_metric``, full ranking) is
written to ``RUN/stage1/``; a non-finite loss stops the run with :class:`NonFiniteLossError`
naming the loss term, epoch and step, and that best checkpoint stays.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ur4rec.config import Config
from ur4rec.data.dataset import SequenceDataset
from ur4rec.evaluation.evaluate import EvalInputs, build_eval_inputs, evaluate, sample_negatives
from ur4rec.models.losses import LOSSES, recommendation_loss
from ur4rec.models.losses import sample_negatives as sample_training_negatives
from ur4rec.precision import autocast as precision_autocast
from ur4rec.precision import check_device, resolve_precision
from ur4rec.rundir import EpochRanks, append_log, stage_dir, start_stage, write_json, write_ranks
from ur4rec.training.checkpoint import build_model, load_model, save_checkpoint


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the term, epoch and step."""


def shuffle_ties(sequence: np.ndarray, timestamps: np.ndarray | None, rng: np.random.Generator,
                 gap: int = 0) -> np.ndarray:
    """``sequence`` (in time order) with the items of each tied run in random order.

    A run is a maximal stretch of items each at most ``gap`` seconds after the one before it;
    ``gap = 0``: items with equal timestamps.
    """
    if timestamps is None:
        return sequence
    runs = np.concatenate([[0], np.cumsum(np.diff(timestamps) > gap)])  # run id of each item, in time order
    return sequence[np.lexsort((rng.random(len(sequence)), runs))]


def training_windows(dataset: SequenceDataset, max_len: int,
                     rng: np.random.Generator | None = None, tie_gap: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(W, max_len) left-padded inputs and targets covering every train interaction once.

    With ``rng``, each user's tied items (at most ``tie_gap`` seconds apart) are first
    shuffled (:func:`shuffle_ties`).
    """
    inputs, targets = [], []
    for user in range(dataset.n_users):
        sequence = dataset.train_sequence(user)
        if rng is not None:
            sequence = shuffle_ties(sequence, dataset.train_timestamps(user), rng, tie_gap)
        x, y = sequence[:-1], sequence[1:]
        for end in range(len(y), 0, -max_len):
            start = max(0, end - max_len)
            row_x = np.zeros(max_len, dtype=np.int64)
            row_y = np.zeros(max_len, dtype=np.int64)
            row_x[max_len - (end - start):] = x[start:end]
            row_y[max_len - (end - start):] = y[start:end]
            inputs.append(row_x)
            targets.append(row_y)
    check_train_targets(dataset)
    return np.stack(inputs), np.stack(targets)


def check_train_targets(dataset: SequenceDataset) -> None:
    """A ValueError when no train interaction has one before it to be predicted from."""
    if not any(len(dataset.train_sequence(user)) > 1 for user in range(dataset.n_users)):
        raise ValueError(f"{dataset.name}: no user has two or more train interactions")


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of window indices, each batch of similar lengths."""
    order = rng.permutation(len(lengths))
    order = order[np.argsort(-lengths[order], kind="stable")]  # longest first, random among equals
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class StageResult:
    best_epoch: int
    best_value: float
    epochs_run: int
    seconds_per_epoch: float
    total_seconds: float
    metrics: dict


def kept_checkpoint(out: Path, best_epoch: int) -> str:
    """What a stopped stage leaves behind, for its error message."""
    if (out / "checkpoint.json").exists():
        return f"{out} keeps the checkpoint of epoch {best_epoch}, the best before it, and the log up to it"
    return f"no epoch of {out.name} finished, so it has no checkpoint"


def non_finite_weights(error: FloatingPointError, epoch: int, out: Path, best_epoch: int) -> FloatingPointError:
    """The error for a validation after ``epoch`` that met non-finite scores: every loss of the epoch
    was finite, but its last steps left weights that are not."""
    return FloatingPointError(f"{error} after epoch {epoch}: its last steps left non-finite weights (each loss "
                              f"was finite); {kept_checkpoint(out, best_epoch)}")


def set_threads(config: Config) -> None:
    """Before a stage trains: torch's CPU threads, and a device that exists here."""
    check_device(config.train.device, "train.device")
    if config.train.threads > 0:
        torch.set_num_threads(config.train.threads)


@contextlib.contextmanager
def deterministic_kernels(device: str):
    """Same seed, same weights: on CPU, PyTorch's deterministic kernels while Stages 2-3 train. Without
    them the backward of advanced indexing (``table[index]``, an ``index_put_`` that accumulates) adds
    the gradients of repeated indices in whatever order two threads reach them: two Stage-3 runs of
    one seed on ML-100K with 2 threads differed from the first epoch on. Stage 1 does not need it
    (its losses gather with ``F.embedding``) and would pay for it: its epoch took 2.7 s instead of
    0.96 s with the switch on. Other devices are left as they are (CUDA's deterministic mode needs
    more than this switch)."""
    if torch.device(device).type != "cpu":
        yield
        return
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def autocast(config: Config):
    """Training autocast: ``train.precision`` on ``train.device`` (see :mod:`ur4rec.precision`)."""
    resolve_precision(config.train.precision, config.train.device, "train.precision")
    return precision_autocast(config.train.precision, config.train.device)


def learning_rate(config: Config, epoch: int, step: int, steps_per_epoch: int, epochs: int | None = None) -> float:
    """Learning rate at (1-based epoch, 0-based step): linear warm-up, then constant or cosine
    (to 0 over the stage's ``epochs``: ``train.epochs`` unless given)."""
    base, train = config.train.learning_rate, config.train
    progress = (epoch - 1) + step / steps_per_epoch  # epochs done, fractional
    if progress < train.warmup_epochs:
        return base * (progress + 1 / steps_per_epoch) / train.warmup_epochs
    if train.lr_schedule == "constant":
        return base
    if train.lr_schedule == "cosine":
        span = max((epochs or train.epochs) - train.warmup_epochs, 1)
        return base * 0.5 * (1 + math.cos(math.pi * min((progress - train.warmup_epochs) / span, 1.0)))
    raise ValueError(f"train.lr_schedule must be constant or cosine, got {train.lr_schedule!r}")


def train_epoch(model, optimizer, inputs, targets, config: Config, rng, generator, epoch: int) -> float:
    model.train()
    lengths = (inputs > 0).sum(1)
    batches = length_bucketed_batches(lengths, config.train.batch_size, rng)
    device = config.train.device
    total, count = 0.0, 0
    for step, rows in enumerate(batches):
        width = int(lengths[rows].max())
        x = torch.from_numpy(inputs[rows, -width:]).to(device)  # (B, width): drop all-padding columns
        y = torch.from_numpy(targets[rows, -width:]).to(device)
        target_positions = y > 0
        with autocast(config):
            states = model(x).states[target_positions]  # (N, d) only positions with a target
            y_valid = y[target_positions]
            negatives = None
            if config.train.loss != "ce":
                negatives = sample_training_negatives(y_valid, model.n_items, config.train.num_negatives, generator)
            loss = recommendation_loss(config.train.loss, states, y_valid, model.item_vectors(), negatives,
                                       config.train.label_smoothing)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss term {config.train.loss!r} is {loss.item()} at epoch {epoch}, step {step}"
            )
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, epoch, step, len(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        n = int(target_positions.sum())
        total += loss.item() * n
        count += n
    return total / count


def train_stage1(config: Config, dataset: SequenceDataset, run_dir: Path) -> StageResult:
    """Train SASRec to early stopping, keep the best checkpoint, evaluate it, write the stage."""
    if config.train.loss not in LOSSES:
        raise ValueError(f"train.loss must be one of {LOSSES}, got {config.train.loss!r}")
    set_threads(config)
    torch.manual_seed(config.train.seed)
    rng = np.random.default_rng(config.train.seed)
    generator = torch.Generator(device=config.train.device).manual_seed(config.train.seed)
    model = build_model(config, dataset.n_items).to(config.train.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.learning_rate,
                                  weight_decay=config.train.weight_decay)
    # what the data may refuse (no train target, too few unseen items to sample) before the finished stages move aside
    check_train_targets(dataset)
    fixed_windows = None if config.train.shuffle_ties else training_windows(dataset, config.data.max_len)
    negatives = sample_negatives(dataset, config.eval.num_sampled_negatives, config.eval.sample_seed)
    valid_inputs = build_eval_inputs(dataset, "valid", config.data.max_len, negatives)
    out = start_stage(run_dir, 1, config)
    log_path = out / "log.jsonl"

    epoch_ranks = EpochRanks(out / "valid_ranks_by_epoch.csv", dataset)
    best_value, best_epoch, waited, epoch_seconds = -1.0, 0, 0, []
    start_all = time.perf_counter()
    bar = tqdm(range(1, config.train.epochs + 1), desc="stage 1", unit="epoch", disable=not config.train.progress)
    for epoch in bar:
        start = time.perf_counter()
        inputs, targets = fixed_windows or training_windows(dataset, config.data.max_len, rng, config.train.tie_gap)
        try:
            train_loss = train_epoch(model, optimizer, inputs, targets, config, rng, generator, epoch)
        except NonFiniteLossError as error:
            raise NonFiniteLossError(f"{error}; {kept_checkpoint(out, best_epoch)}") from None
        epoch_seconds.append(time.perf_counter() - start)
        record = {"epoch": epoch, "seconds": round(epoch_seconds[-1], 4), "train_loss": train_loss,
                  "lr": optimizer.param_groups[0]["lr"]}
        improved = False
        if epoch % config.train.eval_every == 0 or epoch == config.train.epochs:
            try:
                result = evaluate(model, valid_inputs, config.eval, config.train.device)
            except FloatingPointError as error:
                raise non_finite_weights(error, epoch, out, best_epoch) from None
            epoch_ranks.add(epoch, result.rank_full)
            valid = record["valid"] = result.metrics
            value = valid["full"][config.eval.select_metric]
            improved = value > best_value
            if improved:
                best_value, best_epoch, waited = value, epoch, 0
            else:
                waited += 1
            bar.set_postfix(loss=f"{train_loss:.4f}", **{config.eval.select_metric: f"{value:.4f}"})
        append_log(log_path, record)  # before the checkpoint: a stop while it is written keeps the epoch's line
        if improved:
            save_checkpoint(out, model, _checkpoint_info(config, dataset, epoch, best_value))
        if waited >= config.train.patience:
            break
    total_seconds = time.perf_counter() - start_all

    metrics = evaluate_stage(run_dir, dataset, config)
    return StageResult(best_epoch, best_value, len(epoch_seconds), float(np.mean(epoch_seconds)),
                       total_seconds, metrics)


def _checkpoint_info(config: Config, dataset: SequenceDataset, epoch: int, value: float) -> dict:
    return {
        "stage": 1,
        "epoch": epoch,
        "best": {"metric": f"valid/full/{config.eval.select_metric}", "value": value},
        "config": config.to_dict(),
        "data_fingerprint": dataset.fingerprint,
        "n_items": dataset.n_items,
    }


def evaluate_stage(run_dir: Path, dataset: SequenceDataset, config: Config, stage: int = 1,
                   into: Path | None = None) -> dict:
    """Reload the stage's best checkpoint, evaluate it on validation and test, and write
    metrics.json and the ranks files into ``into`` (the stage directory unless given:
    ``ur4rec evaluate`` writes elsewhere and compares, :mod:`ur4rec.reproduce`)."""
    out = stage_dir(run_dir, stage)
    into = out if into is None else Path(into)
    into.mkdir(parents=True, exist_ok=True)
    model, _ = load_model(out, fingerprint=dataset.fingerprint)
    model.to(config.train.device)
    negatives = sample_negatives(dataset, config.eval.num_sampled_negatives, config.eval.sample_seed)
    metrics, results = {}, {}
    for split in ("valid", "test"):
        inputs: EvalInputs = build_eval_inputs(dataset, split, config.data.max_len, negatives)
        results[split] = evaluate(model, inputs, config.eval, config.train.device)
        metrics[split] = results[split].metrics
    for split, result in results.items():
        write_ranks(into / f"{split}_ranks.csv", dataset, split, result.rank_full, result.rank_sampled)
    write_json(into / "metrics.json", metrics)  # last: it marks the stage finished (rundir.start_stage)
    return metrics
