"""The evaluation protocols on hand-made datasets and fixed scores: what full ranking leaves out,
which items the sampled protocol draws, and how both ranks are taken."""

import numpy as np
import pytest
import torch

from ur4rec.config import EvalConfig
from ur4rec.data.dataset import SequenceDataset
from ur4rec.data.movielens import ItemMeta
from ur4rec.evaluation import Popularity, build_eval_inputs, evaluate, sample_negatives
from ur4rec.evaluation.evaluate import left_pad

NO_NEGATIVES = np.zeros((1, 0), dtype=np.int64)


def tiny(sequences, n_items, timestamps=None) -> SequenceDataset:
    return SequenceDataset(name="t", source="t", user_raw_ids=np.array([str(u) for u in range(len(sequences))]),
                           item_raw_ids=np.array([""] + [str(i) for i in range(1, n_items + 1)]),
                           sequences=[np.array(s, dtype=np.int64) for s in sequences],
                           item_meta=[ItemMeta("x")] * (n_items + 1),
                           timestamps=None if timestamps is None else [np.array(t, dtype=np.int64) for t in timestamps])


class Fixed:
    """A model whose scores for items 0..V are the same for every user."""

    def __init__(self, scores):
        self.scores = torch.tensor(scores, dtype=torch.float32)

    def eval(self):
        return self

    def score_all(self, users, input_ids):
        return self.scores.expand(len(users), -1)


def full_rank(dataset, split, config, scores=(9, 10, 9, 5, 4, 8, 1)) -> int:
    return evaluate(Fixed(scores), build_eval_inputs(dataset, split, 5, NO_NEGATIVES), config).rank_full.tolist()


def test_full_ranking_excludes_the_seen_items_of_each_split_and_never_the_target():
    dataset = tiny([[1, 2, 3, 4]], 6)  # validation: history 1, 2 -> target 3; test: history 1, 2, 3 -> target 4
    config = EvalConfig(ks=[1], num_sampled_negatives=0)
    # scores of items 0..6 are 9, 10, 9, 5, 4, 8, 1 (padding high on purpose: it never counts)
    assert full_rank(dataset, "valid", config) == [2]  # 3 (tie: counts against) and 5 above 3; 1, 2 seen
    assert full_rank(dataset, "test", config) == [2]  # 4 below 5 only; 1, 2 and the validation item 3 seen
    assert full_rank(dataset, "valid", EvalConfig(ks=[1], num_sampled_negatives=0, exclude_seen=False)) == [4]
    # a target that also occurs earlier in the history is still ranked
    assert full_rank(tiny([[3, 1, 3, 2]], 6), "valid", config) == [3]  # items 2, 3 (tie) and 5


def test_sampled_negatives_are_unseen_distinct_fixed_per_seed_and_ranked_against_the_target():
    dataset = tiny([[1, 2, 3, 4], [10, 20, 30, 40]], 103)  # exactly 99 unseen items per user
    negatives = sample_negatives(dataset, 99, seed=5)
    assert negatives.shape == (2, 99)
    assert sorted(negatives[0]) == list(range(5, 104))
    assert sorted(negatives[1]) == sorted(set(range(1, 104)) - {10, 20, 30, 40})
    big = tiny([[1, 2, 3, 4]] * 3, 500)
    negatives = sample_negatives(big, 99, seed=5)
    assert (negatives > 0).all() and all(len(set(row)) == 99 for row in negatives)
    assert not np.isin(negatives, [1, 2, 3, 4]).any()
    assert (sample_negatives(big, 99, seed=5) == negatives).all()
    assert not (sample_negatives(big, 99, seed=6) == negatives).all()
    # scores = item ids: the sampled rank is 1 + the negatives with a higher id than the target (4)
    result = evaluate(Fixed(np.arange(501)), build_eval_inputs(big, "test", 5, negatives),
                      EvalConfig(ks=[10], num_sampled_negatives=99))
    assert result.rank_sampled.tolist() == [1 + int((row > 4).sum()) for row in negatives]


