"""Standard errors and paired differences of evaluation figures, against direct computations."""

import math
import statistics

import pytest

from alignment.eval_stats import mean_and_stderr, paired_difference, paired_gain, paired_gains, with_stderr


def test_the_stderr_of_an_accuracy_is_the_sample_deviation_over_root_n():
    correct = [1, 0, 1, 1, 0, 1, 1, 1]
    mean, stderr = mean_and_stderr(correct)
    assert mean == 0.75 and stderr == pytest.approx(statistics.stdev(correct) / math.sqrt(8))
    assert stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 7))  # p(1-p)/(n-1) for 0/1 scores
    assert mean_and_stderr([1]) == (1, 0.0)
    with pytest.raises(ValueError):
        mean_and_stderr([])


def test_a_paired_difference_is_much_tighter_than_the_two_errors_when_models_agree():
    before = [1] * 50 + [0] * 50
    after = [1] * 50 + [1] * 5 + [0] * 45  # the same answers but five more right
    diff, stderr = paired_difference(before, after)
    assert diff == pytest.approx(0.05)
    assert stderr == pytest.approx(statistics.stdev([0] * 95 + [1] * 5) / 10)  # from the per-row differences
    unpaired = math.hypot(mean_and_stderr(before)[1], mean_and_stderr(after)[1])
    assert stderr < unpaired / 2  # 0.022 against 0.071: "beyond two errors" only when paired
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference([1, 0], [1])


def test_gains_are_paired_only_over_the_same_rows():
    a = {"row_ids": ["r1", "r2", "r3"], "correct_think": [0, 1, 0], "accuracy_think": 1 / 3}
    b = {"row_ids": ["r1", "r2", "r3"], "correct_think": [1, 1, 0], "accuracy_think": 2 / 3}
    other_rows = {"row_ids": ["r1", "r2", "x"], "correct_think": [1, 1, 1], "accuracy_think": 1.0}
    assert paired_gain([0, 1, 0], [1, 1, 0], ["r1", "r2", "r3"], ["r1", "r2", "r3"])["difference"] == pytest.approx(1 / 3)
    gains = paired_gains({"sft": a, "dpo": b, "other": other_rows, "old": {"accuracy_think": 0.5}})
    assert gains["dpo"]["difference"] == pytest.approx(1 / 3) and gains["dpo"]["rows"] == 3
    assert gains["other"] is None and gains["old"] is None and "sft" not in gains
    assert with_stderr({"accuracy_think": 0.5, "accuracy_think_stderr": 0.029}, "accuracy_think") == "0.500 ± 0.029"
    assert with_stderr({"accuracy_think": 0.5}, "accuracy_think") == "0.500"  # results from before the errors


def test_pass_at_k_against_hand_counts():
    from alignment.eval_stats import pass_at_k

    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 3) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # pass@1: the fraction correct
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 3 of the 6 pairs of 4 hold the one correct sample
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 3 of the 10 pairs miss both correct samples
    assert pass_at_k(3, 1, 3) == 1.0  # k = n: any correct sample
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_the_majority_answer_counts_equal_answers_together_and_ignores_missing_ones():
    from alignment.eval_stats import majority_answer

    def same(a, b):
        return a.strip() == b.strip()

    assert majority_answer(["7", None, " 7", "8", None, None], same) == "7"  # None is no answer, never a vote
    assert majority_answer(["8", "7", "7", "8"], same) == "8"  # a tie: the first given
    assert majority_answer([None, None], same) is None


def test_the_sampling_stderr_is_the_spread_of_the_mean_of_k_draws_per_prompt():
    from alignment.eval_stats import sampling_stderr

    # Prompt fractions 1/4 and 3/4 of k = 4: within-prompt variances (1/4)(3/4)(4/3) = 1/4 each; the mean of the two
    # prompts' fractions has variance (1/4 + 1/4) / 4 / 2^2 = 1/32.
    assert sampling_stderr([0.25, 0.75], 4) == pytest.approx(math.sqrt(1 / 32))
    assert sampling_stderr([1.0, 0.0], 4) == 0.0  # every prompt always right or always wrong: no sampling noise
    assert sampling_stderr([0.5], 1) == 0.0
