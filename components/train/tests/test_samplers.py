"""Batch samplers: probabilities for hand-made histories, annealing endpoints, warm-up, validation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from components.train.samplers import (
    ActiveBiasSampler,
    Feedback,
    OnlineBatchSampler,
    RecencyBiasSampler,
    SamplerConfigError,
    build_sampler,
    default_warmup_epochs,
    normalized_entropy,
    selection_pressure,
)
from components.train.trainer import TrainConfig, TrainConfigError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_normalized_entropy_of_hand_made_windows() -> None:
    history = torch.tensor([
        [0, 0, 0, 0],      # always the same label: F = 0
        [0, 1, 2, 3],      # four labels once each, k = 4: F = 1
        [0, 0, 1, 1],      # two labels half-half: F = log 2 / log 4 = 0.5
        [-1, -1, -1, -1],  # never predicted: maximally uncertain
        [2, -1, -1, -1],   # one prediction so far: F = 0
    ])
    f = normalized_entropy(history, num_labels=4)
    assert f.tolist() == pytest.approx([0.0, 1.0, 0.5, 1.0, 0.0])


def test_recency_bias_weights_follow_the_quantized_rank_formula() -> None:
    n, s_e = 4, 100.0
    sampler = RecencyBiasSampler(n, 2, generator=_gen(), epochs=2, num_labels=4, q=4, s_e0=s_e,
                                 warmup_epochs=0)
    for labels in ([0, 1, 0, 0], [0, 1, 1, 0], [0, 2, 0, 0], [0, 3, 1, 0]):
        sampler.observe(Feedback(indices=torch.arange(n), predicted=torch.tensor(labels),
                                 true_prob=torch.zeros(n), loss=torch.zeros(n)))
    # windows: s0 = [0,0,0,0] F=0; s1 = [1,1,2,3] F=1.5/2=0.75 (p=.5,.25,.25); s2 = [0,1,0,1] F=.5; s3 = [0]*4 F=0
    f = sampler.uncertainty()
    assert f.tolist() == pytest.approx([0.0, 0.75, 0.5, 0.0])
    sampler.set_epoch(0)
    probs = sampler.probabilities()
    # Q = ceil((1 - F) * N): 4, 1, 2, 4; weight = (1 / exp(log(s_e) / N)) ** Q
    weights = torch.tensor([(1 / math.exp(math.log(s_e) / n)) ** q for q in (4, 1, 2, 4)])
    assert probs.tolist() == pytest.approx((weights / weights.sum()).tolist())
    assert float(probs.sum()) == pytest.approx(1.0)
    # the most certain sample is exactly s_e times less likely than an F = 1 sample would be
    assert float(weights[0]) == pytest.approx(1 / s_e)


def test_recency_bias_window_keeps_only_the_last_q_labels() -> None:
    sampler = RecencyBiasSampler(1, 1, generator=_gen(), epochs=1, num_labels=2, q=2, warmup_epochs=0)
    for label in (0, 1, 1):
        sampler.observe(Feedback(indices=torch.tensor([0]), predicted=torch.tensor([label]),
                                 true_prob=torch.zeros(1), loss=torch.zeros(1)))
    assert sorted(sampler.history[0].tolist()) == [1, 1]
    assert float(sampler.uncertainty()[0]) == 0.0


def test_annealing_starts_at_s_e0_and_ends_at_one() -> None:
    kw = {"s_e0": 100.0, "warmup_epochs": 2, "epochs": 12}
    assert selection_pressure(2, **kw) == pytest.approx(100.0)  # first epoch after warm-up
    assert selection_pressure(11, **kw) == pytest.approx(1.0)  # last epoch
    mid = selection_pressure(6, **kw)  # 4 of the 9 decay steps done: s_e0 ** (1 - 4/9)
    assert mid == pytest.approx(100.0 ** (1 - 4 / 9))
    values = [selection_pressure(e, **kw) for e in range(2, 12)]
    assert all(a > b for a, b in itertools.pairwise(values))


def test_warm_up_epochs_are_uniform_permutations() -> None:
    sampler = build_sampler("recency_bias", num_samples=10, batch_size=4, epochs=20, num_labels=3,
                            generator=_gen(), warmup_epochs=3)
    # make the histories very unequal: warm-up must ignore them
    sampler.observe(Feedback(indices=torch.arange(5), predicted=torch.zeros(5, dtype=torch.long),
                             true_prob=torch.zeros(5), loss=torch.zeros(5)))
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert [len(b) for b in batches] == [4, 4, 2]
        assert sorted(i for b in batches for i in b) == list(range(10))  # each sample exactly once
        assert sampler.probabilities().tolist() == pytest.approx([0.1] * 10)
    sampler.set_epoch(3)
    probs = sampler.probabilities()
    assert float(probs[9]) > float(probs[0])  # never predicted (F = 1) beats always-the-same (F = 0)


def test_adaptive_epochs_draw_uncertain_samples_more_often() -> None:
    n = 20
    sampler = build_sampler("recency_bias", num_samples=n, batch_size=5, epochs=10, num_labels=2,
                            generator=_gen(1), warmup_epochs=0, q=4)
    for step in range(4):  # samples 0..9 flip their label every step, 10..19 never change
        labels = torch.tensor([step % 2] * 10 + [0] * 10)
        sampler.observe(Feedback(indices=torch.arange(n), predicted=labels, true_prob=torch.zeros(n),
                                 loss=torch.zeros(n)))
    counts = torch.zeros(n)
    for _ in range(50):
        for batch in sampler:
            assert len(set(batch)) == len(batch)  # no repeats inside one batch
            counts[batch] += 1
    assert counts[:10].sum() > 5 * counts[10:].sum()


def test_online_batch_ranks_by_loss_with_exponential_decay() -> None:
    sampler = OnlineBatchSampler(4, 2, generator=_gen(), epochs=3, s_e0=8.0, warmup_epochs=0)
    sampler.observe(Feedback(indices=torch.arange(4), predicted=torch.zeros(4, dtype=torch.long),
                             true_prob=torch.zeros(4), loss=torch.tensor([0.1, 3.0, 1.0, 2.0])))
    probs = sampler.probabilities()
    ranks = [3, 0, 2, 1]  # highest loss first
    weights = torch.tensor([math.exp(-math.log(8.0) * r / 4) for r in ranks])
    assert probs.tolist() == pytest.approx((weights / weights.sum()).tolist())


def test_active_bias_prefers_high_variance_of_true_class_probability() -> None:
    sampler = ActiveBiasSampler(3, 1, generator=_gen(), epochs=3, q=4, warmup_epochs=0)
    for p in ([0.9, 0.2, 0.5], [0.9, 0.8, 0.5], [0.9, 0.2, 0.5]):
        sampler.observe(Feedback(indices=torch.arange(3), predicted=torch.zeros(3, dtype=torch.long),
                                 true_prob=torch.tensor(p), loss=torch.zeros(3)))
    var = torch.tensor([0.2, 0.8, 0.2], dtype=torch.float64).var()  # sample 1's probabilities
    std1 = math.sqrt(var + var**2 / 2)  # bias-corrected, |H| = 3
    eps = std1 / 3  # mean of the stds (0, std1, 0)
    expected = torch.tensor([eps, std1 + eps, eps])
    assert sampler.probabilities().tolist() == pytest.approx((expected / expected.sum()).tolist(), rel=1e-5)


def test_state_dict_round_trip_restores_the_history() -> None:
    a = build_sampler("recency_bias", num_samples=3, batch_size=1, epochs=2, num_labels=2, generator=_gen())
    a.observe(Feedback(indices=torch.tensor([1]), predicted=torch.tensor([1]), true_prob=torch.zeros(1),
                       loss=torch.zeros(1)))
    b = build_sampler("recency_bias", num_samples=3, batch_size=1, epochs=2, num_labels=2, generator=_gen())
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    assert torch.equal(a.state_dict()["history"], b.state_dict()["history"])
    c = build_sampler("recency_bias", num_samples=4, batch_size=1, epochs=2, num_labels=2, generator=_gen())
    with pytest.raises(SamplerConfigError, match="another dataset"):
        c.load_state_dict(a.state_dict())


def test_default_warm_up_scales_to_short_runs() -> None:
    assert [default_warmup_epochs(e) for e in (1, 3, 10, 40, 100, 300)] == [0, 0, 2, 6, 15, 15]


@pytest.mark.parametrize("kwargs, match", [
    ({"sampler": "focal"}, "sampler: unknown sampler 'focal'; allowed: uniform, recency_bias"),
    ({"sampler": "recency_bias", "sampler_q": 0}, "sampler_q=0 is invalid"),
    ({"sampler": "recency_bias", "sampler_s_e0": 0.5}, "sampler_s_e0=0.5 is invalid"),
    ({"sampler_warmup_epochs": 50, "epochs": 10}, "sampler_warmup_epochs=50 is invalid"),
])
def test_bad_sampler_parameters_name_the_parameter(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(TrainConfigError, match=match):
        TrainConfig(**kwargs)  # type: ignore[arg-type]


def test_fp16_needs_cuda() -> None:
    with pytest.raises(TrainConfigError, match="fp16"):
        TrainConfig(fp16=True)


def test_detector_feedback_is_the_detected_class_set_and_true_set_probability() -> None:
    from components.train.loss import feedback_label_count, image_feedback

    big = 20.0  # sigmoid(20) ~ 1, sigmoid(-20) ~ 0
    raw = torch.full((2, 3, 5 + 3), -big)
    raw[..., 4] = big  # centerness ~ 1: the score is sqrt(sigmoid(cls))
    raw[0, 1, 5 + 0] = big  # image 0: class 0 detected in one cell
    raw[1, 0, 5 + 1] = big  # image 1: classes 1 and 2 detected
    raw[1, 2, 5 + 2] = big
    targets = [(torch.zeros(1, 4), torch.tensor([0])), (torch.zeros(1, 4), torch.tensor([0]))]
    predicted, true_prob = image_feedback(raw, targets, num_classes=3)
    assert predicted.tolist() == [0b001, 0b110]
    assert true_prob.tolist() == pytest.approx([1.0, 0.0], abs=1e-4)  # image 1 got every class wrong
    assert feedback_label_count(3) == 8
    # many classes: the top class (+1), 0 for nothing detected
    raw12 = torch.full((2, 3, 5 + 12), -big)
    raw12[..., 4] = big
    raw12[0, 2, 5 + 7] = big
    predicted12, _ = image_feedback(raw12, targets, num_classes=12)
    assert predicted12.tolist() == [8, 0] and feedback_label_count(12) == 13
