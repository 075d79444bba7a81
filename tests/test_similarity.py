import types

import numpy as np
import pytest
import torch

from ur4rec.models.similarity import HistorySimilarity

V_ITEMS, N_USERS = 9, 5


def make_inputs(seed=0):
    rng = np.random.default_rng(seed)
    sequences = [rng.choice(np.arange(1, V_ITEMS + 1), size=int(rng.integers(2, 7)), replace=False)
                 for _ in range(N_USERS)]
    text = rng.normal(size=(V_ITEMS + 1, 6)).astype(np.float32)
    mask = np.r_[False, rng.random(V_ITEMS) < 0.8]
    features = types.SimpleNamespace(item_text=text, item_text_mask=mask, item_image=None, item_image_mask=None)
    return sequences, features


def brute_force(sequences, features, users, recent, window):
    """Per (row, item): mean over the row's last ``window`` non-padding items j of
    text: cos(f_j, f_c) (0 where either has no text, or j == c);
    collaborative: #{other users with j and c} / sqrt(#users with j * #users with c) (0 if j == c)."""
    V = V_ITEMS + 1
    sets = [set(int(i) for i in s) for s in sequences]
    n = np.array([max(sum(i in s for s in sets), 1) for i in range(V)], dtype=np.float64)
    unit = features.item_text / np.linalg.norm(features.item_text, axis=1, keepdims=True)
    text, collab = np.zeros((len(users), V)), np.zeros((len(users), V))
    for row, (user, items) in enumerate(zip(users, recent)):
        history = [int(j) for j in items[-window:] if j > 0]
        for c in range(V):
            t_sum = c_sum = 0.0
            for j in history:
                if j == c:
                    continue
                if features.item_text_mask[j] and features.item_text_mask[c]:
                    t_sum += float(unit[j] @ unit[c])
                others = sum(1 for v, s in enumerate(sets) if v != user and j in s and c in s)
                c_sum += others / np.sqrt(n[j] * n[c])
            text[row, c] = t_sum / max(len(history), 1)
            collab[row, c] = c_sum / max(len(history), 1)
    return text, collab


@pytest.mark.parametrize("window", [1, 3])
def test_profiles_match_a_hand_computation_with_the_users_own_row_left_out(window):
    sequences, features = make_inputs()
    module = HistorySimilarity(["text", "collaborative"], window, V_ITEMS, features, sequences)
    users = torch.tensor([0, 1, 2, 3, 4, 0])
    left_padded = [np.r_[np.zeros(max(0, 4 - len(s)), dtype=np.int64), s[-4:]] for s in sequences[1:]]
    outside = next(i for i in range(1, V_ITEMS + 1) if i not in sequences[0])  # e.g. a validation item in a test row
    inside = int(sequences[0][0])
    recent = torch.tensor(np.stack([np.zeros(4, dtype=np.int64), *left_padded, [inside, inside, 0, outside]]))
    # an all-padding row, the users' own latest items (newest last), a repeat and an item outside the train part
    profiles = module.terms(users, recent)  # (N, 2, V + 1)
    text, collab = brute_force(sequences, features, users.tolist(), recent.numpy(), window)
    assert profiles.shape == (6, 2, V_ITEMS + 1)
    np.testing.assert_allclose(profiles[:, 0].numpy(), text, atol=1e-5)
    np.testing.assert_allclose(profiles[:, 1].numpy(), collab, atol=1e-5)
    assert (profiles[0] == 0).all()  # no history: no term


def test_a_training_target_gets_no_credit_for_its_own_users_row():
    # Two users; only user 0 has both items 1 and 2: for user 0 the co-occurrence of 2 with 1 is
    # nobody else's, so the term must be 0, while for user 1 (who has item 1 only) it is user 0's.
    sequences = [np.array([1, 2]), np.array([1, 3])]
    features = types.SimpleNamespace(item_text=np.eye(4, dtype=np.float32), item_text_mask=np.ones(4, bool),
                                     item_image=None, item_image_mask=None)
    module = HistorySimilarity(["collaborative"], 5, 3, features, sequences)
    profiles = module.terms(torch.tensor([0, 1]), torch.tensor([[0, 1], [0, 1]]))[:, 0]
    assert profiles[0, 2] == 0
    assert profiles[1, 2] == pytest.approx(1 / np.sqrt(2 * 1))


def test_unknown_source_window_and_size_limits_are_clear_errors():
    sequences, features = make_inputs()
    with pytest.raises(ValueError, match="unknown source 'audio'"):
        HistorySimilarity(["audio"], 5, V_ITEMS, features, sequences)
    with pytest.raises(ValueError, match="similarity_window"):
        HistorySimilarity(["text"], 0, V_ITEMS, features, sequences)
    with pytest.raises(ValueError, match="needs the users' train sequences"):
        HistorySimilarity(["collaborative"], 5, V_ITEMS, features, None)
    with pytest.raises(ValueError, match=r"set moe.similarity to \[\]"):
        HistorySimilarity(["text"], 5, 30_000, None, None)