def test_too_few_unseen_items_for_the_sampled_protocol_is_an_error_saying_what_would_help():
    with pytest.raises(ValueError, match="user 0 has only 2 unseen items; lower eval.num_sampled_negatives"):
        sample_negatives(tiny([[1, 2, 3, 4], [1, 2, 3, 4, 5, 6]], 6), 3, seed=0)
    # no unseen item at all (a single user; a user who has seen every item): no value of the field helps
    with pytest.raises(ValueError, match="user 1 has interacted with every one of the 6 items") as error:
        sample_negatives(tiny([[1, 2, 3, 4], [1, 2, 3, 4, 5, 6]], 6), 1, seed=0)
    assert "lower eval.num_sampled_negatives" not in str(error.value)


def test_left_pad_keeps_the_newest_items():
    padded = left_pad([np.array([1, 2, 3]), np.array([5]), np.array([], dtype=np.int64)], 2)
    assert padded.tolist() == [[2, 3], [0, 5], [0, 0]]


def test_popularity_counts_train_parts_only():
    dataset = tiny([[1, 2, 3, 4], [1, 3, 2, 4]], 4)  # train parts [1, 2] and [1, 3]; 3, 4 and 2, 4 held out
    assert dataset.train_item_counts().tolist() == [0, 2, 1, 1, 0]
    assert Popularity(dataset).scores.tolist() == [0, 2, 1, 1, 0]


def test_evaluation_puts_every_submodule_back_in_its_own_mode():
    # a stage keeps its frozen groups in eval mode (no dropout) while the rest trains;
    # model.train() after evaluating would switch their dropout back on
    class Scorer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen, self.trained = torch.nn.Dropout(0.5), torch.nn.Dropout(0.5)
            self.scores = torch.tensor([9.0, 10, 9, 5, 4, 8, 1])

        def score_all(self, users, input_ids):
            assert not self.training and not self.frozen.training and not self.trained.training
            return self.scores.expand(len(users), -1)

    model = Scorer().train()
    model.frozen.eval()
    inputs = build_eval_inputs(tiny([[1, 2, 3, 4]], 6), "valid", 5, NO_NEGATIVES)
    evaluate(model, inputs, EvalConfig(ks=[1], num_sampled_negatives=0))
    assert (model.training, model.frozen.training, model.trained.training) == (True, False, True)


def test_batches_cover_every_user_once_whatever_their_size():
    # histories of different lengths: each user's seen items are all left out of its full ranking
    sequences = [[(u + step) % 7 + 1 for step in range(3 + u)] for u in range(5)]
    dataset = tiny(sequences, 7)
    inputs = build_eval_inputs(dataset, "test", 5, NO_NEGATIVES.repeat(5, axis=0))
    scores = np.arange(8, dtype=np.float32)
    whole = evaluate(Fixed(scores), inputs, EvalConfig(ks=[1], num_sampled_negatives=1, batch_size=64))
    assert len(whole.rank_full) == 5
    for batch_size in (1, 2, 3):
        result = evaluate(Fixed(scores), inputs, EvalConfig(ks=[1], num_sampled_negatives=1, batch_size=batch_size))
        assert result.rank_full.tolist() == whole.rank_full.tolist()
    # scores = item ids: the rank is 1 + the unseen items with a higher id than the target
    expected = [1 + len(set(range(s[-1] + 1, 8)) - set(s[:-1])) for s in sequences]
    assert whole.rank_full.tolist() == expected


def test_each_users_candidates_are_its_target_and_its_own_negatives():
    dataset = tiny([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]], 200)  # users with disjoint items
    negatives = sample_negatives(dataset, 99, seed=0)
    for split in ("valid", "test"):
        inputs = build_eval_inputs(dataset, split, 5, negatives)
        targets = dataset.target(split)
        assert inputs.candidates[:, 0].tolist() == targets.tolist()
        assert (inputs.candidates[:, 1:].numpy() == negatives).all()
        for user, sequence in enumerate(dataset.sequences):  # no item of the user's own among its negatives
            assert not np.isin(inputs.candidates[user, 1:].numpy(), sequence).any()
