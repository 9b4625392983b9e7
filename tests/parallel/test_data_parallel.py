import torch

from skipjack.testing import run_ranks
from skipjack.testing.reference import tiny_config, train_reference

STEPS = 5


def run(world_size, micro_batch_size):
    return run_ranks(train_reference, world_size, tiny_config(), STEPS, 8, micro_batch_size)


def assert_same_history(reference, other):
    for step, (ref, got) in enumerate(zip(reference, other, strict=True)):
        assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), step
        for name, g in ref["grads"].items():
            err = (got["grads"][name] - g).norm() / g.norm()
            assert err <= 1e-5, f"step {step} {name}: relative error {err:.2e}"


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
