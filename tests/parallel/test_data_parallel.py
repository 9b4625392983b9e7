import torch

from skipjack.testing import run_ranks
from skipjack.testing.reference import assert_same_history, tiny_config, train_reference

STEPS = 5


def run(world_size, micro_batch_size):
    return run_ranks(train_reference, world_size, tiny_config(), STEPS, 8, micro_batch_size)


def test_dp2_matches_single_process_in_loss_and_gradients():
    (single,) = run(1, 4)
    replicas = run(2, 2)
    for replica in replicas:
        assert_same_history(single, replica)
    # both replicas hold identical gradients after the all-reduce
    for name, g in replicas[0][0]["grads"].items():
        assert torch.equal(g, replicas[1][0]["grads"][name])


def test_gradient_accumulation_does_not_change_the_math():
    (one_micro,) = run(1, 8)
    (four_micro,) = run(1, 2)
    assert_same_history(one_micro, four_micro)
